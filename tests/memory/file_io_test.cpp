// The SSD tier's file layer: File round trips (buffered and O_DIRECT), AlignedBuffer, durable
// rename, unlink, and faults injected into each call (EIO, ENOSPC short writes, signals).
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "den/memory/file_io.h"
#include "io_faults.h"
#include "test_support.h"

using namespace den;
using memory::File;
using memory::IoError;
using memory::IoFault;
using memory::IoOp;
using test::FailOp;

namespace {

std::vector<unsigned char> random_bytes(std::mt19937& rng, size_t n) {
  std::vector<unsigned char> bytes(n);
  for (auto& b : bytes) b = static_cast<unsigned char>(rng());
  return bytes;
}

// The errno of the IoError that `f` throws; -1 when it throws nothing.
template <typename F>
int io_errno(F&& f) {
  try {
    f();
  } catch (const IoError& e) {
    return e.error_code();
  }
  return -1;
}

}  // namespace

TEST_CASE("a buffered File writes and reads back any size at any offset") {
  test::TempDir dir;
  std::mt19937 rng(7);
  const auto a = random_bytes(rng, 1001);
  const auto b = random_bytes(rng, 37);
  const auto path = dir.path() / "f";
  {
    File f(path, File::Mode::create_exclusive, false);
    CHECK_FALSE(f.is_direct());
    f.write_at(a.data(), static_cast<int64_t>(a.size()), 0);
    f.write_at(b.data(), static_cast<int64_t>(b.size()), 1005);  // leaves a 4-byte hole
    f.sync();
    CHECK(f.size() == 1042);
  }
  File moved = File(path, File::Mode::read, false);  // exercises the move constructor
  File r = std::move(moved);
  CHECK(r.path() == path);
  std::vector<unsigned char> got(1042, 0xff);
  r.read_at(got.data(), 1042, 0);
  CHECK(std::memcmp(got.data(), a.data(), a.size()) == 0);
  CHECK(got[1001] == 0);
  CHECK(got[1004] == 0);
  CHECK(std::memcmp(got.data() + 1005, b.data(), b.size()) == 0);
  std::vector<unsigned char> middle(10);
  r.read_at(middle.data(), 10, 995);
  CHECK(std::memcmp(middle.data(), a.data() + 995, 6) == 0);

  CHECK(io_errno([&] { File again(path, File::Mode::create_exclusive, false); }) == EEXIST);
  CHECK(io_errno([&] { File missing(dir.path() / "nope", File::Mode::read, true); }) == ENOENT);
}

TEST_CASE("an O_DIRECT File round-trips aligned buffers") {
  test::TempDir dir;
  memory::AlignedBuffer out(3 * 4096 + 1);
  REQUIRE(out.size() == 4 * 4096);
  CHECK(reinterpret_cast<uintptr_t>(out.data()) % memory::kDirectIoAlignment == 0);
  const auto* zeros = static_cast<const unsigned char*>(out.data());
  CHECK(std::all_of(zeros, zeros + out.size(), [](unsigned char c) { return c == 0; }));
  std::mt19937 rng(11);
  const auto bytes = random_bytes(rng, static_cast<size_t>(out.size()));
  std::memcpy(out.data(), bytes.data(), bytes.size());

  const auto path = dir.path() / "direct";
  {
    File f(path, File::Mode::create_exclusive, true);
    MESSAGE("O_DIRECT on " << dir.path() << ": " << std::string(f.is_direct() ? "yes" : "no, buffered fallback"));
    f.write_at(out.data(), 2 * 4096, 0);
    f.write_at(static_cast<char*>(out.data()) + 2 * 4096, 2 * 4096, 2 * 4096);
    f.sync();
  }
  File r(path, File::Mode::read, true);
  CHECK(r.size() == 4 * 4096);
  memory::AlignedBuffer in(4 * 4096);
  r.read_at(static_cast<char*>(in.data()) + 4096, 4096, 4096);
  r.read_at(in.data(), 4096, 0);
  r.read_at(static_cast<char*>(in.data()) + 2 * 4096, 2 * 4096, 2 * 4096);
  CHECK(std::memcmp(in.data(), bytes.data(), bytes.size()) == 0);

  memory::AlignedBuffer moved = std::move(in);
  CHECK(in.data() == nullptr);
  CHECK(moved.size() == 4 * 4096);
  CHECK(memory::AlignedBuffer(0).data() == nullptr);
}

