// Traits table of the supported tensor types.
#include "den/kernels/tensor_type.h"

#include <array>
#include <stdexcept>

#include "den/kernels/quant_blocks.h"

namespace den::kernels {
namespace {

struct Entry {
  TensorType type;
  TensorTypeTraits traits;
};

constexpr std::array kTable = {
    Entry{TensorType::f32, {"F32", 1, 4}},
    Entry{TensorType::f16, {"F16", 1, 2}},
    Entry{TensorType::bf16, {"BF16", 1, 2}},
    Entry{TensorType::q8_0, {"Q8_0", kQk, sizeof(BlockQ8_0)}},
    Entry{TensorType::q4_0, {"Q4_0", kQk, sizeof(BlockQ4_0)}},
    Entry{TensorType::q4_1, {"Q4_1", kQk, sizeof(BlockQ4_1)}},
    Entry{TensorType::q4_k, {"Q4_K", kQkK, sizeof(BlockQ4_K)}},
    Entry{TensorType::q6_k, {"Q6_K", kQkK, sizeof(BlockQ6_K)}},
};

}  // namespace

std::optional<TensorTypeTraits> tensor_type_traits(uint32_t ggml_type_id) {
  for (const Entry& e : kTable) {
    if (static_cast<uint32_t>(e.type) == ggml_type_id) return e.traits;
  }
  return std::nullopt;
}

TensorTypeTraits traits(TensorType type) {
  for (const Entry& e : kTable) {
    if (e.type == type) return e.traits;
  }
  throw std::logic_error("traits(): TensorType value not in the table");
}

std::string_view name(TensorType type) { return traits(type).name; }

std::string_view supported_tensor_type_names() { return "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q6_K"; }

}  // namespace den::kernels
