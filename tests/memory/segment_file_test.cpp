// KV segment files: write/read round trips, verification on open and per block, and faults
// injected into every step of a write (nothing may be left behind at the final or temp path).
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "den/memory/segment_file.h"
#include "io_faults.h"
#include "test_support.h"

using namespace den;
using memory::CorruptSegment;
using memory::IoError;
using memory::IoFault;
using memory::IoOp;
using test::FailOp;

namespace {

// 1920-byte blocks: not a multiple of 4096, so every block is followed by padding.
const kernels::KvLayout kOddLayout{3, 2, 8, 5, kernels::DType::f32};
// Exactly 4096-byte blocks: no padding, so reads can land straight in aligned destinations.
const kernels::KvLayout kPageLayout{2, 2, 16, 8, kernels::DType::f32};
// 64 KiB blocks: 160 of them need more than one 8 MiB write chunk.
const kernels::KvLayout kBigLayout{4, 4, 64, 16, kernels::DType::f16};

memory::SegmentHeader header_for(const kernels::KvLayout& layout) {
  return memory::SegmentHeader{0xfeedfacecafe1234ull, 42, 3, layout};
}

struct Blocks {
  std::vector<std::vector<unsigned char>> data;
  std::vector<memory::SegmentBlockSource> sources;
};

Blocks make_blocks(const kernels::KvLayout& layout, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  Blocks b;
  for (int i = 0; i < n; ++i) {
    std::vector<unsigned char> bytes(static_cast<size_t>(layout.block_bytes()));
    for (auto& c : bytes) c = static_cast<unsigned char>(rng());
    b.data.push_back(std::move(bytes));
  }
  for (int i = 0; i < n; ++i) {
    const int32_t tokens = i == n - 1 ? 1 : layout.block_tokens;  // a short last block
    b.sources.push_back({0x1000ull + static_cast<uint64_t>(i) * 7919, tokens, b.data[static_cast<size_t>(i)].data()});
  }
  return b;
}

std::filesystem::path tmp_of(const std::filesystem::path& path) {
  auto tmp = path;
  tmp += ".tmp";
  return tmp;
}

void flip_byte(const std::filesystem::path& path, int64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(f);
  f.seekg(offset);
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x40);
  f.seekp(offset);
  f.write(&c, 1);
  REQUIRE(f);
}

// The message of the CorruptSegment that opening `path` throws; empty when it opens.
std::string open_error(const std::filesystem::path& path, const memory::SegmentHeader& expected,
                       uint64_t footer_hash = 0) {
  try {
    memory::SegmentReader reader(path, expected, footer_hash);
  } catch (const CorruptSegment& e) {
    return e.what();
  }
  return {};
}

}  // namespace

