// GgufWriter implementation.
#include "den/engine/gguf_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace den::engine {
namespace {

constexpr uint64_t kAlignment = 32;
constexpr int64_t kChunkBytes = 64ll << 20;

template <typename T>
void append(std::vector<uint8_t>& out, T value) {
  // resize + memcpy rather than insert(): GCC 12 reports a false -Wstringop-overflow there.
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &value, sizeof(T));
}

void append_string(std::vector<uint8_t>& out, std::string_view s) {
  append<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

std::vector<uint8_t> typed(GgufType type) {
  std::vector<uint8_t> out;
  append<uint32_t>(out, static_cast<uint32_t>(type));
  return out;
}

class OutputFile {
 public:
  explicit OutputFile(std::string path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) fail("cannot create");
  }
  ~OutputFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  void write(const uint8_t* data, size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, data, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("cannot write");
      }
      data += w;
      n -= static_cast<size_t>(w);
    }
  }
  void finish() {
    if (::fsync(fd_) != 0) fail("cannot flush");
    if (::close(fd_) != 0) {
      fd_ = -1;
      fail("cannot close");
    }
    fd_ = -1;
  }

 private:
  [[noreturn]] void fail(const char* what) {
    throw std::runtime_error(std::string(what) + " '" + path_ + "': " + std::strerror(errno));
  }
  std::string path_;
  int fd_ = -1;
};

}  // namespace

void GgufWriter::put(std::string key, std::vector<uint8_t> encoded) {
  auto it = std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.key == key; });
  if (it != entries_.end()) {
    it->encoded = std::move(encoded);
  } else {
    entries_.push_back({std::move(key), std::move(encoded)});
  }
}

void GgufWriter::set_u32(std::string key, uint32_t value) {
  auto e = typed(GgufType::u32);
  append(e, value);
  put(std::move(key), std::move(e));
}
void GgufWriter::set_i32(std::string key, int32_t value) {
  auto e = typed(GgufType::i32);
  append(e, value);
  put(std::move(key), std::move(e));
}
void GgufWriter::set_f32(std::string key, float value) {
  auto e = typed(GgufType::f32);
  append(e, value);
  put(std::move(key), std::move(e));
}
void GgufWriter::set_bool(std::string key, bool value) {
  auto e = typed(GgufType::boolean);
  append<uint8_t>(e, value ? 1 : 0);
  put(std::move(key), std::move(e));
}
void GgufWriter::set_string(std::string key, std::string value) {
  auto e = typed(GgufType::string);
  append_string(e, value);
  put(std::move(key), std::move(e));
}
void GgufWriter::set_string_array(std::string key, std::vector<std::string> values) {
  auto e = typed(GgufType::array);
  append<uint32_t>(e, static_cast<uint32_t>(GgufType::string));
  append<uint64_t>(e, values.size());
  for (const std::string& v : values) append_string(e, v);
  put(std::move(key), std::move(e));
}
void GgufWriter::set_f32_array(std::string key, std::vector<float> values) {
  auto e = typed(GgufType::array);
  append<uint32_t>(e, static_cast<uint32_t>(GgufType::f32));
  append<uint64_t>(e, values.size());
  for (float v : values) append(e, v);
  put(std::move(key), std::move(e));
}
void GgufWriter::set_i32_array(std::string key, std::vector<int32_t> values) {
  auto e = typed(GgufType::array);
  append<uint32_t>(e, static_cast<uint32_t>(GgufType::i32));
  append<uint64_t>(e, values.size());
  for (int32_t v : values) append(e, v);
  put(std::move(key), std::move(e));
}

