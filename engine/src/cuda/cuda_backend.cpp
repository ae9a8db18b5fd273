// The CUDA backend: the same step as the CPU reference, on the GPU. Matrix products go to
// cuBLAS (fused Q/K/V and gate/up matrices, fp32 accumulation, the residual added by beta = 1,
// or few-token products in parts that the next kernel sums: split_parts), or, on single-token
// steps, to the fused GEMV kernels; the rest are den::kernels CUDA kernels, each tested against
// its CPU twin. Logits stay on the device; only the rows a caller asked for, or the sampled
// token ids, come back.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <tuple>
#include <stdexcept>
#include <string>
#include <thread>

#include "cublas_handle.h"
#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/kernels/attention.h"
#include "den/kernels/cuda_check.h"
#include "den/kernels/cuda_resources.h"
#include "den/kernels/embedding.h"
#include "den/kernels/gemv.h"
#include "den/kernels/qkv_rope_store.h"
#include "den/kernels/rmsnorm.h"
#include "den/kernels/sampling.h"
#include "den/kernels/swiglu.h"
#include "den/kernels/timeline.h"
#include "device_weights.h"
#include "step_plan.h"

namespace den::engine {
namespace {

using kernels::DeviceBuffer;
using kernels::DType;

// A device buffer that only grows; true when it moved (captured graphs then go stale).
bool ensure(DeviceBuffer& buffer, size_t bytes) {
  if (buffer.bytes() >= bytes) return false;
  buffer = DeviceBuffer(std::max(bytes, buffer.bytes() * 3 / 2));
  return true;
}

// What a captured decode step depends on besides the contents of the plan's device arrays:
// counts and flags, the KV pool, and where the plan's arrays sit.
using GraphKey = std::tuple<int32_t, int32_t, int32_t, int32_t, int32_t, const void*, int64_t, int32_t,
                            const void*, cuda::StepPlan::Offsets, bool, bool, bool>;

class CudaBackend final : public Backend {
 public:
  CudaBackend(const Model& model, int device) : model_(model), device_(device) {
    kernels::check(cudaSetDevice(device));
    cudaDeviceProp prop{};
    kernels::check(cudaGetDeviceProperties(&prop, device));
    device_name_ = prop.name;
    sm_count_ = prop.multiProcessorCount;
    type_ = cuda::compute_type_of(model);
    const ModelConfig& shape = model.config();
    attention_blocks_ = kernels::decode_attention_resident_blocks(type_, shape.head_dim, shape.n_heads / shape.n_kv_heads);
    const auto threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    weights_ = cuda::upload_weights(model, type_, stream_.get(), threads);
    cublas_ = std::make_unique<cuda::CublasHandle>(stream_.get(), size_t{32} << 20);
    read_test_fault();
    read_timeline_request();
  }

  ~CudaBackend() override {
    // The kernels point at this backend's timeline buffer until detached (one such backend a
    // process: a second one's buffer would take the stamps of both).
    if (timeline_.get() != nullptr) {
      try {
        kernels::kernel_timeline_attach(nullptr, 0);
      } catch (...) {  // a lost device: nothing runs to write through the pointer
      }
    }
  }

  std::string_view name() const override { return "cuda"; }
  kernels::DType kv_dtype() const override { return type_; }
  bool kv_on_device() const override { return true; }

  using Backend::forward;
  void forward(std::span<const SequenceInput> batch, const kernels::PagedKvView& kv, StepOutput& out,
               KvArrival* arrival) override {
    validate_batch(batch, kv, model_, type_, "cuda backend");
    try {
      if (fault_step_ > 0 && ++steps_ == fault_step_) inject_test_fault();
      step(batch, kv, out, arrival);
    } catch (const kernels::CudaError& e) {
      if (kernels::is_sticky(e.code())) throw DeviceLost(std::string("the GPU is lost: ") + e.what());
      throw;
    }
  }

