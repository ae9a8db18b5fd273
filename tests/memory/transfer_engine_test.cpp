// The transfer engine over host pools (the CPU backend's tiers): every copy op moves exactly the
// right bytes for scattered id lists at block sizes that are not powers of two, Transfers are
// idempotent and wait when destroyed, and bad requests are refused with the op, index and id.
// The GPU paths are tested in tests/gpu/transfer_engine_cuda_test.cpp.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "den/memory/file_io.h"
#include "den/memory/transfer_engine.h"
#include "test_support.h"

using namespace den;

namespace {

// 360 bytes and 3360 bytes per block.
const kernels::KvLayout kSmall{3, 1, 5, 3, kernels::DType::f32};
const kernels::KvLayout kOdd{5, 3, 8, 7, kernels::DType::f16};

char* bytes_of(memory::BlockPool& pool) { return static_cast<char*>(pool.view().blocks); }

void fill_random(memory::BlockPool& pool, std::mt19937& rng) {
  char* p = bytes_of(pool);
  const int64_t n = pool.capacity() * pool.layout().block_bytes();
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<char>(rng());
}

std::vector<char> snapshot(memory::BlockPool& pool) {
  const char* p = bytes_of(pool);
  return {p, p + pool.capacity() * pool.layout().block_bytes()};
}

// `count` distinct ids of [0, capacity) in random order (targets must be distinct).
std::vector<int32_t> random_ids(std::mt19937& rng, int64_t capacity, size_t count) {
  std::vector<int32_t> ids(static_cast<size_t>(capacity));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(count);
  return ids;
}

// The expected result, block by block: to[to_ids[i]] = from[from_ids[i]].
void expect_copy(std::vector<char>& to, const std::vector<char>& from, const std::vector<int32_t>& from_ids,
                 const std::vector<int32_t>& to_ids, int64_t block_bytes) {
  for (size_t i = 0; i < from_ids.size(); ++i) {
    std::memcpy(to.data() + to_ids[i] * block_bytes, from.data() + from_ids[i] * block_bytes,
                static_cast<size_t>(block_bytes));
  }
}

}  // namespace