TEST_CASE("a segment round-trips blocks whose size is not a page multiple") {
  test::TempDir dir;
  const int n = 9;
  const Blocks blocks = make_blocks(kOddLayout, n, 1);
  const auto path = dir.path() / "seg-1";
  std::vector<std::string> steps;
  std::vector<std::pair<int64_t, int64_t>> progress;
  const memory::SegmentInfo info = memory::write_segment(
      path, header_for(kOddLayout), blocks.sources, nullptr,
      [&](int64_t done, int64_t total) { progress.emplace_back(done, total); },
      [&](const char* step) { steps.emplace_back(step); });

  CHECK(steps == std::vector<std::string>{"write", "fsync", "rename", "fsync_dir"});
  CHECK(info.path == path);
  CHECK(std::filesystem::file_size(path) == static_cast<uintmax_t>(info.file_bytes));
  CHECK(info.file_bytes % 4096 == 0);
  // One page of header and table, a page per padded block, the footer page.
  CHECK(info.file_bytes == (1 + n + 1) * 4096);
  CHECK_FALSE(std::filesystem::exists(tmp_of(path)));
  REQUIRE_FALSE(progress.empty());
  CHECK(progress.back() == std::pair<int64_t, int64_t>{info.file_bytes, info.file_bytes});
  REQUIRE(info.entries.size() == n);
  for (int i = 0; i < n; ++i) {
    const auto& e = info.entries[static_cast<size_t>(i)];
    CHECK(e.content_hash == blocks.sources[static_cast<size_t>(i)].content_hash);
    CHECK(e.tokens == blocks.sources[static_cast<size_t>(i)].tokens);
    CHECK(e.checksum == memory::block_checksum(blocks.data[static_cast<size_t>(i)].data(), kOddLayout.block_bytes()));
  }

  // Session id and generation are not checked on open.
  memory::SegmentHeader expected = header_for(kOddLayout);
  expected.session_id = 7;
  expected.generation = 0;
  memory::SegmentReader reader(path, expected, info.footer_hash);
  CHECK(reader.header().session_id == 42);
  CHECK(reader.header().generation == 3);
  CHECK(reader.header().model_fingerprint == expected.model_fingerprint);
  CHECK(reader.header().layout == kOddLayout);
  REQUIRE(reader.entries().size() == n);
  for (int i = 0; i < n; ++i) {
    CHECK(reader.entries()[static_cast<size_t>(i)].content_hash == info.entries[static_cast<size_t>(i)].content_hash);
    CHECK(reader.entries()[static_cast<size_t>(i)].tokens == info.entries[static_cast<size_t>(i)].tokens);
    CHECK(reader.entries()[static_cast<size_t>(i)].checksum == info.entries[static_cast<size_t>(i)].checksum);
  }

  // A non-contiguous subset in no particular order, into unaligned destinations.
  const std::vector<int32_t> wanted{7, 2, 4, 3, 0, 8};
  const auto bb = static_cast<size_t>(kOddLayout.block_bytes());
  std::vector<std::vector<unsigned char>> storage(wanted.size(), std::vector<unsigned char>(bb + 1, 0xee));
  std::vector<void*> destinations;
  for (auto& s : storage) destinations.push_back(s.data() + 1);
  int64_t last_done = -1, last_total = -1;
  reader.read_blocks(wanted, destinations, [&](int64_t done, int64_t total) {
    CHECK(done > last_done);
    last_done = done;
    last_total = total;
  });
  CHECK(last_done == static_cast<int64_t>(wanted.size() * bb));
  CHECK(last_total == last_done);
  for (size_t i = 0; i < wanted.size(); ++i) {
    CHECK(std::memcmp(storage[i].data() + 1, blocks.data[static_cast<size_t>(wanted[i])].data(), bb) == 0);
    CHECK(storage[i][0] == 0xee);  // nothing written before the destination
  }

  // The same block twice is fine; indices outside the segment are not.
  std::vector<unsigned char> x(bb), y(bb);
  const std::vector<int32_t> twice{5, 5};
  const std::vector<void*> xy{x.data(), y.data()};
  reader.read_blocks(twice, xy);
  CHECK(x == blocks.data[5]);
  CHECK(y == blocks.data[5]);
  const std::vector<int32_t> too_far{n};
  const std::vector<int32_t> negative{-1};
  const std::vector<void*> one{x.data()};
  CHECK_THROWS_AS(reader.read_blocks(too_far, one), std::out_of_range);
  CHECK_THROWS_AS(reader.read_blocks(negative, one), std::out_of_range);
  CHECK_THROWS_AS(reader.read_blocks(twice, one), std::invalid_argument);

  // Segments are never overwritten.
  try {
    memory::write_segment(path, header_for(kOddLayout), blocks.sources);
    FAIL("overwrote a segment");
  } catch (const IoError& e) {
    CHECK(e.error_code() == EEXIST);
  }
  CHECK(std::filesystem::file_size(path) == static_cast<uintmax_t>(info.file_bytes));
}

