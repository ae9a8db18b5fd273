// POSIX file access for the SSD tier: File (open/pwrite/pread/fsync with O_DIRECT where the
// filesystem allows it), durable rename, directory fsync, unlink and AlignedBuffer. Every call
// asks the IoFaultInjector first, so tests can make any of them fail, and reports what it
// changed to the injector's observers afterwards. Injected interruptions are acted out in the
// same retry loops that real EINTR and partial transfers go through.
#include "den/memory/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace den::memory {
namespace {

[[noreturn]] void throw_io(std::string_view call, const std::filesystem::path& path, int error,
                           std::string_view detail = {}) {
  std::string message = std::string(call) + " '" + path.string() + "'";
  if (!detail.empty()) message += " (" + std::string(detail) + ")";
  message += ": " + std::string(std::strerror(error));
  throw IoError(message, error);
}

// Asks the injector about one call; throws the injected error. Returns the fault so that a
// write can act out a short write.
IoFault consult(IoFaultInjector* faults, IoOp op, std::string_view call, const std::filesystem::path& path) {
  if (faults == nullptr) return {};
  const IoFault fault = faults->before(op, path);
  if (fault.error != 0) throw_io(call, path, fault.error, "injected");
  return fault;
}

std::string at_offset(int64_t size, int64_t offset) {
  return std::to_string(size) + " bytes at offset " + std::to_string(offset);
}

// Acts out an injected fault's interruptions, one per attempt of a system call: each says
// whether the attempt fails with EINTR, moves only part of what was asked, or goes through.
class Interruptions {
 public:
  enum class Attempt { go_through, eintr, partial };
  explicit Interruptions(int n) : left_(n) {}
  // transfers: a read or write (which a signal can cut short); otherwise every one is EINTR.
  Attempt next(bool transfers) {
    if (left_ <= 0) return Attempt::go_through;
    --left_;
    return transfers && (seen_++ % 2 == 1) ? Attempt::partial : Attempt::eintr;
  }

 private:
  int left_;
  int seen_ = 0;
};

// What a signal mid-transfer lets through of `left` bytes: about half, in whole O_DIRECT units
// when the transfer is direct (the whole of it when that is a single unit).
int64_t partial_count(int64_t left, bool direct) {
  if (!direct) return std::max<int64_t>(1, left / 2);
  const int64_t units = left / kDirectIoAlignment / 2;
  return units > 0 ? units * kDirectIoAlignment : left;
}

// open(2), retried on EINTR, the injected ones included; -1 with errno set on failure.
int open_retrying(const std::filesystem::path& path, int flags, Interruptions& interruptions) {
  int fd = -1;
  do {
    if (interruptions.next(false) == Interruptions::Attempt::eintr) {
      errno = EINTR;
      continue;
    }
    fd = ::open(path.c_str(), flags, 0600);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

// Closes `fd` once; EINTR from close must not be retried on Linux (the descriptor is gone).
void close_fd(int fd) {
  if (fd >= 0) ::close(fd);
}

}  // namespace

File::File(const std::filesystem::path& path, Mode mode, bool direct, IoFaultInjector* faults)
    : path_(path), faults_(faults) {
  Interruptions interruptions(consult(faults_, IoOp::open, "open", path_).interruptions);
  const int flags = (mode == Mode::read ? O_RDONLY : O_WRONLY | O_CREAT | O_EXCL) | O_CLOEXEC;
  fd_ = open_retrying(path_, flags, interruptions);
  if (fd_ < 0) throw_io("open", path_, errno);
  if (faults_ != nullptr && mode == Mode::create_exclusive) faults_->after_create(path_);
  // O_DIRECT is switched on after open rather than passed to it: where a filesystem refuses
  // it (tmpfs before Linux 6.6), open(O_CREAT|O_EXCL|O_DIRECT) fails with EINVAL after having
  // created the file, so a buffered retry would then fail with EEXIST. F_SETFL reports the
  // same EINVAL without side effects.
  if (direct) {
    const int current = ::fcntl(fd_, F_GETFL);
    if (current >= 0 && ::fcntl(fd_, F_SETFL, current | O_DIRECT) == 0) {
      direct_ = true;
    } else if (errno != EINVAL) {
      const int error = errno;
      close_fd(std::exchange(fd_, -1));  // the destructor does not run for a throwing constructor
      throw_io("fcntl O_DIRECT", path_, error);
    }
  }
}

File::~File() { close_fd(fd_); }

File::File(File&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      direct_(other.direct_),
      path_(std::move(other.path_)),
      faults_(other.faults_) {}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    close_fd(fd_);
    fd_ = std::exchange(other.fd_, -1);
    direct_ = other.direct_;
    path_ = std::move(other.path_);
    faults_ = other.faults_;
  }
  return *this;
}

void File::reserve(int64_t size) {
  if (size <= 0) return;
  int rc;
  do {
    rc = ::posix_fallocate(fd_, 0, static_cast<off_t>(size));  // returns the error, not errno
  } while (rc == EINTR);
  if (rc == 0 || rc == EOPNOTSUPP || rc == EINVAL) return;  // EINVAL: not supported here either
  throw_io("fallocate", path_, rc);
}

void File::write_at(const void* bytes, int64_t size, int64_t offset) {
  const IoFault fault = consult(faults_, IoOp::write, "write", path_);
  const bool short_write = fault.short_write_bytes >= 0;
  const int64_t to_write = short_write ? std::min(fault.short_write_bytes, size) : size;
  // An injected short write of an unaligned length cannot go through O_DIRECT: write it
  // buffered so the file really ends up with exactly that many bytes.
  const bool drop_direct = short_write && direct_ && to_write % kDirectIoAlignment != 0;
  const int saved_flags = drop_direct ? ::fcntl(fd_, F_GETFL) : 0;
  if (drop_direct && (saved_flags < 0 || ::fcntl(fd_, F_SETFL, saved_flags & ~O_DIRECT) < 0)) {
    throw_io("fcntl", path_, errno);
  }
  const auto* p = static_cast<const char*>(bytes);
  int64_t done = 0;
  int error = 0;
  Interruptions interruptions(fault.interruptions);
  while (done < to_write) {
    int64_t ask = to_write - done;
    const Interruptions::Attempt attempt = interruptions.next(true);
    if (attempt == Interruptions::Attempt::eintr) continue;  // as if pwrite failed with EINTR
    if (attempt == Interruptions::Attempt::partial) ask = partial_count(ask, direct_ && !drop_direct);
    const ssize_t n = ::pwrite(fd_, p + done, static_cast<size_t>(ask), offset + done);
    if (n < 0 && errno == EINTR) continue;
    // pwrite returning 0 for a nonzero count means the device took nothing: treat as full.
    if (n <= 0) {
      error = n < 0 ? errno : ENOSPC;
      break;
    }
    done += n;
  }
  if (drop_direct) ::fcntl(fd_, F_SETFL, saved_flags);
  if (faults_ != nullptr && done > 0) faults_->after_write(path_, offset, bytes, done);
  if (error != 0) throw_io("write", path_, error, at_offset(size, offset));
  if (short_write) {
    throw_io("write", path_, ENOSPC,
             "injected short write of " + std::to_string(to_write) + " of " + at_offset(size, offset));
  }
}

void File::read_at(void* bytes, int64_t size, int64_t offset) const {
  Interruptions interruptions(consult(faults_, IoOp::read, "read", path_).interruptions);
  auto* p = static_cast<char*>(bytes);
  int64_t done = 0;
  while (done < size) {
    int64_t ask = size - done;
    const Interruptions::Attempt attempt = interruptions.next(true);
    if (attempt == Interruptions::Attempt::eintr) continue;  // as if pread failed with EINTR
    if (attempt == Interruptions::Attempt::partial) ask = partial_count(ask, direct_);
    const ssize_t n = ::pread(fd_, p + done, static_cast<size_t>(ask), offset + done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io("read", path_, errno, at_offset(size, offset));
    }
    if (n == 0) {
      throw_io("read", path_, EIO,
               "end of file after " + std::to_string(offset + done) + " bytes, wanted " + at_offset(size, offset));
    }
    done += n;
  }
}

void File::sync() {
  consult(faults_, IoOp::fsync, "fsync", path_);
  // No retry on failure: after a failed fsync the kernel may have dropped the dirty pages and a
  // second fsync can report success for data that never reached the disk.
  if (::fsync(fd_) != 0) throw_io("fsync", path_, errno);
  if (faults_ != nullptr) faults_->after_fsync(path_);
}

int64_t File::size() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) throw_io("fstat", path_, errno);
  return static_cast<int64_t>(st.st_size);
}