TEST_CASE("transfer engine: every op moves the right bytes between host pools") {
  std::mt19937 rng(71);
  for (const auto& layout : {kSmall, kOdd}) {
    for (auto dram_placement : {memory::Placement::host, memory::Placement::pinned_host}) {
      const int64_t bb = layout.block_bytes();
      CAPTURE(bb);
      memory::BlockPool fast(layout, 97, memory::Placement::host, false);
      memory::BlockPool dram(layout, 131, dram_placement, false);
      fill_random(fast, rng);
      fill_random(dram, rng);
      memory::TransferEngine engine(fast, dram);

      for (size_t n : {size_t{1}, size_t{2}, size_t{37}, size_t{97}}) {
        CAPTURE(n);
        {  // dram -> fast
          const auto from = random_ids(rng, dram.capacity(), n), to = random_ids(rng, fast.capacity(), n);
          auto expected = snapshot(fast);
          expect_copy(expected, snapshot(dram), from, to, bb);
          auto t = engine.dram_to_fast(from, to);
          t.wait();
          CHECK(t.bytes() == static_cast<int64_t>(n) * bb);
          CHECK(snapshot(fast) == expected);
        }
        {  // fast -> dram
          const auto from = random_ids(rng, fast.capacity(), n), to = random_ids(rng, dram.capacity(), n);
          auto expected = snapshot(dram);
          expect_copy(expected, snapshot(fast), from, to, bb);
          engine.fast_to_dram(from, to).wait();
          CHECK(snapshot(dram) == expected);
        }
        {  // fast -> fast, sources and targets disjoint
          const auto ids = random_ids(rng, fast.capacity(), std::min<size_t>(2 * n, 96));
          const std::vector<int32_t> from(ids.begin(), ids.begin() + static_cast<long>(ids.size() / 2));
          const std::vector<int32_t> to(ids.begin() + static_cast<long>(ids.size() / 2),
                                        ids.begin() + static_cast<long>(2 * (ids.size() / 2)));
          auto expected = snapshot(fast);
          expect_copy(expected, snapshot(fast), from, to, bb);
          engine.fast_to_fast(from, to).wait();
          CHECK(snapshot(fast) == expected);
        }
        {  // fast -> host buffers -> (other) fast blocks
          const auto from = random_ids(rng, fast.capacity(), n);
          std::vector<std::vector<char>> buffers(n, std::vector<char>(static_cast<size_t>(bb)));
          std::vector<void*> hosts;
          for (auto& b : buffers) hosts.push_back(b.data());
          const auto before = snapshot(fast);
          engine.fast_to_host(from, hosts).wait();
          for (size_t i = 0; i < n; ++i) {
            REQUIRE(std::memcmp(buffers[i].data(), before.data() + from[i] * bb, static_cast<size_t>(bb)) == 0);
          }
          for (auto& b : buffers) {
            for (auto& c : b) c = static_cast<char>(rng());
          }
          const auto to = random_ids(rng, fast.capacity(), n);
          std::vector<const void*> sources(hosts.begin(), hosts.end());
          auto expected = snapshot(fast);
          for (size_t i = 0; i < n; ++i) std::memcpy(expected.data() + to[i] * bb, buffers[i].data(), buffers[i].size());
          engine.host_to_fast(sources, to).wait();
          CHECK(snapshot(fast) == expected);
        }
        {  // staging -> fast, twice, the second buffer taken back from the engine's pool
          for (int round = 0; round < 2; ++round) {
            memory::HostStaging staging = engine.host_staging(static_cast<int64_t>(n) * bb);
            REQUIRE(staging.bytes() >= static_cast<int64_t>(n) * bb);
            CHECK(reinterpret_cast<uintptr_t>(staging.data()) % memory::kDirectIoAlignment == 0);
            auto* p = static_cast<char*>(staging.data());
            for (int64_t i = 0; i < static_cast<int64_t>(n) * bb; ++i) p[i] = static_cast<char>(rng());
            const auto to = random_ids(rng, fast.capacity(), n);
            auto expected = snapshot(fast);
            for (size_t i = 0; i < n; ++i) std::memcpy(expected.data() + to[i] * bb, p + i * bb, static_cast<size_t>(bb));
            CHECK(engine.staging_to_fast(staging, to).bytes() == static_cast<int64_t>(n) * bb);
            CHECK(snapshot(fast) == expected);
          }
          memory::HostStaging small = engine.host_staging(bb);  // rounded up to a page
          std::vector<int32_t> one_too_many(static_cast<size_t>(small.bytes() / bb + 1));
          std::iota(one_too_many.begin(), one_too_many.end(), 0);
          CHECK_THROWS_WITH_AS(engine.staging_to_fast(small, one_too_many),
                               doctest::Contains("from a staging buffer of"), std::invalid_argument);
        }
      }
    }
  }
}

TEST_CASE("transfer engine: wait is idempotent, a moved-from or empty Transfer is done, destroying one waits") {
  std::mt19937 rng(72);
  memory::BlockPool fast(kOdd, 8, memory::Placement::host, false);
  memory::BlockPool dram(kOdd, 8, memory::Placement::pinned_host, false);
  fill_random(fast, rng);
  fill_random(dram, rng);
  memory::TransferEngine engine(fast, dram);
  const std::vector<int32_t> from = {7, 0, 3}, to = {2, 5, 4};
  auto expected = snapshot(fast);
  expect_copy(expected, snapshot(dram), from, to, kOdd.block_bytes());

  memory::Transfer t = engine.dram_to_fast(from, to);
  t.wait();
  t.wait();
  CHECK(t.ready());
  memory::Transfer moved = std::move(t);
  CHECK(t.ready());  // NOLINT(bugprone-use-after-move): moved-from is done by contract
  t.wait();
  CHECK(moved.bytes() == 3 * kOdd.block_bytes());
  {
    memory::Transfer dropped = engine.fast_to_dram(std::vector<int32_t>{1}, std::vector<int32_t>{6});
  }  // destroyed without wait(): it waited
  CHECK(std::memcmp(bytes_of(dram) + 6 * kOdd.block_bytes(), bytes_of(fast) + 1 * kOdd.block_bytes(),
                    static_cast<size_t>(kOdd.block_bytes())) == 0);
  CHECK(snapshot(fast) == expected);
  memory::Transfer empty = engine.dram_to_fast({}, {});
  CHECK(empty.ready());
  CHECK(empty.bytes() == 0);
  memory::Transfer none;
  none.wait();
  CHECK(none.ready());
}

