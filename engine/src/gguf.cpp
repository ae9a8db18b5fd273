// GGUF reader. A Cursor walks the mapped bytes; every read checks the remaining length first,
// so no malformed count, length or offset can make the reader touch memory outside the file.
#include "den/engine/gguf.h"

#include <bit>
#include <cstring>
#include <limits>

namespace den::engine {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint32_t kMaxDims = 4;
// A key or tensor name longer than this is corruption, not data.
constexpr uint64_t kMaxNameBytes = 1u << 16;
// Arrays nest at most this deep (GGUF writers never nest; the bound stops recursion bombs).
constexpr int kMaxArrayDepth = 2;

}  // namespace

size_t gguf_scalar_size(GgufType type) {
  switch (type) {
    case GgufType::u8:
    case GgufType::i8:
    case GgufType::boolean:
      return 1;
    case GgufType::u16:
    case GgufType::i16:
      return 2;
    case GgufType::u32:
    case GgufType::i32:
    case GgufType::f32:
      return 4;
    case GgufType::u64:
    case GgufType::i64:
    case GgufType::f64:
      return 8;
    case GgufType::string:
    case GgufType::array:
      return 0;
  }
  return 0;
}

namespace {

bool valid_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::f64); }

class Cursor {
 public:
  Cursor(std::span<const uint8_t> bytes, const std::string& path) : bytes_(bytes), path_(path) {}

  size_t position() const { return pos_; }
  size_t remaining() const { return bytes_.size() - pos_; }
  const uint8_t* here() const { return bytes_.data() + pos_; }

  [[noreturn]] void fail(const std::string& what) const {
    throw GgufError("invalid GGUF file '" + path_ + "': " + what + " (at byte " + std::to_string(pos_) + " of " +
                    std::to_string(bytes_.size()) + ")");
  }

  void need(uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      fail("truncated while reading " + std::string(what) + ": needs " + std::to_string(n) + " bytes, " +
           std::to_string(remaining()) + " left");
    }
  }

  template <typename T>
  T read(std::string_view what) {
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, here(), sizeof(T));
    pos_ += sizeof(T);
    return value;
  }

  std::string_view read_string(std::string_view what, uint64_t max_bytes = std::numeric_limits<uint64_t>::max()) {
    const auto length = read<uint64_t>(what);
    if (length > max_bytes) fail(std::string(what) + " has implausible length " + std::to_string(length));
    need(length, what);
    std::string_view s(reinterpret_cast<const char*>(here()), static_cast<size_t>(length));
    pos_ += static_cast<size_t>(length);
    return s;
  }

  void skip(uint64_t n, std::string_view what) {
    need(n, what);
    pos_ += static_cast<size_t>(n);
  }

 private:
  std::span<const uint8_t> bytes_;
  const std::string& path_;
  size_t pos_ = 0;
};

void read_value(Cursor& cursor, GgufType type, GgufValue& out, const std::string& key, int depth) {
  out.type = type;
  switch (type) {
    case GgufType::u8:
      out.u = cursor.read<uint8_t>(key);
      return;
    case GgufType::i8:
      out.i = cursor.read<int8_t>(key);
      return;
    case GgufType::u16:
      out.u = cursor.read<uint16_t>(key);
      return;
    case GgufType::i16:
      out.i = cursor.read<int16_t>(key);
      return;
    case GgufType::u32:
      out.u = cursor.read<uint32_t>(key);
      return;
    case GgufType::i32:
      out.i = cursor.read<int32_t>(key);
      return;
    case GgufType::u64:
      out.u = cursor.read<uint64_t>(key);
      return;
    case GgufType::i64:
      out.i = cursor.read<int64_t>(key);
      return;
    case GgufType::f32:
      out.f = cursor.read<float>(key);
      return;
    case GgufType::f64:
      out.f = cursor.read<double>(key);
      return;
    case GgufType::boolean: {
      const auto b = cursor.read<uint8_t>(key);
      if (b > 1) cursor.fail("key '" + key + "': boolean value " + std::to_string(b) + " is neither 0 nor 1");
      out.u = b;
      return;
    }
    case GgufType::string:
      out.str = cursor.read_string("value of key '" + key + "'");
      return;
    case GgufType::array: {
      if (depth >= kMaxArrayDepth) cursor.fail("key '" + key + "': arrays nested too deeply");
      const auto elem = cursor.read<uint32_t>(key);
      if (!valid_type(elem)) cursor.fail("key '" + key + "': unknown array element type " + std::to_string(elem));
      out.array_type = static_cast<GgufType>(elem);
      out.array_count = cursor.read<uint64_t>(key);
      if (out.array_type == GgufType::string) {
        // Each string needs at least its 8-byte length: bound the count before reserving.
        if (out.array_count > cursor.remaining() / 8) {
          cursor.fail("key '" + key + "': string array of " + std::to_string(out.array_count) +
                      " elements cannot fit in the file");
        }
        out.array_strings.reserve(static_cast<size_t>(out.array_count));
        for (uint64_t k = 0; k < out.array_count; ++k) {
          out.array_strings.push_back(cursor.read_string("element " + std::to_string(k) + " of key '" + key + "'"));
        }
      } else if (out.array_type == GgufType::array) {
        // Nested arrays are legal GGUF but unused by any model key; parse and drop them.
        if (out.array_count > cursor.remaining() / 12) cursor.fail("key '" + key + "': nested array count too large");
        for (uint64_t k = 0; k < out.array_count; ++k) {
          GgufValue nested;
          read_value(cursor, GgufType::array, nested, key, depth + 1);
        }
      } else {
        const uint64_t size = gguf_scalar_size(out.array_type);
        if (out.array_count > cursor.remaining() / size) {
          cursor.fail("key '" + key + "': array of " + std::to_string(out.array_count) + " " +
                      std::string(gguf_type_name(out.array_type)) + " cannot fit in the file");
        }
        out.array_data = cursor.here();
        cursor.skip(out.array_count * size, key);
      }
      return;
    }
  }
}