void GgufWriter::copy_key(const GgufFile& from, std::string_view key) {
  const GgufValue* v = from.find(key);
  if (v == nullptr) return;
  auto e = typed(v->type);
  switch (v->type) {
    case GgufType::u8:
      append<uint8_t>(e, static_cast<uint8_t>(v->u));
      break;
    case GgufType::i8:
      append<int8_t>(e, static_cast<int8_t>(v->i));
      break;
    case GgufType::u16:
      append<uint16_t>(e, static_cast<uint16_t>(v->u));
      break;
    case GgufType::i16:
      append<int16_t>(e, static_cast<int16_t>(v->i));
      break;
    case GgufType::u32:
      append<uint32_t>(e, static_cast<uint32_t>(v->u));
      break;
    case GgufType::i32:
      append<int32_t>(e, static_cast<int32_t>(v->i));
      break;
    case GgufType::u64:
      append<uint64_t>(e, v->u);
      break;
    case GgufType::i64:
      append<int64_t>(e, v->i);
      break;
    case GgufType::f32:
      append<float>(e, static_cast<float>(v->f));
      break;
    case GgufType::f64:
      append<double>(e, v->f);
      break;
    case GgufType::boolean:
      append<uint8_t>(e, static_cast<uint8_t>(v->u));
      break;
    case GgufType::string:
      append_string(e, v->str);
      break;
    case GgufType::array: {
      append<uint32_t>(e, static_cast<uint32_t>(v->array_type));
      append<uint64_t>(e, v->array_count);
      if (v->array_type == GgufType::string) {
        for (std::string_view s : v->array_strings) append_string(e, s);
      } else if (v->array_data != nullptr) {
        const size_t size = gguf_scalar_size(v->array_type);
        e.insert(e.end(), v->array_data, v->array_data + v->array_count * size);
      } else {
        return;  // nested arrays are not copied
      }
      break;
    }
  }
  put(std::string(key), std::move(e));
}

void GgufWriter::add_tensor(std::string name, kernels::TensorType type, std::vector<int64_t> dims) {
  tensors_.push_back({std::move(name), type, std::move(dims)});
}

void GgufWriter::write(const std::string& path, const FillFn& fill, const ProgressFn& progress) const {
  std::vector<uint8_t> header;
  append<uint32_t>(header, 0x46554747);
  append<uint32_t>(header, 3);
  append<uint64_t>(header, tensors_.size());
  append<uint64_t>(header, entries_.size() + 1);
  append_string(header, "general.alignment");
  append<uint32_t>(header, static_cast<uint32_t>(GgufType::u32));
  append<uint32_t>(header, static_cast<uint32_t>(kAlignment));
  for (const Entry& e : entries_) {
    append_string(header, e.key);
    header.insert(header.end(), e.encoded.begin(), e.encoded.end());
  }
  std::vector<uint64_t> sizes;
  uint64_t offset = 0;
  for (const TensorEntry& t : tensors_) {
    int64_t elements = 1;
    for (int64_t d : t.dims) elements *= d;
    const auto tr = kernels::traits(t.type);
    const auto bytes = static_cast<uint64_t>(elements / tr.block_elements * tr.block_bytes);
    sizes.push_back(bytes);
    append_string(header, t.name);
    append<uint32_t>(header, static_cast<uint32_t>(t.dims.size()));
    for (int64_t d : t.dims) append<uint64_t>(header, static_cast<uint64_t>(d));
    append<uint32_t>(header, static_cast<uint32_t>(t.type));
    append<uint64_t>(header, offset);
    offset += (bytes + kAlignment - 1) / kAlignment * kAlignment;
  }
  header.resize((header.size() + kAlignment - 1) / kAlignment * kAlignment, 0);
  const uint64_t total = header.size() + offset;

  const std::string tmp = path + ".tmp";
  try {
    OutputFile out(tmp);
    out.write(header.data(), header.size());
    uint64_t done = header.size();
    std::vector<uint8_t> buffer;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const TensorEntry& t = tensors_[i];
      const int64_t row_bytes = kernels::row_bytes(t.type, t.dims[0]);
      const int64_t rows = static_cast<int64_t>(sizes[i]) / row_bytes;
      const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkBytes / row_bytes);
      for (int64_t r = 0; r < rows; r += rows_per_chunk) {
        const int64_t n = std::min(rows_per_chunk, rows - r);
        buffer.resize(static_cast<size_t>(n * row_bytes));
        fill(i, r, buffer);
        out.write(buffer.data(), buffer.size());
        done += buffer.size();
        if (progress) progress(done, total);
      }
      const uint64_t pad = (kAlignment - sizes[i] % kAlignment) % kAlignment;
      if (pad != 0) {
        static const uint8_t zeros[kAlignment] = {};
        out.write(zeros, pad);
        done += pad;
      }
    }
    out.finish();
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      throw std::runtime_error("cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(errno));
    }
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
}

}  // namespace den::engine
