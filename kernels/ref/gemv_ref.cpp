// CPU twin of the fused small-batch GEMV: RMSNorm, the product, then the epilogue, each by the
// reference ops (see den/kernels/gemv.h).
#include <cmath>
#include <cstring>
#include <vector>

#include "den/kernels/gemv.h"
#include "den/kernels/half.h"
#include "den/kernels/matmul.h"
#include "den/kernels/rmsnorm.h"
#include "den/kernels/swiglu.h"

namespace den::kernels {
namespace {

float element(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::f32:
      return static_cast<const float*>(base)[i];
    case DType::f16:
      return fp16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.0f;
}

void put(void* base, DType t, int64_t i, float v) {
  switch (t) {
    case DType::f32:
      static_cast<float*>(base)[i] = v;
      return;
    case DType::f16:
      static_cast<uint16_t*>(base)[i] = f32_to_fp16(v);
      return;
    case DType::bf16:
      static_cast<uint16_t*>(base)[i] = f32_to_bf16(v);
      return;
  }
}

}  // namespace

void gemv_ref(const void* weights, DType wt, int64_t n_in, int64_t n_out, const GemvInput& input, int32_t n_tokens,
              GemvEpilogue epilogue, void* y, const GemvRopeRef* rope) {
  // Inputs as float rows (normalised when asked, by rmsnorm_ref: the CPU backend's norm).
  std::vector<float> x(static_cast<size_t>(n_tokens * n_in));
  for (int32_t t = 0; t < n_tokens; ++t) {
    const int64_t row = input.rows != nullptr ? input.rows[t] : t;
    if (input.norm_weight != nullptr && input.embed_ids != nullptr) {
      // The embedding row, in float, is the residual stream and the norm's input.
      float* residual = input.embed_out + row * n_in;
      for (int64_t k = 0; k < n_in; ++k) residual[k] = element(input.x, wt, int64_t{input.embed_ids[row]} * n_in + k);
      rmsnorm_ref(residual, input.norm_weight, x.data() + t * n_in, 1, n_in, input.eps);
    } else if (input.norm_weight != nullptr) {
      rmsnorm_ref(static_cast<const float*>(input.x) + row * n_in, input.norm_weight, x.data() + t * n_in, 1, n_in,
                  input.eps);
    } else {
      for (int64_t k = 0; k < n_in; ++k) x[static_cast<size_t>(t * n_in + k)] = element(input.x, wt, row * n_in + k);
    }
  }
  std::vector<float> w_row(static_cast<size_t>(n_in));
  std::vector<float> out(static_cast<size_t>(n_tokens * n_out));
  for (int64_t r = 0; r < n_out; ++r) {
    for (int64_t k = 0; k < n_in; ++k) w_row[static_cast<size_t>(k)] = element(weights, wt, r * n_in + k);
    for (int32_t t = 0; t < n_tokens; ++t) {
      out[static_cast<size_t>(t * n_out + r)] = dot_ref(w_row.data(), x.data() + t * n_in, n_in);
    }
  }
  switch (epilogue) {
    case GemvEpilogue::store:
      std::memcpy(y, out.data(), out.size() * sizeof(float));
      return;
    case GemvEpilogue::accumulate:
      for (size_t i = 0; i < out.size(); ++i) static_cast<float*>(y)[i] += out[i];
      return;
    case GemvEpilogue::swiglu: {
      const int64_t n_ff = n_out / 2;
      std::vector<float> h(static_cast<size_t>(n_ff));
      for (int32_t t = 0; t < n_tokens; ++t) {
        swiglu_ref(out.data() + t * n_out, out.data() + t * n_out + n_ff, h.data(), n_ff);
        for (int64_t i = 0; i < n_ff; ++i) put(y, wt, t * n_ff + i, h[static_cast<size_t>(i)]);
      }
      return;
    }
    case GemvEpilogue::rope_store: {
      std::vector<float> q(static_cast<size_t>(n_tokens) * rope->shape.q_dim());
      qkv_rope_store_ref(out.data(), rope->bias, rope->shape, rope->inv_freq, rope->kv, rope->sequences,
                         rope->token_seq, rope->token_pos, n_tokens, rope->layer, q.data());
      for (size_t i = 0; i < q.size(); ++i) put(y, wt, static_cast<int64_t>(i), q[i]);
      return;
    }
  }
}

}  // namespace den::kernels
