// Backend selection and the batch validation every backend shares.
#include <stdexcept>
#include <string>

#include "den/engine/backend.h"
#include "den/engine/cuda_device.h"
#include "den/engine/model.h"

namespace den::engine {

std::unique_ptr<Backend> make_backend(std::string_view name, const Model& model, int n_threads, int device) {
  if (name == "cpu") return make_cpu_backend(model, n_threads);
  if (name == "cuda") return make_cuda_backend(model, device);
  throw std::invalid_argument("unknown backend '" + std::string(name) + "' (known: cpu, cuda)");
}

#ifndef DEN_HAVE_CUDA
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("this build of Den has no CUDA backend (configure with -DDEN_CUDA=ON where nvcc exists)");
}
}  // namespace
std::unique_ptr<Backend> make_cuda_backend(const Model&, int) { no_cuda(); }
CudaDeviceInfo cuda_device_info(int) { no_cuda(); }
CudaFloors measure_cuda_floors(int) { no_cuda(); }
double time_decode_attention(const kernels::PagedKvView&, int32_t, std::span<const SequenceInput>, int) { no_cuda(); }
#endif

void validate_batch(std::span<const SequenceInput> batch, const kernels::PagedKvView& kv, const Model& model,
                    kernels::DType kv_dtype, std::string_view backend_name) {
  const ModelConfig& c = model.config();
  const std::string name(backend_name);
  const kernels::KvLayout expected = model.kv_layout(kv.layout.block_tokens, kv_dtype);
  if (kv.layout.block_tokens <= 0 || !(kv.layout == expected) || kv.blocks == nullptr) {
    throw std::invalid_argument(name + ": the KV pool's layout does not match model '" + c.name + "' (expected " +
                                std::string(kernels::dtype_name(kv_dtype)) + " K/V for " + std::to_string(c.n_layers) +
                                " layers, " + std::to_string(c.n_kv_heads) + " KV heads of " +
                                std::to_string(c.head_dim) + ")");
  }
  for (size_t s = 0; s < batch.size(); ++s) {
    const SequenceInput& seq = batch[s];
    const std::string which = name + ": sequence " + std::to_string(s) + " of the batch";
    if (seq.tokens.empty()) throw std::invalid_argument(which + " has no tokens");
    if (seq.start_position < 0) throw std::invalid_argument(which + " has a negative start position");
    for (int32_t id : seq.tokens) {
      if (id < 0 || id >= c.n_vocab) {
        throw std::invalid_argument(which + " has token id " + std::to_string(id) + ", outside the vocabulary [0, " +
                                    std::to_string(c.n_vocab) + ")");
      }
    }
    if (seq.logits == LogitsWanted::sample) {
      if (seq.sampling == nullptr) throw std::invalid_argument(which + " asks to sample but gives no parameters");
      seq.sampling->validate();
    }
    const int64_t end = int64_t{seq.start_position} + static_cast<int64_t>(seq.tokens.size());
    if (end > (int64_t{1} << 30)) throw std::invalid_argument(which + " is longer than 2^30 tokens");
    const int64_t blocks_needed = (end + kv.layout.block_tokens - 1) / kv.layout.block_tokens;
    if (static_cast<int64_t>(seq.block_table.size()) < blocks_needed) {
      throw std::invalid_argument(which + " needs " + std::to_string(blocks_needed) + " KV blocks for " +
                                  std::to_string(end) + " tokens, its block table has " +
                                  std::to_string(seq.block_table.size()));
    }
    for (int64_t b = 0; b < blocks_needed; ++b) {
      const int32_t id = seq.block_table[static_cast<size_t>(b)];
      if (id < 0 || id >= kv.n_blocks) {
        throw std::invalid_argument(which + " refers to KV block " + std::to_string(id) + ", outside the pool of " +
                                    std::to_string(kv.n_blocks));
      }
    }
  }
}

}  // namespace den::engine