 private:
  // DEN_TEST_GPU_FAULT=kernel@N|alloc@N (tests of issue #7 only): at the Nth step, a kernel
  // writes through a null pointer (the context dies: DeviceLost), or the step's device
  // allocation is refused as cudaMalloc refuses it when memory is short (the step fails, the
  // device lives on).
  void read_test_fault() {
    const char* spec = std::getenv("DEN_TEST_GPU_FAULT");
    if (spec == nullptr || *spec == '\0') return;
    const std::string_view s(spec);
    const size_t at = s.find('@');
    const std::string_view kind = s.substr(0, at);
    const int64_t step = at == std::string_view::npos ? 0 : std::atoll(std::string(s.substr(at + 1)).c_str());
    if ((kind != "kernel" && kind != "alloc") || step < 1)
      throw std::invalid_argument("DEN_TEST_GPU_FAULT: expected kernel@N or alloc@N (N >= 1), got '" + std::string(s) + "'");
    fault_kernel_ = kind == "kernel";
    fault_step_ = step;
  }

  // DEN_KERNEL_TIMELINE=FILE (a -DDEN_KERNEL_TIMELINE=ON build): decode steps
  // DEN_KERNEL_TIMELINE_STEP (default 20) to that + 2, when replayed from a graph, leave their
  // kernels' block stamps in FILE.<step> (format: write_timeline).
  void read_timeline_request() {
    const char* path = std::getenv("DEN_KERNEL_TIMELINE");
    if (path == nullptr || *path == '\0') return;
    const char* step = std::getenv("DEN_KERNEL_TIMELINE_STEP");
    timeline_first_step_ = step != nullptr && *step != '\0' ? std::atoll(step) : 20;
    if (timeline_first_step_ < 1) throw std::invalid_argument("DEN_KERNEL_TIMELINE_STEP: expected a step number >= 1");
    constexpr uint64_t kCapacity = uint64_t{1} << 20;  // blocks: a 32-layer step launches about 50,000
    try {
      timeline_ = DeviceBuffer(kernels::kernel_timeline_bytes(kCapacity));
      kernels::kernel_timeline_attach(timeline_.get(), kCapacity);
    } catch (const std::logic_error& e) {
      throw std::invalid_argument(std::string("DEN_KERNEL_TIMELINE: ") + e.what());
    }
    timeline_path_ = path;
  }

  // One line per chained launch of the graph ("L blocks"), then one per block in the order the
  // blocks started ("B start wait grid_and_block end", nanoseconds of the GPU's global timer;
  // see kernels::KernelTimelineEntry). scripts/timeline-summary reads it.
  void write_timeline(const std::vector<uint32_t>& launches) {
    const auto entries = kernels::kernel_timeline_read(timeline_.get());
    const std::string path = timeline_path_ + "." + std::to_string(timeline_steps_);
    FILE* f = std::fopen(path.c_str(), "w");
    if (f == nullptr) throw std::runtime_error("DEN_KERNEL_TIMELINE: cannot write " + path);
    std::fprintf(f, "# den kernel timeline: decode step %lld, %zu launches, %zu blocks\n",
                 static_cast<long long>(timeline_steps_), launches.size(), entries.size());
    for (uint32_t blocks : launches) std::fprintf(f, "L %u\n", blocks);
    for (const auto& e : entries) {
      std::fprintf(f, "B %llu %llu %llu %llu\n", static_cast<unsigned long long>(e.start_ns),
                   static_cast<unsigned long long>(e.wait_ns), static_cast<unsigned long long>(e.grid_and_block),
                   static_cast<unsigned long long>(e.end_ns));
    }
    if (std::fclose(f) != 0) throw std::runtime_error("DEN_KERNEL_TIMELINE: cannot write " + path);
  }