TEST_CASE("a File asked for O_DIRECT on tmpfs works, directly or buffered") {
  // tmpfs refused O_DIRECT before Linux 6.6; either way the file must be created once and work.
  const std::filesystem::path shm = "/dev/shm";
  DEN_SKIP_UNLESS(std::filesystem::is_directory(shm), "no /dev/shm");
  const auto path = shm / ("den-file-io-test-" + std::to_string(::getpid()));
  memory::remove_file(path);
  memory::AlignedBuffer out(4096);
  std::memset(out.data(), 0x3c, 4096);
  memory::AlignedBuffer in(4096);
  bool direct = false;
  {
    File f(path, File::Mode::create_exclusive, true);
    direct = f.is_direct();
    f.write_at(out.data(), 4096, 0);
    f.sync();
    File r(path, File::Mode::read, true);
    r.read_at(in.data(), 4096, 0);
  }
  memory::remove_file(path);
  MESSAGE("O_DIRECT on /dev/shm: " << std::string(direct ? "yes" : "no, buffered fallback"));
  CHECK(std::memcmp(in.data(), out.data(), 4096) == 0);
}

TEST_CASE("an injected EIO fails the write, naming the call and the file") {
  test::TempDir dir;
  FailOp faults(IoOp::write, IoFault{EIO});
  const auto path = dir.path() / "eio";
  File f(path, File::Mode::create_exclusive, false, &faults);
  const std::vector<unsigned char> bytes(100, 1);
  try {
    f.write_at(bytes.data(), 100, 0);
    FAIL("no IoError");
  } catch (const IoError& e) {
    CHECK(e.error_code() == EIO);
    CHECK(std::string(e.what()).find("write") != std::string::npos);
    CHECK(std::string(e.what()).find(path.string()) != std::string::npos);
  }
  CHECK(f.size() == 0);  // the fault comes before the real call
  f.write_at(bytes.data(), 100, 0);  // the next write is not faulted
  CHECK(f.size() == 100);
}

TEST_CASE("an injected short write leaves exactly that many bytes in the file and fails with ENOSPC") {
  test::TempDir dir;
  std::mt19937 rng(3);
  SUBCASE("buffered") {
    const auto bytes = random_bytes(rng, 1000);
    FailOp faults(IoOp::write, IoFault{0, 123});
    const auto path = dir.path() / "short";
    {
      File f(path, File::Mode::create_exclusive, false, &faults);
      CHECK(io_errno([&] { f.write_at(bytes.data(), 1000, 0); }) == ENOSPC);
    }
    CHECK(std::filesystem::file_size(path) == 123);
    const std::string got = test::read_file(path.string());
    CHECK(std::memcmp(got.data(), bytes.data(), 123) == 0);
  }
  SUBCASE("O_DIRECT, an unaligned length") {
    memory::AlignedBuffer buf(2 * 4096);
    std::memset(buf.data(), 0x5a, static_cast<size_t>(buf.size()));
    FailOp faults(IoOp::write, IoFault{0, 4096 + 77});
    const auto path = dir.path() / "short-direct";
    {
      File f(path, File::Mode::create_exclusive, true, &faults);
      CHECK(io_errno([&] { f.write_at(buf.data(), buf.size(), 0); }) == ENOSPC);
    }
    CHECK(std::filesystem::file_size(path) == 4096 + 77);
  }
  SUBCASE("zero bytes") {
    FailOp faults(IoOp::write, IoFault{0, 0});
    const auto path = dir.path() / "short-zero";
    const auto bytes = random_bytes(rng, 10);
    File f(path, File::Mode::create_exclusive, false, &faults);
    CHECK(io_errno([&] { f.write_at(bytes.data(), 10, 0); }) == ENOSPC);
    CHECK(f.size() == 0);
  }
}

TEST_CASE("injected faults on file open, fsync and read throw IoError with their errno") {
  test::TempDir dir;
  const auto path = dir.path() / "x";
  {
    FailOp faults(IoOp::open, IoFault{EACCES});
    CHECK(io_errno([&] { File f(path, File::Mode::create_exclusive, true, &faults); }) == EACCES);
    CHECK_FALSE(std::filesystem::exists(path));  // the fault comes before open(2)
  }
  {
    FailOp faults(IoOp::fsync, IoFault{EIO});
    File f(path, File::Mode::create_exclusive, false, &faults);
    const char byte = 'x';
    f.write_at(&byte, 1, 0);
    CHECK(io_errno([&] { f.sync(); }) == EIO);
    CHECK(faults.calls() == 1);
  }
  {
    FailOp faults(IoOp::read, IoFault{EIO});
    File f(path, File::Mode::read, false, &faults);
    char byte = 0;
    CHECK(io_errno([&] { f.read_at(&byte, 1, 0); }) == EIO);
    f.read_at(&byte, 1, 0);
    CHECK(byte == 'x');
  }
}

