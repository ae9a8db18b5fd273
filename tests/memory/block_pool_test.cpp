// Host block pool and per-sequence block tables.
#include <cmath>
#include <set>
#include <string>

#include "den/memory/block_pool.h"
#include "test_support.h"

using namespace den;

namespace {
const kernels::KvLayout kLayout{2, 2, 8, 4, kernels::DType::f32};
}

TEST_CASE("blocks are handed out once and come back") {
  memory::BlockPool pool(kLayout, 5, memory::Placement::host, false);
  std::set<int32_t> ids;
  for (int i = 0; i < 5; ++i) ids.insert(*pool.allocate());
  CHECK(ids.size() == 5);
  CHECK(*ids.begin() == 0);
  CHECK(*ids.rbegin() == 4);
  CHECK_FALSE(pool.allocate().has_value());
  pool.release(3);
  CHECK(pool.allocate() == 3);
}

TEST_CASE("poisoned blocks hold NaN until written") {
  memory::BlockPool pool(kLayout, 2, memory::Placement::host, true);
  const int32_t b = *pool.allocate();
  const auto* p = static_cast<const float*>(pool.view().blocks) + b * kLayout.block_elements();
  for (int64_t i = 0; i < kLayout.block_elements(); ++i) REQUIRE(std::isnan(p[i]));
}

TEST_CASE("SequenceBlocks reserves, shrinks, and returns its blocks when destroyed") {
  memory::BlockPool pool(kLayout, 4, memory::Placement::host, false);
  {
    memory::SequenceBlocks seq(pool);
    CHECK(seq.reserve(5));  // 4 tokens per block: 2 blocks
    CHECK(seq.table().size() == 2);
    CHECK(seq.reserve(16));
    CHECK(pool.free_blocks() == 0);
    CHECK_FALSE(seq.reserve(17));      // the pool is short
    CHECK(seq.table().size() == 4);    // and nothing changed
    seq.shrink_to(4);
    CHECK(seq.table().size() == 1);
    CHECK(pool.free_blocks() == 3);
    memory::SequenceBlocks moved(std::move(seq));
    CHECK(moved.table().size() == 1);
  }
  CHECK(pool.free_blocks() == 4);
}

TEST_CASE("a pool that cannot exist is refused with its size") {
  CHECK_THROWS_WITH(memory::BlockPool(kLayout, 0, memory::Placement::host, false), doctest::Contains("0 blocks"));
}

TEST_CASE("a pinned_host pool holds data whether or not it could pin it, and poisons like host") {
  memory::BlockPool pool(kLayout, 3, memory::Placement::pinned_host, true);
  CHECK(pool.placement() == memory::Placement::pinned_host);
  // Pinned only with a CUDA device; otherwise ordinary host memory (and says so).
  MESSAGE("pinned_host pool is " << std::string(pool.is_pinned() ? "page-locked" : "ordinary host memory"));
  const int32_t b = *pool.allocate();
  auto* p = static_cast<float*>(pool.view().blocks) + b * kLayout.block_elements();
  for (int64_t i = 0; i < kLayout.block_elements(); ++i) REQUIRE(std::isnan(p[i]));
  for (int64_t i = 0; i < kLayout.block_elements(); ++i) p[i] = static_cast<float>(i) * 0.5f;
  for (int64_t i = 0; i < kLayout.block_elements(); ++i) REQUIRE(p[i] == static_cast<float>(i) * 0.5f);
  CHECK_FALSE(memory::BlockPool(kLayout, 1, memory::Placement::host, false).is_pinned());
}
