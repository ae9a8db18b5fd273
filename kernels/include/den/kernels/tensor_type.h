// Element and block formats of weight tensors (the GGUF formats Den reads) and their sizes.
// Exposes TensorType plus row-size arithmetic; used by the GGUF reader, dequantizers and
// the matrix-product references.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace den::kernels {

// Values are GGUF's ggml_type ids so the reader can map them one to one.
enum class TensorType : uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q8_0 = 8,
  q4_k = 12,
  q6_k = 14,
  bf16 = 30,
};

struct TensorTypeTraits {
  std::string_view name;
  int64_t block_elements;  // elements per quantization block (1 for plain floats)
  int64_t block_bytes;     // bytes per block
};

// Traits of a supported type; std::nullopt for a GGUF id Den does not support.
std::optional<TensorTypeTraits> tensor_type_traits(uint32_t ggml_type_id);
TensorTypeTraits traits(TensorType type);
std::string_view name(TensorType type);

// Space-separated list of supported type names, for error messages.
std::string_view supported_tensor_type_names();

// Bytes of a row of n elements; n must be a multiple of the block size (checked by callers
// that read untrusted files: see row_elements_fit_blocks).
inline int64_t row_bytes(TensorType type, int64_t n_elements) {
  const TensorTypeTraits t = traits(type);
  return n_elements / t.block_elements * t.block_bytes;
}
inline bool row_elements_fit_blocks(TensorType type, int64_t n_elements) {
  return n_elements % traits(type).block_elements == 0;
}

}  // namespace den::kernels