  void inject_test_fault() {
    if (fault_kernel_) {
      kernels::trigger_illegal_address_cuda(stream_.get());
      kernels::check(cudaStreamSynchronize(stream_.get()));
    }
    throw kernels::CudaError(cudaErrorMemoryAllocation,
                             "CUDA error cudaErrorMemoryAllocation (out of memory, injected by DEN_TEST_GPU_FAULT) "
                             "allocating a step's buffers");
  }

  void step(std::span<const SequenceInput> batch, const kernels::PagedKvView& kv, StepOutput& out,
            KvArrival* arrival) {
    kernels::check(cudaSetDevice(device_));
    const ModelConfig& c = model_.config();
    const bool fast = kernels::attention_fast_path(kv.layout.dtype, c.head_dim);
    plan_.build(batch, c.n_heads, fast, attention_blocks_, c.n_kv_heads);
    const int64_t n = plan_.n_tokens();
    if (reserve(n, plan_.n_logit_rows())) graphs_.clear();
    plan_.upload(stream_.get());
    const bool gemv = use_gemv(n);
    const std::vector<uint32_t>* recorded_launches = nullptr;  // a replay whose timeline to write
    if (plan_.decode_only() && arrival == nullptr) {
      // Decode steps replay a captured graph: one launch instead of a hundred or more. A step
      // whose KV is still arriving waits on events per layer and runs eagerly instead.
      const GraphKey key{static_cast<int32_t>(n),
                         plan_.n_logit_rows(),
                         plan_.n_host_rows(),
                         plan_.n_samples(),
                         plan_.n_splits(),
                         kv.blocks,
                         kv.n_blocks,
                         kv.layout.block_tokens,
                         plan_.device_buffer(),
                         plan_.layout(),
                         gemv,
                         plan_.any_logprob(),
                         plan_.plain_greedy()};
      auto it = graphs_.find(key);
      if (it == graphs_.end()) {
        if (graphs_.size() >= 64) graphs_.clear();
        kernels::kernel_timeline_launches().clear();
        kernels::check(cudaStreamBeginCapture(stream_.get(), cudaStreamCaptureModeThreadLocal));
        run_layers(kv, n, gemv, nullptr);
        cudaGraph_t graph = nullptr;
        kernels::check(cudaStreamEndCapture(stream_.get(), &graph));
        const kernels::Graph captured(graph);
        it = graphs_.emplace(key, CapturedStep{kernels::GraphExec(captured.get()), kernels::kernel_timeline_launches()})
                 .first;
      }
      const bool record = timeline_.get() != nullptr && ++timeline_steps_ >= timeline_first_step_ &&
                          timeline_steps_ < timeline_first_step_ + 3;
      if (record) kernels::kernel_timeline_reset(timeline_.get(), stream_.get());
      it->second.graph.launch(stream_.get());
      if (record) recorded_launches = &it->second.timeline_launches;
    } else {
      run_layers(kv, n, gemv, arrival);
    }
    finish(out, batch.size());
    if (recorded_launches != nullptr) write_timeline(*recorded_launches);
  }

  // Single-token steps use the fused GEMV kernels; larger ones cuBLAS. The GEMV reads x once
  // per token through L1, which grows with the batch: measured on H200, 8B shape, 1K context,
  // per step: batch 1 GEMV 5.8 ms; batch 4 GEMV 9.8 ms; batch 8 GEMV 15.1 ms, cuBLAS 6.6 ms.
  // TODO(#3): stage x in shared memory once per block to keep small batches on the GEMV path.
  static constexpr int64_t kGemvTokens = 1;
  bool use_gemv(int64_t n) const {
    const ModelConfig& c = model_.config();
    if (n > kGemvTokens) return false;
    const auto t = static_cast<int32_t>(n);
    return kernels::gemv_supported(type_, c.n_embd, t) && kernels::gemv_supported(type_, c.q_dim(), t) &&
           kernels::gemv_supported(type_, c.n_ff, t) &&
           plan_.n_logit_rows() <= kernels::kGemvMaxTokens;
  }

