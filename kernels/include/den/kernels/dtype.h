// Element types of activations, KV pages and device weights: float32, IEEE half, bfloat16.
// Used wherever a buffer's element type is a run-time choice (KV pools, weight uploads).
#pragma once

#include <cstdint>
#include <string_view>

#include "den/kernels/host_device.h"

namespace den::kernels {

enum class DType : uint8_t { f32, f16, bf16 };

DEN_HOST_DEVICE inline int64_t dtype_bytes(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

inline std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "f32";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
  }
  return "f32";
}

}  // namespace den::kernels
