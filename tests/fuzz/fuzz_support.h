// Helpers shared by the libFuzzer targets: an invariant check that aborts (so libFuzzer keeps
// the input), an in-memory file with a path for readers that only open paths, and a scratch
// directory for writers that rename into place.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

namespace den::fuzz {

inline void require(bool condition, const char* target, const char* what) {
  if (condition) return;
  std::fprintf(stderr, "%s: %s\n", target, what);
  std::abort();
}

// A memfd reached through /proc/self/fd/N: the reader under test opens and maps a real
// file, and no input ever touches the disk. One per process, rewritten for each input.
class MemoryFile {
 public:
  MemoryFile() {
    fd_ = ::memfd_create("den-fuzz-input", MFD_CLOEXEC);
    if (fd_ < 0) {
      std::perror("memfd_create");
      std::abort();
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemoryFile() { ::close(fd_); }
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;

  // Replaces the whole content (the size too) with `bytes`.
  void assign(const uint8_t* bytes, size_t size) {
    if (::ftruncate(fd_, 0) != 0) fail("ftruncate");
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::pwrite(fd_, bytes + done, size - done, static_cast<off_t>(done));
      if (n <= 0) fail("pwrite");
      done += static_cast<size_t>(n);
    }
  }
  const std::string& path() const { return path_; }

 private:
  [[noreturn]] static void fail(const char* call) {
    std::perror(call);
    std::abort();
  }
  int fd_ = -1;
  std::string path_;
};

// A private directory for files a target must write under a name (writers that rename into
// place), on tmpfs when there is one; removed with everything in it at exit.
class ScratchDirectory {
 public:
  ScratchDirectory() {
    const char* tmpdir = std::getenv("TMPDIR");
    const std::string base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : tmpdir ? tmpdir : "/tmp";
    std::string pattern = base + "/den-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::perror("mkdtemp");
      std::abort();
    }
    path_ = pattern;
  }
  ~ScratchDirectory() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  ScratchDirectory(const ScratchDirectory&) = delete;
  ScratchDirectory& operator=(const ScratchDirectory&) = delete;

  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace den::fuzz