  // Few-token cuBLAS products in parts over slices of their inputs. cuBLAS covers such a product
  // with few output tiles (128 x 32 on an H200: 32 for the 8B shape's output and down products
  // at up to 32 tokens), so it splits K itself and runs a reduction kernel after the product; in
  // parts (one batched call), the tiles fill the SMs and the kernel that follows anyway sums them:
  // the residual add fused with the next norm (residual_rmsnorm), or the RoPE kernel. Measured
  // on an H200, 8B shape at 1K (docs/PERFORMANCE.md): batch 32 +4%, batch 8 +3%; 2, 4, 4 parts
  // beat the other counts tried (1, 2, 4, 8, 7, 14 for some of the three products).
  struct SplitParts {
    int32_t qkv = 0, out = 0, down = 0;  // 0: whole (the residual added by beta = 1)
  };
  // The power of two up to 4 (what the norm's register kernel holds) that brings the product's
  // tiles nearest one an SM without passing it; under 2: whole.
  int32_t parts_for(int64_t n_tokens, int64_t n_in, int64_t n_out) const {
    const int64_t tiles = (n_out + 127) / 128 * ((n_tokens + 31) / 32);
    int32_t parts = 1;
    while (parts < 4 && tiles * parts * 2 <= sm_count_ && cuda::CublasHandle::split_parts_fit(type_, n_in, parts * 2)) {
      parts *= 2;
    }
    return parts >= 2 ? parts : 0;
  }
  SplitParts split_parts(int64_t n) const {
    const ModelConfig& c = model_.config();
    const bool norm_fits = kernels::residual_rmsnorm_fast(c.n_embd);
    return {parts_for(n, c.n_embd, c.q_dim() + 2 * int64_t{c.kv_dim()}), norm_fits ? parts_for(n, c.q_dim(), c.n_embd) : 0,
            norm_fits ? parts_for(n, c.n_ff, c.n_embd) : 0};
  }

  bool reserve(int64_t n, int64_t rows) {
    const ModelConfig& c = model_.config();
    const int64_t es = kernels::dtype_bytes(type_);
    bool moved = false;
    moved |= ensure(x_, static_cast<size_t>(n * c.n_embd * 4));
    moved |= ensure(xn_, static_cast<size_t>(std::max(n, rows) * c.n_embd * es));
    moved |= ensure(qkv_, static_cast<size_t>(n * (c.q_dim() + 2 * c.kv_dim()) * 4));
    moved |= ensure(q_, static_cast<size_t>(n * c.q_dim() * es));
    moved |= ensure(attn_, static_cast<size_t>(n * c.q_dim() * es));
    moved |= ensure(gate_up_, static_cast<size_t>(n * 2 * c.n_ff * 4));
    moved |= ensure(hidden_, static_cast<size_t>(n * c.n_ff * es));
    const SplitParts split = split_parts(n);
    const int64_t part_floats = std::max({int64_t{split.qkv} * (c.q_dim() + 2 * c.kv_dim()), int64_t{split.out} * c.n_embd,
                                          int64_t{split.down} * c.n_embd, int64_t{1}});
    moved |= ensure(parts_, static_cast<size_t>(n * part_floats * 4));
    moved |= ensure(logits_, static_cast<size_t>(std::max<int64_t>(rows, 1) * c.n_vocab * 4));
    moved |= ensure(sampled_, static_cast<size_t>(std::max(plan_.n_samples(), 1)) * 8);
    if (ensure(argmax_workspace_, kernels::argmax_workspace_bytes(std::max(plan_.n_samples(), 1)))) {
      // Its counters must begin at zero (the kernel returns them to zero).
      kernels::check(cudaMemsetAsync(argmax_workspace_.get(), 0, argmax_workspace_.bytes(), stream_.get()));
      moved = true;
    }
    if (ensure(attention_workspace_, plan_.attention_workspace_bytes(c.n_heads, c.head_dim))) {
      // The merge counters at its start must begin at zero (kernels return them to zero).
      kernels::check(cudaMemsetAsync(attention_workspace_.get(), 0, attention_workspace_.bytes(), stream_.get()));
      moved = true;
    }
    return moved;
  }

