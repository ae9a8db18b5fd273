// The CUDA backend: the same step as the CPU reference, on the GPU. Matrix products go to
// cuBLAS (fused Q/K/V and gate/up matrices, fp32 accumulation, the residual added by beta = 1);
// the rest are den::kernels CUDA kernels, each tested against its CPU twin. Logits stay on the
// device; only the rows a caller asked for, or the sampled token ids, come back.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
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
#include "den/kernels/qkv_rope_store.h"
#include "den/kernels/rmsnorm.h"
#include "den/kernels/sampling.h"
#include "den/kernels/swiglu.h"
#include "device_weights.h"
#include "step_plan.h"

namespace den::engine {
namespace {

using kernels::DeviceBuffer;
using kernels::DType;

// A device buffer that only grows.
void ensure(DeviceBuffer& buffer, size_t bytes) {
  if (buffer.bytes() < bytes) buffer = DeviceBuffer(std::max(bytes, buffer.bytes() * 3 / 2));
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(const Model& model, int device) : model_(model), device_(device) {
    kernels::check(cudaSetDevice(device));
    cudaDeviceProp prop{};
    kernels::check(cudaGetDeviceProperties(&prop, device));
    sm_count_ = prop.multiProcessorCount;
    device_name_ = prop.name;
    type_ = cuda::compute_type_of(model);
    const auto threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    weights_ = cuda::upload_weights(model, type_, stream_.get(), threads);
    cublas_ = std::make_unique<cuda::CublasHandle>(stream_.get(), size_t{32} << 20);
  }

  std::string_view name() const override { return "cuda"; }
  kernels::DType kv_dtype() const override { return type_; }
  bool kv_on_device() const override { return true; }

  void forward(std::span<const SequenceInput> batch, const kernels::PagedKvView& kv, StepOutput& out) override {
    validate_batch(batch, kv, model_, type_, "cuda backend");
    kernels::check(cudaSetDevice(device_));
    const ModelConfig& c = model_.config();
    const bool fast = kernels::attention_fast_path(kv.layout.dtype, c.head_dim);
    plan_.build(batch, c.n_heads, fast, sm_count_, c.n_kv_heads);
    const int64_t n = plan_.n_tokens();
    reserve(n, plan_.n_logit_rows());
    ensure(attention_workspace_, plan_.attention_workspace_bytes(c.n_heads, c.head_dim));
    plan_.upload(stream_.get());
    run_layers(kv, n);
    finish(out, batch.size());
  }

 private:
  void reserve(int64_t n, int64_t rows) {
    const ModelConfig& c = model_.config();
    const int64_t es = kernels::dtype_bytes(type_);
    ensure(x_, static_cast<size_t>(n * c.n_embd * 4));
    ensure(xn_, static_cast<size_t>(std::max(n, rows) * c.n_embd * es));
    ensure(qkv_, static_cast<size_t>(n * (c.q_dim() + 2 * c.kv_dim()) * 4));
    ensure(q_, static_cast<size_t>(n * c.q_dim() * es));
    ensure(attn_, static_cast<size_t>(n * c.q_dim() * es));
    ensure(gate_up_, static_cast<size_t>(n * 2 * c.n_ff * 4));
    ensure(hidden_, static_cast<size_t>(n * c.n_ff * es));
    ensure(logits_, static_cast<size_t>(std::max<int64_t>(rows, 1) * c.n_vocab * 4));
    ensure(sampled_, static_cast<size_t>(std::max(plan_.n_samples(), 1)) * 8);
  }

  void run_layers(const kernels::PagedKvView& kv, int64_t n) {
    const ModelConfig& c = model_.config();
    cudaStream_t s = stream_.get();
    const kernels::PagedBatch batch = plan_.paged_batch();
    const kernels::QkvShape shape{c.n_heads, c.n_kv_heads, c.head_dim, c.n_rot, c.rope_style};
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    float* x = x_.as<float>();

    kernels::embedding_gather_cuda(weights_.token_embd.get(), type_, plan_.ids(), n, c.n_embd, x, s);
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      const cuda::DeviceLayer& w = weights_.layers[static_cast<size_t>(layer)];
      kernels::rmsnorm_cuda(x, w.attn_norm.as<float>(), xn_.get(), type_, nullptr, n, c.n_embd, c.rms_eps, s);
      cublas_->matmul(w.qkv.get(), type_, xn_.get(), n, c.n_embd, shape.row(), qkv_.as<float>(), 0.0f);
      kernels::qkv_rope_store_cuda(qkv_.as<float>(), w.qkv_bias.as<float>(), shape, weights_.inv_freq.as<float>(), kv,
                                   batch, layer, q_.get(), type_, s);
      kernels::paged_attention_cuda(q_.get(), attn_.get(), kv, batch, plan_.attention(attention_workspace_.as<float>()),
                                    layer, c.n_heads, scale, s);
      cublas_->matmul(w.attn_output.get(), type_, attn_.get(), n, c.q_dim(), c.n_embd, x, 1.0f);
      kernels::rmsnorm_cuda(x, w.ffn_norm.as<float>(), xn_.get(), type_, nullptr, n, c.n_embd, c.rms_eps, s);
      cublas_->matmul(w.gate_up.get(), type_, xn_.get(), n, c.n_embd, 2 * int64_t{c.n_ff}, gate_up_.as<float>(), 0.0f);
      kernels::swiglu_cuda(gate_up_.as<float>(), hidden_.get(), type_, n, c.n_ff, s);
      cublas_->matmul(w.down.get(), type_, hidden_.get(), n, c.n_ff, c.n_embd, x, 1.0f);
    }
    const int32_t rows = plan_.n_logit_rows();
    if (rows == 0) return;
    kernels::rmsnorm_cuda(x, weights_.output_norm.as<float>(), xn_.get(), type_, plan_.logit_rows(), rows, c.n_embd,
                          c.rms_eps, s);
    cublas_->matmul(weights_.output_matrix(), type_, xn_.get(), rows, c.n_embd, c.n_vocab, logits_.as<float>(), 0.0f);
    if (plan_.n_samples() > 0) {
      float* sample_logits = logits_.as<float>() + static_cast<int64_t>(plan_.n_host_rows()) * c.n_vocab;
      kernels::sample_cuda(sample_logits, plan_.n_samples(), c.n_vocab, plan_.configs(), plan_.seen(),
                           plan_.seen_offsets(), plan_.steps(), sampled_.as<int32_t>(),
                           sampled_.as<float>() + plan_.n_samples(), s);
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
    const int32_t samples = plan_.n_samples();
    std::vector<int32_t> tokens(static_cast<size_t>(samples));
    std::vector<float> logprobs(static_cast<size_t>(samples));
    if (samples > 0) {
      kernels::check(cudaMemcpyAsync(tokens.data(), sampled_.get(), tokens.size() * 4, cudaMemcpyDeviceToHost, s));
      kernels::check(cudaMemcpyAsync(logprobs.data(), sampled_.as<float>() + samples, logprobs.size() * 4,
                                     cudaMemcpyDeviceToHost, s));
    }
    stream_.synchronize();
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
  int sm_count_ = 0;
  std::string device_name_;
  DType type_;
  kernels::Stream stream_;
  cuda::DeviceWeights weights_;
  std::unique_ptr<cuda::CublasHandle> cublas_;
  cuda::StepPlan plan_;
  DeviceBuffer x_, xn_, qkv_, q_, attn_, gate_up_, hidden_, logits_, sampled_, attention_workspace_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const Model& model, int device) {
  if (!kernels::cuda_device_available()) {
    throw std::runtime_error("the cuda backend needs a CUDA device, and none is usable here");
  }
  return std::make_unique<CudaBackend>(model, device);
}

}  // namespace den::engine