TEST_CASE("transfer engine: bad requests are refused naming the op, the index and the id") {
  memory::BlockPool fast(kSmall, 4, memory::Placement::host, false);
  memory::BlockPool dram(kSmall, 6, memory::Placement::host, false);
  memory::TransferEngine engine(fast, dram);
  const std::vector<int32_t> two = {0, 1}, three = {0, 1, 2}, bad_dram = {0, 1, 6}, bad_fast = {3, -1};
  CHECK_THROWS_WITH_AS(engine.dram_to_fast(two, three), doctest::Contains("dram_to_fast: 2 source blocks but 3"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(engine.dram_to_fast(bad_dram, three), doctest::Contains("dram_blocks[2] = 6"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(engine.fast_to_dram(bad_fast, two), doctest::Contains("fast_to_dram: fast_blocks[1] = -1"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(engine.fast_to_fast(two, std::vector<int32_t>{2, 0}),
                       doctest::Contains("fast_to_fast: dst_blocks[1] = 0 is also a source"), std::invalid_argument);
  std::vector<char> buffer(static_cast<size_t>(kSmall.block_bytes()));
  std::vector<void*> hosts = {buffer.data()};
  CHECK_THROWS_WITH_AS(engine.fast_to_host(std::vector<int32_t>{4}, hosts), doctest::Contains("fast_to_host: fast_blocks[0] = 4"),
                       std::invalid_argument);
  std::vector<const void*> null_host = {nullptr};
  CHECK_THROWS_WITH_AS(engine.host_to_fast(null_host, std::vector<int32_t>{0}), doctest::Contains("hosts[0] is null"),
                       std::invalid_argument);

  memory::BlockPool other(kOdd, 4, memory::Placement::host, false);
  CHECK_THROWS_WITH_AS(memory::TransferEngine(fast, other), doctest::Contains("different layouts"), std::invalid_argument);
}

TEST_CASE("transfer engine: measure reports both directions - DEN_TRANSFER_PATH is parsed") {
  memory::BlockPool fast(kSmall, 4, memory::Placement::host, false);
  memory::BlockPool dram(kSmall, 4, memory::Placement::host, false);
  memory::TransferEngine engine(fast, dram);
  const auto bw = engine.measure(int64_t{1} << 20);
  MESSAGE("host memcpy: " << bw.dram_to_fast / 1e9 << " GB/s in, " << bw.fast_to_dram / 1e9 << " GB/s out");
  CHECK(bw.dram_to_fast > 0);
  CHECK(bw.fast_to_dram > 0);
  CHECK(engine.path() != memory::TransferPath::automatic);

  ::unsetenv("DEN_TRANSFER_PATH");
  CHECK(memory::transfer_path_from_env() == memory::TransferPath::automatic);
  ::setenv("DEN_TRANSFER_PATH", "memcpy-batch", 1);
  CHECK(memory::transfer_path_from_env() == memory::TransferPath::memcpy_batch);
  ::setenv("DEN_TRANSFER_PATH", "staged", 1);
  CHECK(memory::transfer_path_from_env() == memory::TransferPath::staged);
  ::setenv("DEN_TRANSFER_PATH", "fast", 1);
  CHECK_THROWS_WITH_AS(memory::transfer_path_from_env(), doctest::Contains("auto, kernel, memcpy-batch or staged"),
                       std::invalid_argument);
  ::unsetenv("DEN_TRANSFER_PATH");
  CHECK(std::string(memory::transfer_path_name(memory::TransferPath::memcpy_batch)) == "memcpy-batch");
}