  void run_layers(const kernels::PagedKvView& kv, int64_t n, bool gemv, KvArrival* arrival) {
    const ModelConfig& c = model_.config();
    cudaStream_t s = stream_.get();
    const kernels::PagedBatch batch = plan_.paged_batch();
    const kernels::QkvShape shape{c.n_heads, c.n_kv_heads, c.head_dim, c.n_rot, c.rope_style};
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    const auto tokens = static_cast<int32_t>(n);
    float* x = x_.as<float>();
    const bool fused_rope = c.n_rot == c.head_dim;
    const SplitParts split = gemv ? SplitParts{} : split_parts(n);

    // Single-token steps read the embedding row inside the first Q/K/V product, which also
    // starts the residual stream; other steps gather it first.
    const bool fold_embedding = gemv && kernels::gemv_gathers_embedding(type_, c.n_embd, tokens);
    if (!fold_embedding) kernels::embedding_gather_cuda(weights_.token_embd.get(), type_, plan_.ids(), n, c.n_embd, x, s);
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      if (arrival != nullptr) arrival->before_layer(layer, s);
      const cuda::DeviceLayer& w = weights_.layers[static_cast<size_t>(layer)];
      if (gemv) {
        const kernels::GemvInput normed = fold_embedding && layer == 0
                                              ? kernels::GemvInput{weights_.token_embd.get(), nullptr, w.attn_norm.as<float>(),
                                                                   c.rms_eps, plan_.ids(), x}
                                              : kernels::GemvInput{x, nullptr, w.attn_norm.as<float>(), c.rms_eps};
        if (fused_rope) {
          const kernels::GemvRope rope{shape, w.qkv_bias.as<float>(), weights_.inv_freq.as<float>(), kv, batch, layer};
          kernels::gemv_cuda(w.qkv.get(), type_, c.n_embd, shape.row(), normed, tokens, kernels::GemvEpilogue::rope_store,
                             q_.get(), &rope, s);
        } else {
          kernels::gemv_cuda(w.qkv.get(), type_, c.n_embd, shape.row(), normed, tokens, kernels::GemvEpilogue::store,
                             qkv_.get(), nullptr, s);
          kernels::qkv_rope_store_cuda(qkv_.as<float>(), w.qkv_bias.as<float>(), shape, weights_.inv_freq.as<float>(),
                                       kv, batch, layer, q_.get(), type_, s);
        }
      } else {
        // The previous layer's split down product left this layer's norm in xn_ already.
        if (layer == 0 || split.down == 0) {
          kernels::rmsnorm_cuda(x, w.attn_norm.as<float>(), xn_.get(), type_, nullptr, n, c.n_embd, c.rms_eps, s);
        }
        if (split.qkv > 0) {
          cublas_->matmul_parts(w.qkv.get(), type_, xn_.get(), n, c.n_embd, shape.row(), parts_.as<float>(), split.qkv);
          kernels::qkv_rope_store_cuda(parts_.as<float>(), w.qkv_bias.as<float>(), shape, weights_.inv_freq.as<float>(),
                                       kv, batch, layer, q_.get(), type_, s, split.qkv);
        } else {
          cublas_->matmul(w.qkv.get(), type_, xn_.get(), n, c.n_embd, shape.row(), qkv_.as<float>(), 0.0f);
          kernels::qkv_rope_store_cuda(qkv_.as<float>(), w.qkv_bias.as<float>(), shape, weights_.inv_freq.as<float>(),
                                       kv, batch, layer, q_.get(), type_, s);
        }
      }
      kernels::paged_attention_cuda(q_.get(), attn_.get(), kv, batch, plan_.attention(attention_workspace_.as<float>()),
                                    layer, c.n_heads, scale, s);
      if (gemv) {
        kernels::gemv_cuda(w.attn_output.get(), type_, c.q_dim(), c.n_embd, {attn_.get()}, tokens,
                           kernels::GemvEpilogue::accumulate, x, nullptr, s);
        kernels::gemv_cuda(w.gate_up.get(), type_, c.n_embd, 2 * int64_t{c.n_ff},
                           {x, nullptr, w.ffn_norm.as<float>(), c.rms_eps}, tokens, kernels::GemvEpilogue::swiglu,
                           hidden_.get(), nullptr, s);
        kernels::gemv_cuda(w.down.get(), type_, c.n_ff, c.n_embd, {hidden_.get()}, tokens,
                           kernels::GemvEpilogue::accumulate, x, nullptr, s);
      } else {
        if (split.out > 0) {
          cublas_->matmul_parts(w.attn_output.get(), type_, attn_.get(), n, c.q_dim(), c.n_embd, parts_.as<float>(),
                                split.out);
          kernels::residual_rmsnorm_cuda(parts_.as<float>(), split.out, x, w.ffn_norm.as<float>(), xn_.get(), type_, n,
                                         c.n_embd, c.rms_eps, s);
        } else {
          cublas_->matmul(w.attn_output.get(), type_, attn_.get(), n, c.q_dim(), c.n_embd, x, 1.0f);
          kernels::rmsnorm_cuda(x, w.ffn_norm.as<float>(), xn_.get(), type_, nullptr, n, c.n_embd, c.rms_eps, s);
        }
        cublas_->matmul(w.gate_up.get(), type_, xn_.get(), n, c.n_embd, 2 * int64_t{c.n_ff}, gate_up_.as<float>(),
                        0.0f);
        kernels::swiglu_cuda(gate_up_.as<float>(), hidden_.get(), type_, n, c.n_ff, s);
        if (split.down > 0) {
          // The residual add, and the next layer's attention norm (none after the last layer).
          const bool last = layer + 1 == c.n_layers;
          const float* next_norm = last ? nullptr : weights_.layers[static_cast<size_t>(layer) + 1].attn_norm.as<float>();
          cublas_->matmul_parts(w.down.get(), type_, hidden_.get(), n, c.n_ff, c.n_embd, parts_.as<float>(), split.down);
          kernels::residual_rmsnorm_cuda(parts_.as<float>(), split.down, x, next_norm, xn_.get(), type_, n, c.n_embd,
                                         c.rms_eps, s);
        } else {
          cublas_->matmul(w.down.get(), type_, hidden_.get(), n, c.n_ff, c.n_embd, x, 1.0f);
        }
      }
    }
    const int32_t rows = plan_.n_logit_rows();
    if (rows > 0) {
      if (gemv) {
        kernels::gemv_cuda(weights_.output_matrix(), type_, c.n_embd, c.n_vocab,
                           {x, plan_.logit_rows(), weights_.output_norm.as<float>(), c.rms_eps}, rows,
                           kernels::GemvEpilogue::store, logits_.get(), nullptr, s);
      } else {
        kernels::rmsnorm_cuda(x, weights_.output_norm.as<float>(), xn_.get(), type_, plan_.logit_rows(), rows, c.n_embd,
                              c.rms_eps, s);
        cublas_->matmul(weights_.output_matrix(), type_, xn_.get(), rows, c.n_embd, c.n_vocab, logits_.as<float>(),
                        0.0f);
      }
    }
    if (plan_.n_samples() > 0) {
      float* sample_logits = logits_.as<float>() + static_cast<int64_t>(plan_.n_host_rows()) * c.n_vocab;
      if (plan_.plain_greedy()) {
        kernels::argmax_cuda(sample_logits, plan_.n_samples(), c.n_vocab, sampled_.as<int32_t>(),
                             argmax_workspace_.get(), s);
        return;
      }
      kernels::sample_cuda(sample_logits, plan_.n_samples(), c.n_vocab, plan_.configs(), plan_.seen(),
                           plan_.seen_offsets(), plan_.steps(), sampled_.as<int32_t>(),
                           plan_.any_logprob() ? sampled_.as<float>() + plan_.n_samples() : nullptr, s);
    }
  }