bool is_integer(GgufType t) {
  switch (t) {
    case GgufType::u8:
    case GgufType::i8:
    case GgufType::u16:
    case GgufType::i16:
    case GgufType::u32:
    case GgufType::i32:
    case GgufType::u64:
    case GgufType::i64:
      return true;
    default:
      return false;
  }
}

bool is_signed(GgufType t) {
  return t == GgufType::i8 || t == GgufType::i16 || t == GgufType::i32 || t == GgufType::i64;
}

template <typename T>
T load_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

double array_element_as_double(GgufType type, const uint8_t* p) {
  switch (type) {
    case GgufType::u8:
      return load_le<uint8_t>(p);
    case GgufType::i8:
      return load_le<int8_t>(p);
    case GgufType::u16:
      return load_le<uint16_t>(p);
    case GgufType::i16:
      return load_le<int16_t>(p);
    case GgufType::u32:
      return load_le<uint32_t>(p);
    case GgufType::i32:
      return load_le<int32_t>(p);
    case GgufType::u64:
      return static_cast<double>(load_le<uint64_t>(p));
    case GgufType::i64:
      return static_cast<double>(load_le<int64_t>(p));
    case GgufType::f32:
      return load_le<float>(p);
    case GgufType::f64:
      return load_le<double>(p);
    case GgufType::boolean:
      return load_le<uint8_t>(p) != 0;
    default:
      return 0;
  }
}

}  // namespace

std::string_view gguf_type_name(GgufType type) {
  switch (type) {
    case GgufType::u8:
      return "uint8";
    case GgufType::i8:
      return "int8";
    case GgufType::u16:
      return "uint16";
    case GgufType::i16:
      return "int16";
    case GgufType::u32:
      return "uint32";
    case GgufType::i32:
      return "int32";
    case GgufType::f32:
      return "float32";
    case GgufType::boolean:
      return "bool";
    case GgufType::string:
      return "string";
    case GgufType::array:
      return "array";
    case GgufType::u64:
      return "uint64";
    case GgufType::i64:
      return "int64";
    case GgufType::f64:
      return "float64";
  }
  return "unknown";
}

