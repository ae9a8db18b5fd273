// POSIX file access for the SSD tier: RAII descriptors, whole-buffer writes and reads that
// report errno, fsync of files and directories, atomic rename; and a fault injector through
// which tests make any of these fail (EIO, ENOSPC, short writes) and watch what reached the
// page cache (the power-cut simulator). Used by segment_file and the session manager's
// checkpoint path.
#pragma once

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>

namespace den::memory {

// An I/O call failed. `error_code` is the errno value; the message names the call and path.
class IoError : public std::runtime_error {
 public:
  IoError(const std::string& message, int error_code) : std::runtime_error(message), error_code_(error_code) {}
  int error_code() const { return error_code_; }

 private:
  int error_code_;
};

enum class IoOp { open, write, read, fsync, fsync_dir, rename, unlink };

// What an injected fault does to one call: fail it with `error` (an errno value), or, for a
// write, write only `short_write_bytes` bytes and then fail with ENOSPC (a full disk).
struct IoFault {
  int error = 0;                   // 0: no fault
  int64_t short_write_bytes = -1;  // >= 0: a short write of this many bytes
  // > 0: the call meets this many signals before it goes through. They alternate: the system
  // call fails with EINTR having done nothing, then (reads and writes) it moves only part of
  // what was asked, as a signal arriving mid-transfer makes it do. The call must still complete.
  // Applies to open, read and write (fsync, rename and unlink do not return EINTR on Linux).
  int interruptions = 0;
};

// Tests subclass this; production passes nullptr everywhere. `before` may fail a call; the
// after_* observers (no-ops by default) see each call that changed the file system, once it
// succeeded, so that a test can tell what an fsync made durable and what a power cut could
// still lose.
class IoFaultInjector {
 public:
  virtual ~IoFaultInjector() = default;
  virtual IoFault before(IoOp op, const std::filesystem::path& path) = 0;
  // A new empty file (File::Mode::create_exclusive).
  virtual void after_create(const std::filesystem::path& /*file*/) {}
  // `size` bytes of `bytes` now at `offset` in the page cache; also the part of a write that
  // got through before it failed.
  virtual void after_write(const std::filesystem::path& /*file*/, int64_t /*offset*/, const void* /*bytes*/,
                           int64_t /*size*/) {}
  virtual void after_fsync(const std::filesystem::path& /*file*/) {}
  virtual void after_rename(const std::filesystem::path& /*from*/, const std::filesystem::path& /*to*/) {}
  virtual void after_fsync_dir(const std::filesystem::path& /*dir*/) {}
  // Only when a file was removed (remove_file of a missing file reports nothing).
  virtual void after_unlink(const std::filesystem::path& /*path*/) {}
};

// A move-only owner of a file descriptor.
class File {
 public:
  enum class Mode { read, create_exclusive };  // create_exclusive: O_CREAT|O_EXCL|O_WRONLY, 0600
  // direct: O_DIRECT (buffers, offsets and lengths must then be multiples of kDirectIoAlignment);
  // falls back to buffered I/O where the filesystem refuses O_DIRECT (tmpfs), see is_direct().
  File(const std::filesystem::path& path, Mode mode, bool direct, IoFaultInjector* faults = nullptr);
  ~File();
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // Writes all of `bytes` at `offset` (pwrite loop); throws IoError (short writes included).
  void write_at(const void* bytes, int64_t size, int64_t offset);
  // Reads exactly `size` bytes at `offset`; throws IoError, and on end of file too.
  void read_at(void* bytes, int64_t size, int64_t offset) const;
  // Allocates the file's first `size` bytes on disk (fallocate): writes that then land in any
  // order still make one contiguous file, and a full disk shows before anything is written.
  // Throws IoError (ENOSPC, EDQUOT, EIO); does nothing where the filesystem cannot.
  void reserve(int64_t size);
  // fsync; throws IoError. After a failed fsync the file must not be trusted or fsynced again.
  void sync();
  int64_t size() const;
  bool is_direct() const { return direct_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  int fd_ = -1;
  bool direct_ = false;
  std::filesystem::path path_;
  IoFaultInjector* faults_ = nullptr;
};

inline constexpr int64_t kDirectIoAlignment = 4096;

// rename(2) alone (not yet durable); throws IoError. segment_file uses it with sync_directory
// so that a crash test can stop between the two.
void rename_file(const std::filesystem::path& from, const std::filesystem::path& to,
                 IoFaultInjector* faults = nullptr);
// rename(2) then fsync of the directory holding `to`; throws IoError.
void rename_durably(const std::filesystem::path& from, const std::filesystem::path& to,
                    IoFaultInjector* faults = nullptr);
// fsync of a directory; throws IoError.
void sync_directory(const std::filesystem::path& dir, IoFaultInjector* faults = nullptr);
// unlink(2); a missing file is not an error. Throws IoError otherwise.
void remove_file(const std::filesystem::path& path, IoFaultInjector* faults = nullptr);

// A heap buffer aligned for O_DIRECT, move-only.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Rounded up to kDirectIoAlignment, zero-filled. Large buffers are mapped pages, zero from
  // the kernel as they are first touched (no up-front fill: a checkpoint's snapshot of
  // gigabytes would otherwise spend seconds writing zeros it overwrites), huge pages where the
  // kernel allows.
  explicit AlignedBuffer(int64_t bytes);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  void* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  void release();
  void* data_ = nullptr;
  int64_t size_ = 0;
  bool mapped_ = false;  // mmap'ed (large) rather than aligned_alloc'ed
};

}  // namespace den::memory