  void finish(StepOutput& out, size_t n_seqs) {
    const ModelConfig& c = model_.config();
    cudaStream_t s = stream_.get();
    out.n_vocab = c.n_vocab;
    out.first_row = plan_.first_row();
    const int32_t host_rows = plan_.n_host_rows();
    out.logits.resize(static_cast<size_t>(host_rows) * static_cast<size_t>(c.n_vocab));
    if (host_rows > 0) {
      kernels::check(cudaMemcpyAsync(out.logits.data(), logits_.get(), out.logits.size() * sizeof(float),
                                     cudaMemcpyDeviceToHost, s));
    }
    // The sampled ids, then their log-probabilities when any was asked for: adjacent on the
    // device, so one copy, into pinned memory (a pageable copy is staged by the driver).
    const int32_t samples = plan_.n_samples();
    const size_t sampled_bytes = static_cast<size_t>(samples) * (plan_.any_logprob() ? 8 : 4);
    if (sampled_host_.bytes() < sampled_bytes) sampled_host_ = kernels::PinnedBuffer(std::max<size_t>(sampled_bytes * 2, 1024));
    if (samples > 0) {
      kernels::check(cudaMemcpyAsync(sampled_host_.get(), sampled_.get(), sampled_bytes, cudaMemcpyDeviceToHost, s));
    }
    stream_.synchronize();
    const int32_t* tokens = sampled_host_.as<int32_t>();
    const float* logprobs = sampled_host_.as<float>() + samples;
    out.sampled.assign(n_seqs, SampledToken{});
    for (size_t seq = 0; seq < n_seqs; ++seq) {
      const int32_t k = plan_.sample_of_sequence()[seq];
      if (k < 0) continue;
      out.sampled[seq].id = tokens[static_cast<size_t>(k)];
      out.sampled[seq].logprob = plan_.wants_logprob()[static_cast<size_t>(k)] ? logprobs[static_cast<size_t>(k)] : 0.0f;
    }
  }

