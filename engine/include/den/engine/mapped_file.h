// Read-only memory mapping of a whole file, as a move-only RAII owner.
// Used by the GGUF reader (model weights stay mapped, never copied on the CPU backend).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace den::engine {

class MappedFile {
 public:
  // Throws std::runtime_error naming the path and the system error.
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  void release() noexcept;

  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace den::engine