TEST_CASE("page-sized segment blocks read straight into aligned destinations and through the bounce buffer") {
  test::TempDir dir;
  const int n = 6;
  const Blocks blocks = make_blocks(kPageLayout, n, 2);
  const auto path = dir.path() / "seg-page";
  const auto info = memory::write_segment(path, header_for(kPageLayout), blocks.sources);
  CHECK(info.file_bytes == (1 + n + 1) * 4096);
  memory::SegmentReader reader(path, header_for(kPageLayout), 0);

  memory::AlignedBuffer aligned(4 * 4096);
  auto* base = static_cast<unsigned char*>(aligned.data());
  std::vector<unsigned char> unaligned(4096 + 3);
  // Blocks 1..3 land contiguously in the aligned buffer, block 5 after them, block 0 unaligned.
  const std::vector<int32_t> wanted{3, 0, 1, 5, 2};
  const std::vector<void*> destinations{base + 2 * 4096, unaligned.data() + 3, base, base + 3 * 4096, base + 4096};
  reader.read_blocks(wanted, destinations);
  for (size_t i = 0; i < wanted.size(); ++i) {
    CHECK(std::memcmp(destinations[i], blocks.data[static_cast<size_t>(wanted[i])].data(), 4096) == 0);
  }
}

TEST_CASE("a segment larger than one write chunk and one read request reports progress up to its size") {
  test::TempDir dir;
  const int n = 640;  // 40 MiB of blocks: five write chunks of 8 MiB, two read requests of 32 MiB
  const Blocks blocks = make_blocks(kBigLayout, n, 3);
  const auto path = dir.path() / "seg-big";
  std::vector<int64_t> done;
  int64_t total = 0;
  const auto info = memory::write_segment(path, header_for(kBigLayout), blocks.sources, nullptr,
                                          [&](int64_t d, int64_t t) {
                                            done.push_back(d);
                                            total = t;
                                          });
  CHECK(done.size() >= 2);
  CHECK(std::is_sorted(done.begin(), done.end()));
  CHECK(done.back() == info.file_bytes);
  CHECK(total == info.file_bytes);

  memory::SegmentReader reader(path, header_for(kBigLayout), info.footer_hash);
  const auto bb = static_cast<size_t>(kBigLayout.block_bytes());
  std::vector<int32_t> all(n);
  for (int i = 0; i < n; ++i) all[static_cast<size_t>(i)] = n - 1 - i;
  std::vector<unsigned char> out(static_cast<size_t>(n) * bb);
  std::vector<void*> destinations;
  for (int i = 0; i < n; ++i) destinations.push_back(out.data() + static_cast<size_t>(i) * bb);
  int calls = 0;
  int64_t read_done = 0;
  reader.read_blocks(all, destinations, [&](int64_t d, int64_t) {
    ++calls;
    read_done = d;
  });
  CHECK(calls >= 2);
  CHECK(read_done == static_cast<int64_t>(n * bb));
  for (int i = 0; i < n; ++i) {
    REQUIRE(std::memcmp(destinations[static_cast<size_t>(i)], blocks.data[static_cast<size_t>(n - 1 - i)].data(),
                        bb) == 0);
  }
}

