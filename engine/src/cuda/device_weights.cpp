// Weight upload: rows are expanded to float on the host (the CPU reference dequantizers),
// rounded to the compute type, staged in pinned memory and copied in large chunks.
#include "device_weights.h"

#include <algorithm>
#include <cstring>

#include "den/engine/thread_pool.h"
#include "den/kernels/dequantize.h"
#include "den/kernels/half.h"

namespace den::engine::cuda {
namespace {

constexpr size_t kStagingBytes = size_t{64} << 20;

class Uploader {
 public:
  Uploader(kernels::DType type, cudaStream_t stream, int n_threads)
      : type_(type), stream_(stream), pool_(n_threads), staging_{kernels::PinnedBuffer(kStagingBytes),
                                                                   kernels::PinnedBuffer(kStagingBytes)} {}

  // Writes the rows of `w` at `dst` (row-major, converted to the compute type).
  void rows(const kernels::WeightMatrix& w, void* dst) {
    const int64_t out_row = w.n_in * kernels::dtype_bytes(type_);
    const int64_t rows_per_chunk = std::max<int64_t>(1, static_cast<int64_t>(kStagingBytes) / out_row);
    const int64_t in_row = kernels::row_bytes(w.type, w.n_in);
    const bool raw_copy = same_format(w.type);
    for (int64_t r0 = 0; r0 < w.n_out; r0 += rows_per_chunk) {
      const int64_t n = std::min(rows_per_chunk, w.n_out - r0);
      // Alternate staging buffers: converting chunk i overlaps the copy of chunk i - 1.
      kernels::PinnedBuffer& buf = staging_[turn_];
      kernels::Event& done = copied_[turn_];
      done.synchronize();
      auto* out = static_cast<uint8_t*>(buf.get());
      const auto* in = static_cast<const uint8_t*>(w.data) + r0 * in_row;
      if (raw_copy) {
        std::memcpy(out, in, static_cast<size_t>(n * out_row));
      } else {
        pool_.parallel_for(n, [&](int64_t b, int64_t e, int) {
          std::vector<float> tmp(static_cast<size_t>(w.n_in));
          for (int64_t r = b; r < e; ++r) {
            kernels::dequantize_row_ref(w.type, in + r * in_row, tmp.data(), w.n_in);
            convert(tmp.data(), out + r * out_row, w.n_in);
          }
        });
      }
      kernels::check(cudaMemcpyAsync(static_cast<uint8_t*>(dst) + r0 * out_row, out, static_cast<size_t>(n * out_row),
                                     cudaMemcpyHostToDevice, stream_));
      done.record(stream_);
      turn_ ^= 1;
    }
  }

  kernels::DeviceBuffer floats(const std::vector<float>& v) {
    kernels::DeviceBuffer buf(v.size() * sizeof(float));
    kernels::check(cudaMemcpyAsync(buf.get(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
    kernels::check(cudaStreamSynchronize(stream_));  // v may die right after
    return buf;
  }

  void finish() { kernels::check(cudaStreamSynchronize(stream_)); }

 private:
  bool same_format(kernels::TensorType t) const {
    return (t == kernels::TensorType::f32 && type_ == kernels::DType::f32) ||
           (t == kernels::TensorType::f16 && type_ == kernels::DType::f16) ||
           (t == kernels::TensorType::bf16 && type_ == kernels::DType::bf16);
  }

  void convert(const float* in, uint8_t* out, int64_t n) const {
    switch (type_) {
      case kernels::DType::f32:
        std::memcpy(out, in, static_cast<size_t>(n) * 4);
        return;
      case kernels::DType::f16: {
        auto* o = reinterpret_cast<uint16_t*>(out);
        for (int64_t i = 0; i < n; ++i) o[i] = kernels::f32_to_fp16(in[i]);
        return;
      }
      case kernels::DType::bf16: {
        auto* o = reinterpret_cast<uint16_t*>(out);
        for (int64_t i = 0; i < n; ++i) o[i] = kernels::f32_to_bf16(in[i]);
        return;
      }
    }
  }

  kernels::DType type_;
  cudaStream_t stream_;
  ThreadPool pool_;
  kernels::PinnedBuffer staging_[2];
  kernels::Event copied_[2];
  int turn_ = 0;
};

kernels::DeviceBuffer matrix_buffer(int64_t rows, int64_t cols, kernels::DType type, int64_t& total) {
  const int64_t bytes = rows * cols * kernels::dtype_bytes(type);
  total += bytes;
  return kernels::DeviceBuffer(static_cast<size_t>(bytes));
}

}  // namespace

kernels::DType compute_type_of(const Model& model) {
  switch (model.layers().front().attn_q.type) {
    case kernels::TensorType::f32:
      return kernels::DType::f32;
    case kernels::TensorType::f16:
      return kernels::DType::f16;
    default:
      return kernels::DType::bf16;
  }
}

DeviceWeights upload_weights(const Model& model, kernels::DType type, cudaStream_t stream, int n_threads) {
  const ModelConfig& c = model.config();
  Uploader up(type, stream, n_threads);
  DeviceWeights w;
  w.type = type;
  const int64_t esize = kernels::dtype_bytes(type);

  w.token_embd = matrix_buffer(c.n_vocab, c.n_embd, type, w.bytes);
  up.rows(model.token_embd(), w.token_embd.get());
  if (!c.tied_output) {
    w.output = matrix_buffer(c.n_vocab, c.n_embd, type, w.bytes);
    up.rows(model.output(), w.output.get());
  }
  w.output_norm = up.floats(model.output_norm());
  w.inv_freq = up.floats(kernels::rope_inverse_frequencies(
      c.n_rot, c.rope_base, kernels::RopeScaling{c.rope_freq_scale, c.rope_freq_factors}));

  for (const LayerWeights& l : model.layers()) {
    DeviceLayer d;
    d.attn_norm = up.floats(l.attn_norm);
    d.ffn_norm = up.floats(l.ffn_norm);
    const int64_t qkv_rows = c.q_dim() + 2 * c.kv_dim();
    d.qkv = matrix_buffer(qkv_rows, c.n_embd, type, w.bytes);
    auto* qkv = static_cast<uint8_t*>(d.qkv.get());
    up.rows(l.attn_q, qkv);
    up.rows(l.attn_k, qkv + int64_t{c.q_dim()} * c.n_embd * esize);
    up.rows(l.attn_v, qkv + (int64_t{c.q_dim()} + c.kv_dim()) * c.n_embd * esize);
    if (c.qkv_bias) {
      std::vector<float> bias(l.bias_q);
      bias.insert(bias.end(), l.bias_k.begin(), l.bias_k.end());
      bias.insert(bias.end(), l.bias_v.begin(), l.bias_v.end());
      d.qkv_bias = up.floats(bias);
    }
    d.attn_output = matrix_buffer(c.n_embd, c.q_dim(), type, w.bytes);
    up.rows(l.attn_output, d.attn_output.get());
    d.gate_up = matrix_buffer(2 * int64_t{c.n_ff}, c.n_embd, type, w.bytes);
    up.rows(l.ffn_gate, d.gate_up.get());
    up.rows(l.ffn_up, static_cast<uint8_t*>(d.gate_up.get()) + int64_t{c.n_ff} * c.n_embd * esize);
    d.down = matrix_buffer(c.n_embd, c.n_ff, type, w.bytes);
    up.rows(l.ffn_down, d.down.get());
    w.layers.push_back(std::move(d));
  }
  up.finish();
  return w;
}

}  // namespace den::engine::cuda