void rename_file(const std::filesystem::path& from, const std::filesystem::path& to, IoFaultInjector* faults) {
  consult(faults, IoOp::rename, "rename", to);
  if (::rename(from.c_str(), to.c_str()) != 0) throw_io("rename", from, errno, "to '" + to.string() + "'");
  if (faults != nullptr) faults->after_rename(from, to);
}

void rename_durably(const std::filesystem::path& from, const std::filesystem::path& to, IoFaultInjector* faults) {
  rename_file(from, to, faults);
  const std::filesystem::path dir = to.parent_path();
  sync_directory(dir.empty() ? std::filesystem::path(".") : dir, faults);
}

void sync_directory(const std::filesystem::path& dir, IoFaultInjector* faults) {
  Interruptions interruptions(consult(faults, IoOp::fsync_dir, "fsync directory", dir).interruptions);
  const int fd = open_retrying(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, interruptions);
  if (fd < 0) throw_io("open directory", dir, errno);
  const int rc = ::fsync(fd);
  const int error = errno;
  close_fd(fd);
  if (rc != 0) throw_io("fsync directory", dir, error);
  if (faults != nullptr) faults->after_fsync_dir(dir);
}

void remove_file(const std::filesystem::path& path, IoFaultInjector* faults) {
  consult(faults, IoOp::unlink, "unlink", path);
  if (::unlink(path.c_str()) == 0) {
    if (faults != nullptr) faults->after_unlink(path);
  } else if (errno != ENOENT) {
    throw_io("unlink", path, errno);
  }
}

AlignedBuffer::AlignedBuffer(int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("aligned buffer of " + std::to_string(bytes) + " bytes");
  if (bytes == 0) return;
  size_ = (bytes + kDirectIoAlignment - 1) / kDirectIoAlignment * kDirectIoAlignment;
  constexpr int64_t kMapFrom = int64_t{2} << 20;
  if (size_ >= kMapFrom) {
    void* p = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    ::madvise(p, static_cast<size_t>(size_), MADV_HUGEPAGE);  // a hint: fewer page faults where THP is on
    data_ = p;
    mapped_ = true;
    return;
  }
  data_ = std::aligned_alloc(static_cast<size_t>(kDirectIoAlignment), static_cast<size_t>(size_));
  if (data_ == nullptr) throw std::bad_alloc();
  std::memset(data_, 0, static_cast<size_t>(size_));
}

void AlignedBuffer::release() {
  if (data_ == nullptr) return;
  if (mapped_) {
    ::munmap(data_, static_cast<size_t>(size_));
  } else {
    std::free(data_);
  }
  data_ = nullptr;
}

AlignedBuffer::~AlignedBuffer() { release(); }

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, false)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, false);
  }
  return *this;
}

}  // namespace den::memory