TEST_CASE("a flipped segment payload byte fails only the block that holds it") {
  test::TempDir dir;
  const int n = 5;
  const Blocks blocks = make_blocks(kOddLayout, n, 4);
  const auto path = dir.path() / "seg-flip";
  const auto info = memory::write_segment(path, header_for(kOddLayout), blocks.sources);
  // Per the documented layout: the payload ends where the footer page starts; strides are pages.
  const int64_t payload_offset = info.file_bytes - 4096 - n * 4096;
  flip_byte(path, payload_offset + 3 * 4096 + 1000);

  memory::SegmentReader reader(path, header_for(kOddLayout), info.footer_hash);  // the header is intact
  const auto bb = static_cast<size_t>(kOddLayout.block_bytes());
  std::vector<unsigned char> a(bb), b(bb);
  const std::vector<void*> ab{a.data(), b.data()};
  const std::vector<int32_t> bad{2, 3};
  try {
    reader.read_blocks(bad, ab);
    FAIL("the flipped byte went unnoticed");
  } catch (const CorruptSegment& e) {
    CHECK(std::string(e.what()).find("block 3") != std::string::npos);
    CHECK(std::string(e.what()).find(path.string()) != std::string::npos);
  }
  for (int32_t i : {0, 1, 2, 4}) {
    const std::vector<int32_t> one{i};
    const std::vector<void*> dst{a.data()};
    reader.read_blocks(one, dst);
    CHECK(a == blocks.data[static_cast<size_t>(i)]);
  }
  // Padding after a block's bytes is not covered by its checksum.
  flip_byte(path, payload_offset + 4 * 4096 + 4000);
  const std::vector<int32_t> four{4};
  const std::vector<void*> dst{a.data()};
  CHECK_NOTHROW(reader.read_blocks(four, dst));
}

TEST_CASE("a damaged, truncated or foreign segment is refused on open") {
  test::TempDir dir;
  const int n = 4;
  const Blocks blocks = make_blocks(kOddLayout, n, 5);
  const auto path = dir.path() / "seg-good";
  const auto info = memory::write_segment(path, header_for(kOddLayout), blocks.sources);
  const memory::SegmentHeader expected = header_for(kOddLayout);
  REQUIRE(open_error(path, expected, info.footer_hash).empty());

  int copies = 0;
  auto copy = [&] {
    const auto p = dir.path() / ("copy-" + std::to_string(copies++));
    std::filesystem::copy_file(path, p);
    return p;
  };

  SUBCASE("a flipped byte in the header, the table, the padding or the footer") {
    // magic, version, fingerprint, the top byte of n_layers, block count, a table entry, table
    // padding, footer magic, footer hash, footer size
    const int64_t footer = info.file_bytes - 4096;
    for (int64_t offset : {int64_t{0}, int64_t{8}, int64_t{17}, int64_t{43}, int64_t{64}, int64_t{96 + 24 + 9},
                           int64_t{2000},
                           footer, footer + 8, footer + 16}) {
      CAPTURE(offset);
      const auto p = copy();
      flip_byte(p, offset);
      const std::string error = open_error(p, expected);
      CHECK_FALSE(error.empty());
      CHECK(error.find(p.string()) != std::string::npos);
    }
  }
  SUBCASE("truncated or extended") {
    const int64_t full = info.file_bytes;
    for (int64_t size : {full - 4096, full - 1, int64_t{100}, int64_t{0}, full + 4096}) {
      CAPTURE(size);
      const auto p = copy();
      std::filesystem::resize_file(p, static_cast<uintmax_t>(size));
      CHECK_FALSE(open_error(p, expected).empty());
    }
  }
  SUBCASE("another model's fingerprint") {
    memory::SegmentHeader other = expected;
    other.model_fingerprint ^= 1;
    CHECK(open_error(path, other).find("fingerprint") != std::string::npos);
  }
  SUBCASE("another KV layout") {
    memory::SegmentHeader other = expected;
    other.layout.head_dim = 16;
    CHECK(open_error(path, other).find("layout") != std::string::npos);
    other.layout = kOddLayout;
    other.layout.dtype = kernels::DType::f16;
    CHECK(open_error(path, other).find("layout") != std::string::npos);
  }
  SUBCASE("another footer hash than the catalog recorded") {
    CHECK(open_error(path, expected, info.footer_hash + 1).find("footer hash") != std::string::npos);
  }
  SUBCASE("an injected open fault is an IoError, not corruption") {
    FailOp faults(IoOp::open, IoFault{EIO});
    CHECK_THROWS_AS(memory::SegmentReader(path, expected, 0, &faults), IoError);
  }
}