std::string GgufTensor::shape_string() const {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

GgufFile::GgufFile(const std::string& path) : mapping_(path) {
  Cursor cursor(mapping_.bytes(), path);
  const auto magic = cursor.read<uint32_t>("magic");
  if (magic != kMagic) cursor.fail("not a GGUF file (bad magic; expected the bytes 'GGUF')");
  version_ = cursor.read<uint32_t>("version");
  if (version_ != 2 && version_ != 3) {
    cursor.fail("GGUF version " + std::to_string(version_) + " is not supported (supported: 2, 3)");
  }
  const auto n_tensors = cursor.read<uint64_t>("tensor count");
  const auto n_kv = cursor.read<uint64_t>("metadata count");
  // Every key-value needs at least 12 bytes, every tensor info at least 28.
  if (n_kv > cursor.remaining() / 12) {
    cursor.fail("metadata count " + std::to_string(n_kv) + " cannot fit in the file (truncated or corrupt)");
  }
  if (n_tensors > cursor.remaining() / 28) {
    cursor.fail("tensor count " + std::to_string(n_tensors) + " cannot fit in the file (truncated or corrupt)");
  }

  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key(cursor.read_string("metadata key " + std::to_string(k), kMaxNameBytes));
    const auto type = cursor.read<uint32_t>("type of key '" + key + "'");
    if (!valid_type(type)) cursor.fail("key '" + key + "' has unknown value type " + std::to_string(type));
    GgufValue value;
    read_value(cursor, static_cast<GgufType>(type), value, key, 0);
    if (!metadata_.emplace(key, std::move(value)).second) cursor.fail("metadata key '" + key + "' appears twice");
  }

  if (const GgufValue* a = find("general.alignment")) {
    if (!is_integer(a->type)) fail_key("general.alignment", "an integer", *a);
    const uint64_t alignment = is_signed(a->type) ? static_cast<uint64_t>(a->i) : a->u;
    if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > (1u << 20)) {
      cursor.fail("general.alignment " + std::to_string(alignment) + " is not a power of two up to 1 MiB");
    }
    alignment_ = alignment;
  }

  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t t = 0; t < n_tensors; ++t) {
    GgufTensor tensor;
    tensor.name = std::string(cursor.read_string("name of tensor " + std::to_string(t), kMaxNameBytes));
    const std::string what = "tensor '" + tensor.name + "'";
    const auto n_dims = cursor.read<uint32_t>(what);
    if (n_dims == 0 || n_dims > kMaxDims) {
      cursor.fail(what + " has " + std::to_string(n_dims) + " dimensions (expected 1 to 4)");
    }
    tensor.n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const auto dim = cursor.read<uint64_t>(what);
      if (dim == 0 || dim > (uint64_t{1} << 40)) cursor.fail(what + " has dimension " + std::to_string(dim));
      if (static_cast<uint64_t>(tensor.n_elements) > (uint64_t{1} << 50) / dim) {
        cursor.fail(what + " has more elements than any file can hold");
      }
      tensor.dims.push_back(static_cast<int64_t>(dim));
      tensor.n_elements *= static_cast<int64_t>(dim);
    }
    const auto type_id = cursor.read<uint32_t>(what);
    const auto type_traits = kernels::tensor_type_traits(type_id);
    if (!type_traits) {
      cursor.fail(what + " has type id " + std::to_string(type_id) +
                  ", which Den does not support (supported: " + std::string(kernels::supported_tensor_type_names()) +
                  ")");
    }
    tensor.type = static_cast<kernels::TensorType>(type_id);
    if (tensor.dims[0] % type_traits->block_elements != 0) {
      cursor.fail(what + " of type " + std::string(type_traits->name) + " has rows of " +
                  std::to_string(tensor.dims[0]) + " elements, not a multiple of the block size " +
                  std::to_string(type_traits->block_elements));
    }
    tensor.n_bytes = tensor.n_elements / type_traits->block_elements * type_traits->block_bytes;
    tensor.offset = cursor.read<uint64_t>(what);
    if (tensor.offset % alignment_ != 0) {
      cursor.fail(what + " data offset " + std::to_string(tensor.offset) + " is not aligned to " +
                  std::to_string(alignment_));
    }
    if (tensor_index_.count(tensor.name) != 0) cursor.fail(what + " appears twice");
    tensor_index_.emplace(tensor.name, tensors_.size());
    tensors_.push_back(std::move(tensor));
  }

  // The data section starts at the next multiple of the alignment.
  const uint64_t header_end = cursor.position();
  data_offset_ = (header_end + alignment_ - 1) / alignment_ * alignment_;
  const uint64_t file_size = mapping_.bytes().size();
  if (!tensors_.empty() && data_offset_ > file_size) {
    cursor.fail("the tensor data section would start at byte " + std::to_string(data_offset_) + ", past the end");
  }
  for (GgufTensor& tensor : tensors_) {
    const uint64_t available = file_size - data_offset_;
    if (tensor.offset > available || static_cast<uint64_t>(tensor.n_bytes) > available - tensor.offset) {
      throw GgufError("invalid GGUF file '" + path + "': tensor '" + tensor.name + "' (" +
                      std::string(kernels::name(tensor.type)) + " " + tensor.shape_string() + ", " +
                      std::to_string(tensor.n_bytes) + " bytes at data offset " + std::to_string(tensor.offset) +
                      ") extends past the end of the file (" + std::to_string(file_size) +
                      " bytes); the file is truncated or corrupt");
    }
    tensor.data = mapping_.bytes().data() + data_offset_ + tensor.offset;
  }
}

