// The decoder interface every backend implements: one forward step over a batch of sequences,
// each with its own new tokens, start position and block table into a paged KV pool.
// Prefill chunks and single decode tokens mix freely in one batch. The backend never owns KV
// lifetime: the caller (memory manager or a test) hands it the pool view and block tables.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string_view>
#include <vector>

#include "den/engine/sampler.h"
#include "den/kernels/paged_kv.h"

namespace den::engine {

class Model;

// What a sequence wants back from a step: nothing (a prefill chunk), the logits of its last
// token or of every token (tests, scoring), or a token sampled from the last logits on the
// device, so that no vocabulary-sized row crosses to the host.
enum class LogitsWanted : uint8_t { none, last, all, sample };

struct SequenceInput {
  std::span<const int32_t> tokens;  // new tokens, at positions [start_position, start_position + n)
  int32_t start_position = 0;       // tokens already in the KV cache before this step
  std::span<const int32_t> block_table;  // blocks covering start_position + tokens.size() tokens
  LogitsWanted logits = LogitsWanted::last;
  // For LogitsWanted::sample:
  const SamplingParams* sampling = nullptr;
  std::span<const int32_t> history;  // every token so far (the penalty window is taken from it)
  uint64_t sample_step = 0;          // which draw of the seed's stream this is
  bool want_logprob = false;         // the chosen token's log-probability (raw logits)
};

struct SampledToken {
  int32_t id = -1;
  float logprob = 0.0f;  // when asked for
};

struct StepOutput {
  int32_t n_vocab = 0;
  std::vector<float> logits;        // [rows, n_vocab]
  std::vector<int32_t> first_row;   // per sequence: its first row in `logits` (-1 if none)
  std::vector<SampledToken> sampled;  // per sequence (id -1 unless it asked to sample)
  std::span<const float> row(size_t r) const {
    return {logits.data() + r * static_cast<size_t>(n_vocab), static_cast<size_t>(n_vocab)};
  }
};

// KV that is still arriving while a step runs (a layer-wise wake): the backend calls
// before_layer(l, stream) before it reads or writes layer l's KV; the implementation makes that
// stream wait (a cudaStream_t on the CUDA backend, nullptr on the CPU backend, where it blocks).
class KvArrival {
 public:
  virtual ~KvArrival() = default;
  virtual void before_layer(int32_t layer, void* stream) = 0;
};

// The device can run nothing more: CUDA's sticky errors (an illegal address, a trapped
// kernel, an uncorrectable ECC error). Nothing on it can be trusted or saved; the daemon exits
// non-zero so that a restart resumes from what is durable.
class DeviceLost : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  // Element type this backend keeps K/V in, and whether its KV pool lives in device memory.
  virtual kernels::DType kv_dtype() const = 0;
  virtual bool kv_on_device() const = 0;
  // Runs one step. Throws std::invalid_argument for a malformed batch (token id out of range,
  // block table too short, layout mismatch) before touching the KV pool.
  void forward(std::span<const SequenceInput> batch, const kernels::PagedKvView& kv, StepOutput& out) {
    forward(batch, kv, out, nullptr);
  }
  // The same while KV arrives layer by layer (`arrival` may be null: everything is there).
  virtual void forward(std::span<const SequenceInput> batch, const kernels::PagedKvView& kv, StepOutput& out,
                       KvArrival* arrival) = 0;
};

// The C++ reference backend: float32 arithmetic, weights expanded from their GGUF format on
// the fly, multi-threaded. Results of a sequence do not depend on the rest of the batch.
std::unique_ptr<Backend> make_cpu_backend(const Model& model, int n_threads);

// The CUDA backend on `device`. Throws std::runtime_error when Den was built without CUDA or no
// usable device exists.
std::unique_ptr<Backend> make_cuda_backend(const Model& model, int device);

// "cpu" or "cuda".
std::unique_ptr<Backend> make_backend(std::string_view name, const Model& model, int n_threads, int device);

// Validation every backend applies before touching KV (throws std::invalid_argument).
void validate_batch(std::span<const SequenceInput> batch, const kernels::PagedKvView& kv, const Model& model,
                    kernels::DType kv_dtype, std::string_view backend_name);

}  // namespace den::engine