TEST_CASE("calls interrupted by signals (EINTR, partial transfers) still complete, buffered and O_DIRECT") {
  test::TempDir dir;
  std::mt19937 rng(17);
  for (const int signals : {1, 2, 7}) {
    CAPTURE(signals);
    test::InterruptEveryCall faults(signals);
    {  // buffered, odd sizes
      const auto bytes = random_bytes(rng, 10007);
      const auto path = dir.path() / ("buffered-" + std::to_string(signals));
      {
        File f(path, File::Mode::create_exclusive, false, &faults);
        f.write_at(bytes.data(), 6001, 0);
        f.write_at(bytes.data() + 6001, 4006, 6001);
        f.sync();
      }
      File r(path, File::Mode::read, false, &faults);
      std::vector<unsigned char> got(bytes.size());
      r.read_at(got.data() + 3, static_cast<int64_t>(got.size()) - 3, 3);
      r.read_at(got.data(), 3, 0);
      CHECK(got == bytes);
      CHECK(test::read_file(path.string()) == std::string(bytes.begin(), bytes.end()));
    }
    {  // O_DIRECT (or its buffered fallback), whole pages
      memory::AlignedBuffer out(5 * 4096);
      const auto bytes = random_bytes(rng, static_cast<size_t>(out.size()));
      std::memcpy(out.data(), bytes.data(), bytes.size());
      const auto path = dir.path() / ("direct-" + std::to_string(signals));
      {
        File f(path, File::Mode::create_exclusive, true, &faults);
        f.write_at(out.data(), out.size(), 0);
        f.sync();
      }
      File r(path, File::Mode::read, true, &faults);
      memory::AlignedBuffer in(5 * 4096);
      r.read_at(in.data(), in.size(), 0);
      CHECK(std::memcmp(in.data(), bytes.data(), bytes.size()) == 0);
    }
    CHECK(faults.interrupted(IoOp::open) == 4);
    CHECK(faults.interrupted(IoOp::write) == 3);
    CHECK(faults.interrupted(IoOp::read) == 3);
    memory::sync_directory(dir.path(), &faults);
    CHECK(faults.interrupted(IoOp::fsync_dir) == 1);
  }
}

TEST_CASE("reading past the end of a file throws") {
  test::TempDir dir;
  const auto path = dir.path() / "small";
  test::write_file(path.string(), std::string(100, 'a'));
  File f(path, File::Mode::read, false);
  std::vector<char> buf(200);
  CHECK_THROWS_AS(f.read_at(buf.data(), 200, 0), IoError);
  CHECK_THROWS_AS(f.read_at(buf.data(), 1, 100), IoError);
  CHECK_NOTHROW(f.read_at(buf.data(), 100, 0));
}

TEST_CASE("rename_durably moves the file - its faults leave the source in place") {
  test::TempDir dir;
  const auto from = dir.path() / "a.tmp";
  const auto to = dir.path() / "a";
  test::write_file(from.string(), "payload");
  {
    FailOp faults(IoOp::rename, IoFault{EXDEV});
    CHECK(io_errno([&] { memory::rename_durably(from, to, &faults); }) == EXDEV);
    CHECK(std::filesystem::exists(from));
    CHECK_FALSE(std::filesystem::exists(to));
  }
  {
    FailOp faults(IoOp::fsync_dir, IoFault{EIO});
    CHECK(io_errno([&] { memory::rename_durably(from, to, &faults); }) == EIO);
    CHECK(std::filesystem::exists(to));  // renamed, but the directory was not made durable
    memory::rename_file(to, from);
  }
  memory::rename_durably(from, to);
  CHECK_FALSE(std::filesystem::exists(from));
  CHECK(test::read_file(to.string()) == "payload");
  CHECK_NOTHROW(memory::sync_directory(dir.path()));
  CHECK(io_errno([&] { memory::sync_directory(dir.path() / "missing"); }) == ENOENT);
}

TEST_CASE("remove_file removes, accepts a missing file, and reports other errors") {
  test::TempDir dir;
  const auto path = dir.path() / "gone";
  test::write_file(path.string(), "x");
  memory::remove_file(path);
  CHECK_FALSE(std::filesystem::exists(path));
  CHECK_NOTHROW(memory::remove_file(path));
  CHECK(io_errno([&] { memory::remove_file(dir.path()); }) == EISDIR);
  FailOp faults(IoOp::unlink, IoFault{EROFS});
  CHECK(io_errno([&] { memory::remove_file(path, &faults); }) == EROFS);
}
