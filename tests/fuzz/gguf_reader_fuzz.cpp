// libFuzzer target for the GGUF reader (engine/src/gguf.cpp): arbitrary bytes are opened as a
// GGUF file (a memfd, so the reader maps a real file). Beyond "no crash, no leak" it checks
// what callers rely on: only GgufError escapes; every tensor lies inside the file, after the
// header, with the size its type and shape imply; every typed accessor on every key either
// answers or throws GgufError; and a file that opens survives a rewrite by GgufWriter (copy_key
// of every key, every tensor's bytes) unchanged. Run by scripts/fuzz.
#include <cstring>
#include <exception>
#include <functional>
#include <string>

#include "den/engine/gguf.h"
#include "den/engine/gguf_writer.h"
#include "fuzz_support.h"

namespace {

using den::engine::GgufError;
using den::engine::GgufFile;
using den::engine::GgufTensor;
using den::engine::GgufType;
using den::engine::GgufValue;
using den::engine::GgufWriter;
namespace kernels = den::kernels;

void require(bool condition, const char* what) { den::fuzz::require(condition, "gguf_reader_fuzz", what); }

// Runs `f`, which may throw GgufError and nothing else.
template <typename F>
void attempt(F&& f) {
  try {
    f();
  } catch (const GgufError&) {
  }
}

void exercise_accessors(const GgufFile& file) {
  // (no structured bindings: clang 14 cannot capture them in the lambdas)
  for (const auto& entry : file.metadata()) {
    const std::string& key = entry.first;
    const GgufValue& value = entry.second;
    require(file.find(key) == &value, "find() does not return the stored value");
    attempt([&] { file.get_int_opt(key); });
    attempt([&] { file.get_float_opt(key); });
    attempt([&] { file.get_bool_or(key, false); });
    attempt([&] {
      const auto text = file.get_string_opt(key);
      require(!text || (value.type == GgufType::string && *text == value.str), "get_string_opt of a non-string");
    });
    attempt([&] {
      const auto strings = file.get_string_array(key);
      require(strings.size() == value.array_count, "a string array's length differs from its count");
    });
    attempt([&] { require(file.get_float_array(key).size() == value.array_count, "a float array's length"); });
    attempt([&] { require(file.get_int_array(key).size() == value.array_count, "an int array's length"); });
  }
  attempt([&] { file.get_int("general.absent"); });
}

void check_tensors(const GgufFile& file) {
  const uint64_t alignment = file.alignment();
  require(alignment != 0 && (alignment & (alignment - 1)) == 0, "the alignment is not a power of two");
  const uint8_t* begin = file.bytes().data();
  const uint8_t* end = begin + file.bytes().size();
  for (const GgufTensor& tensor : file.tensors()) {
    require(!tensor.dims.empty() && tensor.dims.size() <= 4, "a tensor has 0 or more than 4 dimensions");
    int64_t elements = 1;
    for (int64_t dim : tensor.dims) elements *= dim;
    require(elements == tensor.n_elements, "n_elements is not the product of the dimensions");
    require(kernels::row_elements_fit_blocks(tensor.type, tensor.dims[0]), "rows are not whole blocks");
    require(tensor.n_bytes == kernels::row_bytes(tensor.type, tensor.n_elements), "n_bytes disagrees with the type");
    require(file.header_bytes() % alignment == 0, "the data section is not aligned");
    require(tensor.data >= begin + file.header_bytes() && tensor.n_bytes <= end - tensor.data,
            "a tensor lies outside the data section");
    require(file.find_tensor(tensor.name) == &tensor, "find_tensor() does not return the tensor");
    // Touch every byte: a mapping that is shorter than the file claims faults here.
    uint8_t sum = 0;
    for (int64_t k = 0; k < tensor.n_bytes; ++k) sum = static_cast<uint8_t>(sum + tensor.data[k]);
    volatile uint8_t sink = sum;
    (void)sink;
  }
}

bool same_value(const GgufValue& a, const GgufValue& b) {
  if (a.type != b.type) return false;
  switch (a.type) {
    case GgufType::string:
      return a.str == b.str;
    case GgufType::array:
      if (a.array_type != b.array_type || a.array_count != b.array_count) return false;
      if (a.array_type == GgufType::string) return a.array_strings == b.array_strings;
      return std::memcmp(a.array_data, b.array_data, a.array_count * den::engine::gguf_scalar_size(a.array_type)) == 0;
    default:  // bitwise, so that NaNs compare equal to themselves
      return a.u == b.u && a.i == b.i && std::memcmp(&a.f, &b.f, sizeof a.f) == 0;
  }
}

// The writer always emits its own general.alignment; nested arrays are not copied (documented).
bool copied_by_writer(const std::string& key, const GgufValue& value) {
  return key != "general.alignment" && !(value.type == GgufType::array && value.array_type == GgufType::array);
}

void check_rewrite(const GgufFile& file, const std::string& copy_path) {
  GgufWriter writer;
  size_t copied = 0;
  for (const auto& [key, value] : file.metadata()) {
    if (!copied_by_writer(key, value)) continue;
    writer.copy_key(file, key);
    ++copied;
  }
  for (const GgufTensor& tensor : file.tensors()) writer.add_tensor(tensor.name, tensor.type, tensor.dims);
  const GgufWriter::FillFn fill = [&](size_t index, int64_t first_row, std::span<uint8_t> bytes) {
    const GgufTensor& tensor = file.tensors()[index];
    const int64_t row_bytes = kernels::row_bytes(tensor.type, tensor.dims[0]);
    require(first_row >= 0 && (first_row * row_bytes) + static_cast<int64_t>(bytes.size()) <= tensor.n_bytes,
            "the writer asked for rows past the end of a tensor");
    std::memcpy(bytes.data(), tensor.data + first_row * row_bytes, bytes.size());
  };
  writer.write(copy_path, fill);

  // Not through the caller's catch: a file the writer made must always read back.
  const GgufFile copy = [&] {
    try {
      return GgufFile(copy_path);
    } catch (const GgufError& e) {
      std::fprintf(stderr, "gguf_reader_fuzz: %s\n", e.what());
      den::fuzz::require(false, "gguf_reader_fuzz", "the rewritten file does not read back");
      std::abort();
    }
  }();
  require(copy.metadata().size() == copied + 1, "the rewritten file has other keys");  // + general.alignment
  for (const auto& [key, value] : file.metadata()) {
    if (!copied_by_writer(key, value)) continue;
    const GgufValue* copied_value = copy.find(key);
    require(copied_value != nullptr && same_value(value, *copied_value), "a key changed in the rewrite");
  }
  require(copy.tensors().size() == file.tensors().size(), "the rewrite has another tensor count");
  for (size_t t = 0; t < file.tensors().size(); ++t) {
    const GgufTensor& a = file.tensors()[t];
    const GgufTensor& b = copy.tensors()[t];
    require(a.name == b.name && a.type == b.type && a.dims == b.dims && a.n_bytes == b.n_bytes,
            "a tensor descriptor changed in the rewrite");
    require(std::memcmp(a.data, b.data, static_cast<size_t>(a.n_bytes)) == 0, "tensor bytes changed in the rewrite");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static den::fuzz::MemoryFile input;
  static den::fuzz::ScratchDirectory scratch;
  input.assign(data, size);
  try {
    const GgufFile file(input.path());
    exercise_accessors(file);
    check_tensors(file);
    check_rewrite(file, (scratch.path() / "copy.gguf").string());
  } catch (const GgufError&) {
    // Malformed input, reported as such: the expected outcome for most inputs.
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gguf_reader_fuzz: unexpected exception: %s\n", e.what());
    std::abort();
  }
  return 0;
}
