// GGUF v3 writer: metadata, tensor table and tensor data streamed in chunks, written to a
// temporary file, flushed, and renamed into place so a crash never leaves a half file under
// the final name. Used by `den model new` and by tests that build small models.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "den/engine/gguf.h"
#include "den/kernels/tensor_type.h"

namespace den::engine {

class GgufWriter {
 public:
  void set_u32(std::string key, uint32_t value);
  void set_i32(std::string key, int32_t value);
  void set_f32(std::string key, float value);
  void set_bool(std::string key, bool value);
  void set_string(std::string key, std::string value);
  void set_string_array(std::string key, std::vector<std::string> values);
  void set_f32_array(std::string key, std::vector<float> values);
  void set_i32_array(std::string key, std::vector<int32_t> values);
  // Copies a key (any type) from an open file.
  void copy_key(const GgufFile& from, std::string_view key);

  // dims innermost first (dims[0] = row length).
  void add_tensor(std::string name, kernels::TensorType type, std::vector<int64_t> dims);

  // Called for consecutive whole-row chunks of each tensor: fill(tensor_index, first_row, bytes).
  using FillFn = std::function<void(size_t tensor, int64_t first_row, std::span<uint8_t> bytes)>;
  // Called after each chunk with bytes written so far and in total.
  using ProgressFn = std::function<void(uint64_t done_bytes, uint64_t total_bytes)>;
  // Throws std::runtime_error naming the path on any I/O error (the temporary is removed).
  void write(const std::string& path, const FillFn& fill, const ProgressFn& progress = {}) const;

 private:
  struct Entry {
    std::string key;
    std::vector<uint8_t> encoded;  // type id + value, GGUF-encoded
  };
  struct TensorEntry {
    std::string name;
    kernels::TensorType type;
    std::vector<int64_t> dims;
  };
  void put(std::string key, std::vector<uint8_t> encoded);

  std::vector<Entry> entries_;
  std::vector<TensorEntry> tensors_;
};

}  // namespace den::engine
