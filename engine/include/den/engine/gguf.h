// GGUF (v2, v3) reader: memory-mapped, every offset and size bounds-checked before use.
// Exposes GgufFile (metadata key/values and tensor descriptors pointing into the mapping).
// Used by model loading, the tokenizer (vocabulary-only files too) and `den model info`.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "den/engine/mapped_file.h"
#include "den/kernels/tensor_type.h"

namespace den::engine {

// Every error names the file and what was wrong where.
class GgufError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class GgufType : uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12,
};

std::string_view gguf_type_name(GgufType type);
// Bytes of one scalar of `type` (0 for string and array).
size_t gguf_scalar_size(GgufType type);

// One metadata value. Scalars are decoded; arrays keep their element type and point into the
// mapping (strings are decoded to views). Views stay valid while the GgufFile lives.
struct GgufValue {
  GgufType type = GgufType::u8;
  // scalars
  uint64_t u = 0;  // unsigned integers and bool
  int64_t i = 0;   // signed integers
  double f = 0;    // floats
  std::string_view str;
  // arrays
  GgufType array_type = GgufType::u8;
  uint64_t array_count = 0;
  const uint8_t* array_data = nullptr;         // numeric arrays: packed little-endian elements
  std::vector<std::string_view> array_strings;  // string arrays
};

struct GgufTensor {
  std::string name;
  kernels::TensorType type = kernels::TensorType::f32;
  std::vector<int64_t> dims;  // innermost first, as GGUF stores them (dims[0] = row length)
  uint64_t offset = 0;        // relative to the data section
  const uint8_t* data = nullptr;
  int64_t n_elements = 0;
  int64_t n_bytes = 0;

  int64_t rows() const { return dims.empty() ? 0 : n_elements / dims[0]; }
  std::string shape_string() const;
};

class GgufFile {
 public:
  // Throws GgufError for anything malformed, truncated or unsupported.
  explicit GgufFile(const std::string& path);

  const std::string& path() const { return mapping_.path(); }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_bytes() const { return mapping_.bytes().size(); }
  // Bytes from the start of the file to the first tensor byte (header, metadata, tensor infos).
  uint64_t header_bytes() const { return data_offset_; }

  const std::map<std::string, GgufValue, std::less<>>& metadata() const { return metadata_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }

  const GgufValue* find(std::string_view key) const;
  const GgufTensor* find_tensor(std::string_view name) const;

  // Typed accessors; the *_or variants return the fallback when the key is absent, and all
  // throw GgufError naming the key when it is present with the wrong type.
  int64_t get_int(std::string_view key) const;
  std::optional<int64_t> get_int_opt(std::string_view key) const;
  double get_float(std::string_view key) const;
  std::optional<double> get_float_opt(std::string_view key) const;
  bool get_bool_or(std::string_view key, bool fallback) const;
  std::string_view get_string(std::string_view key) const;
  std::optional<std::string_view> get_string_opt(std::string_view key) const;
  std::span<const std::string_view> get_string_array(std::string_view key) const;
  std::vector<float> get_float_array(std::string_view key) const;
  std::vector<int32_t> get_int_array(std::string_view key) const;

  // The raw bytes of the file (for fingerprinting).
  std::span<const uint8_t> bytes() const { return mapping_.bytes(); }

 private:
  [[noreturn]] void fail_key(std::string_view key, std::string_view expected, const GgufValue& value) const;

  MappedFile mapping_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue, std::less<>> metadata_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace den::engine