TEST_CASE("a failed write leaves neither the segment nor its temp file") {
  test::TempDir dir;
  const auto path = dir.path() / "seg-fault";
  struct Case {
    const char* name;
    IoOp op;
    IoFault fault;
    int nth;
    const std::vector<memory::SegmentBlockSource>* blocks;
  };
  const Blocks small = make_blocks(kOddLayout, 3, 6);
  const Blocks big = make_blocks(kBigLayout, 160, 7);
  const std::vector<Case> cases{
      {"open", IoOp::open, {EACCES}, 0, &small.sources},
      {"write", IoOp::write, {EIO}, 0, &small.sources},
      {"second write chunk", IoOp::write, {EIO}, 1, &big.sources},
      {"short write", IoOp::write, {0, 5000}, 0, &small.sources},
      {"short write of a later chunk", IoOp::write, {0, 4096 * 3 + 5}, 1, &big.sources},
      {"fsync", IoOp::fsync, {EIO}, 0, &small.sources},
      {"rename", IoOp::rename, {EXDEV}, 0, &small.sources},
      // After the rename: the segment is removed again, so the caller sees no file.
      {"fsync_dir", IoOp::fsync_dir, {EIO}, 0, &small.sources},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    FailOp faults(c.op, c.fault, c.nth);
    std::vector<std::string> steps;
    int error = -1;
    try {
      memory::write_segment(path, header_for(c.blocks == &small.sources ? kOddLayout : kBigLayout), *c.blocks, &faults,
                            {}, [&](const char* step) { steps.emplace_back(step); });
    } catch (const IoError& e) {
      error = e.error_code();
    }
    CHECK(faults.calls() > c.nth);
    CHECK(error == (c.fault.error != 0 ? c.fault.error : ENOSPC));
    CHECK_FALSE(std::filesystem::exists(path));
    CHECK_FALSE(std::filesystem::exists(tmp_of(path)));
    if (c.op == IoOp::fsync_dir) CHECK(steps == std::vector<std::string>{"write", "fsync", "rename"});
    if (c.op == IoOp::fsync) CHECK(steps == std::vector<std::string>{"write"});
  }
  // After all that, a clean write succeeds at the same path.
  CHECK_NOTHROW(memory::write_segment(path, header_for(kOddLayout), small.sources));
  CHECK(std::filesystem::exists(path));
}

TEST_CASE("a stale segment temp file is replaced and an aborted step leaves nothing") {
  test::TempDir dir;
  const Blocks blocks = make_blocks(kOddLayout, 2, 8);
  const auto path = dir.path() / "seg-stale";
  test::write_file(tmp_of(path).string(), "left by a crash");
  const auto info = memory::write_segment(path, header_for(kOddLayout), blocks.sources);
  CHECK_FALSE(std::filesystem::exists(tmp_of(path)));
  CHECK(open_error(path, header_for(kOddLayout), info.footer_hash).empty());

  // An on_step that throws stands in for a process stopped at that point by a crash test.
  for (const std::string stop : {"write", "fsync", "rename", "fsync_dir"}) {
    CAPTURE(stop);
    const auto p = dir.path() / ("seg-stop-" + stop);
    CHECK_THROWS_AS(memory::write_segment(p, header_for(kOddLayout), blocks.sources, nullptr, {},
                                          [&](const char* step) {
                                            if (stop == step) throw std::runtime_error("stop");
                                          }),
                    std::runtime_error);
    CHECK_FALSE(std::filesystem::exists(p));
    CHECK_FALSE(std::filesystem::exists(tmp_of(p)));
  }
}

TEST_CASE("an empty segment is valid") {
  test::TempDir dir;
  const auto path = dir.path() / "seg-empty";
  const auto info = memory::write_segment(path, header_for(kOddLayout), {});
  CHECK(info.file_bytes == 2 * 4096);
  memory::SegmentReader reader(path, header_for(kOddLayout), info.footer_hash);
  CHECK(reader.entries().empty());
  reader.read_blocks({}, {});
}
