// Deterministic fill on the host (see den/kernels/fill.h).
#include "den/kernels/fill.h"
#include "den/kernels/half.h"
#include "den/kernels/sampling.h"

namespace den::kernels {

void fill_random_ref(void* dst, DType type, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(sampling_uniform(seed, static_cast<uint64_t>(i)) * 2.0 - 1.0) * scale;
    switch (type) {
      case DType::f32:
        static_cast<float*>(dst)[i] = v;
        break;
      case DType::f16:
        static_cast<uint16_t*>(dst)[i] = f32_to_fp16(v);
        break;
      case DType::bf16:
        static_cast<uint16_t*>(dst)[i] = f32_to_bf16(v);
        break;
    }
  }
}

}  // namespace den::kernels