const GgufValue* GgufFile::find(std::string_view key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const GgufTensor* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

void GgufFile::fail_key(std::string_view key, std::string_view expected, const GgufValue& value) const {
  std::string got(gguf_type_name(value.type));
  if (value.type == GgufType::array) got = "array of " + std::string(gguf_type_name(value.array_type));
  throw GgufError("GGUF file '" + path() + "': key '" + std::string(key) + "' should be " + std::string(expected) +
                  ", found " + got);
}

std::optional<int64_t> GgufFile::get_int_opt(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (!is_integer(v->type)) fail_key(key, "an integer", *v);
  if (is_signed(v->type)) return v->i;
  if (v->u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) fail_key(key, "an integer below 2^63", *v);
  return static_cast<int64_t>(v->u);
}

int64_t GgufFile::get_int(std::string_view key) const {
  auto v = get_int_opt(key);
  if (!v) throw GgufError("GGUF file '" + path() + "': required key '" + std::string(key) + "' is missing");
  return *v;
}

std::optional<double> GgufFile::get_float_opt(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type == GgufType::f32 || v->type == GgufType::f64) return v->f;
  if (is_integer(v->type)) return is_signed(v->type) ? static_cast<double>(v->i) : static_cast<double>(v->u);
  fail_key(key, "a number", *v);
}

double GgufFile::get_float(std::string_view key) const {
  auto v = get_float_opt(key);
  if (!v) throw GgufError("GGUF file '" + path() + "': required key '" + std::string(key) + "' is missing");
  return *v;
}

bool GgufFile::get_bool_or(std::string_view key, bool fallback) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return fallback;
  if (v->type != GgufType::boolean) fail_key(key, "a bool", *v);
  return v->u != 0;
}

std::optional<std::string_view> GgufFile::get_string_opt(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != GgufType::string) fail_key(key, "a string", *v);
  return v->str;
}

std::string_view GgufFile::get_string(std::string_view key) const {
  auto v = get_string_opt(key);
  if (!v) throw GgufError("GGUF file '" + path() + "': required key '" + std::string(key) + "' is missing");
  return *v;
}

std::span<const std::string_view> GgufFile::get_string_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) throw GgufError("GGUF file '" + path() + "': required key '" + std::string(key) + "' is missing");
  if (v->type != GgufType::array || v->array_type != GgufType::string) fail_key(key, "an array of strings", *v);
  return v->array_strings;
}

std::vector<float> GgufFile::get_float_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) throw GgufError("GGUF file '" + path() + "': required key '" + std::string(key) + "' is missing");
  if (v->type != GgufType::array || v->array_data == nullptr ||
      !(v->array_type == GgufType::f32 || v->array_type == GgufType::f64 || is_integer(v->array_type))) {
    fail_key(key, "an array of numbers", *v);
  }
  std::vector<float> out(static_cast<size_t>(v->array_count));
  const size_t size = gguf_scalar_size(v->array_type);
  for (size_t k = 0; k < out.size(); ++k) {
    out[k] = static_cast<float>(array_element_as_double(v->array_type, v->array_data + k * size));
  }
  return out;
}

std::vector<int32_t> GgufFile::get_int_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) throw GgufError("GGUF file '" + path() + "': required key '" + std::string(key) + "' is missing");
  if (v->type != GgufType::array || v->array_data == nullptr || !is_integer(v->array_type)) {
    fail_key(key, "an array of integers", *v);
  }
  std::vector<int32_t> out(static_cast<size_t>(v->array_count));
  const size_t size = gguf_scalar_size(v->array_type);
  for (size_t k = 0; k < out.size(); ++k) {
    const double element = array_element_as_double(v->array_type, v->array_data + k * size);
    // Converting a value outside int32 (or NaN) would be undefined behaviour: such a file is corrupt.
    if (!(element >= std::numeric_limits<int32_t>::min() && element <= std::numeric_limits<int32_t>::max())) {
      throw GgufError("GGUF file '" + path() + "': element " + std::to_string(k) + " of key '" + std::string(key) +
                      "' is " + std::to_string(element) + ", outside the int32 range");
    }
    out[k] = static_cast<int32_t>(element);
  }
  return out;
}

}  // namespace den::engine