  const Model& model_;
  int device_;
  int64_t attention_blocks_ = 0;  // decode-attention blocks resident at once
  int64_t sm_count_ = 0;
  std::string device_name_;
  DType type_;
  kernels::Stream stream_;
  cuda::DeviceWeights weights_;
  std::unique_ptr<cuda::CublasHandle> cublas_;
  cuda::StepPlan plan_;
  kernels::PinnedBuffer sampled_host_;  // the step's sampled ids and log-probabilities
  struct CapturedStep {
    kernels::GraphExec graph;
    std::vector<uint32_t> timeline_launches;  // block counts of its chained launches (a timeline build)
  };
  std::map<GraphKey, CapturedStep> graphs_;
  DeviceBuffer x_, xn_, qkv_, parts_, q_, attn_, gate_up_, hidden_, logits_, sampled_, attention_workspace_, argmax_workspace_;
  int64_t steps_ = 0, fault_step_ = 0;  // DEN_TEST_GPU_FAULT
  bool fault_kernel_ = false;
  DeviceBuffer timeline_;  // DEN_KERNEL_TIMELINE
  std::string timeline_path_;
  int64_t timeline_first_step_ = 0, timeline_steps_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const Model& model, int device) {
  if (!kernels::cuda_device_available()) {
    throw std::runtime_error("the cuda backend needs a CUDA device, and none is usable here");
  }
  return std::make_unique<CudaBackend>(model, device);
}

}  // namespace den::engine
