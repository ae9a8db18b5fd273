// The session memory manager on the CPU tiers: every verb, prefix sharing, fork and
// copy-on-write, eviction under a pool of a few blocks with 1,000 sessions, pins, checkpoint /
// hibernate / wake with bit-identical KV, incremental checkpoints (bytes counted), the cost
// model, quarantine of a damaged segment, a changed model fingerprint and a quota.
// The fake engine of fake_kv.h writes the KV, so any block in the wrong place, stale or
// half-copied shows up as a wrong value.
#include <chrono>
#include <cstring>
#include <fstream>
#include <future>
#include <map>

#include "den/memory/session_manager.h"
#include "fake_kv.h"
#include "test_support.h"

using namespace den;
using memory::SessionManager;
using memory::Tier;

namespace {

const kernels::KvLayout kLayout{2, 2, 4, 4, kernels::DType::f32};  // 4 tokens per block, 512 bytes

memory::MemoryConfig config(int64_t fast_blocks, int64_t dram_blocks = 0, std::filesystem::path state = {}) {
  memory::MemoryConfig c;
  c.layout = kLayout;
  c.model_fingerprint = 0xfeedULL;
  c.fast_blocks = fast_blocks;
  c.dram_blocks = dram_blocks;
  c.state_dir = std::move(state);
  c.poison = true;
  c.cost_model = false;
  return c;
}

int32_t run(SessionManager& m, memory::SessionId id) { return test::fake_compute_missing(m, id); }

std::vector<int32_t> sequence(int32_t first, int n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[static_cast<size_t>(i)] = first + i * 7 % 251;
  return t;
}

}  // namespace

TEST_CASE("session: append, compute through a lease, and the KV is where the lease said") {
  SessionManager m(config(16));
  const auto id = m.create("a");
  CHECK(m.find("a") == id);
  m.append(id, sequence(5, 10));
  CHECK(run(m, id) == 10);
  CHECK(m.info(id).kv_tokens == 10);
  CHECK(m.info(id).tier == Tier::fast);
  m.append(id, sequence(9, 3));
  CHECK(run(m, id) == 3);
  CHECK(test::fake_kv_is_exact(m, id));
  CHECK(m.stats().fast_used == 4);  // 13 tokens in blocks of 4
  CHECK(m.stats().tokens_computed == 13);
  CHECK(m.stats().tokens_recomputed == 0);
  CHECK_THROWS_AS(m.create("a"), memory::SessionError);
  CHECK_THROWS_AS(m.info(999), memory::SessionError);
  CHECK_THROWS_AS(m.lease(id, 5), memory::SessionError);  // a lease covers the whole history
}

TEST_CASE("session: two sessions with the same 1K-token prefix hold one copy of it") {
  SessionManager m(config(1200));
  const std::vector<int32_t> prefix = sequence(1, 1024);
  const auto a = m.create();
  m.append(a, prefix);
  m.append(a, sequence(300, 5));
  CHECK(run(m, a) == 1029);
  const int64_t used_by_a = m.stats().fast_used;
  CHECK(used_by_a == 258);

  const auto b = m.create();
  m.append(b, prefix);
  m.append(b, sequence(400, 9));
  CHECK(run(m, b) == 9);  // only its own tail is computed
  CHECK(m.stats().prefix_hit_tokens == 1024);
  CHECK(m.stats().fast_used == used_by_a + 3);  // 9 tokens: 3 blocks of its own
  CHECK(test::fake_kv_is_exact(m, a));
  CHECK(test::fake_kv_is_exact(m, b));

  // Dropping the first owner keeps the shared blocks alive for the second.
  m.drop(a);
  CHECK(test::fake_kv_is_exact(m, b));
  CHECK(m.stats().fast_used == 256 + 3);
}

TEST_CASE("session: fork shares blocks and copies a partial block before writing it") {
  SessionManager m(config(64));
  const auto a = m.create();
  m.append(a, sequence(2, 10));  // blocks: 4 + 4 + 2 (partial)
  run(m, a);
  const auto b = m.fork(a, "b");
  CHECK(m.stats().fast_used == 3);
  CHECK(m.info(b).kv_tokens == 10);

  m.append(a, sequence(100, 3));
  m.append(b, sequence(200, 5));
  CHECK(run(m, a) == 3);
  CHECK(run(m, b) == 5);
  CHECK(test::fake_kv_is_exact(m, a));
  CHECK(test::fake_kv_is_exact(m, b));
  // Two full shared blocks; a: its partial copy (the original) + 1; b: a copy + 1.
  CHECK(m.stats().fast_used == 2 + 2 + 2);
  CHECK_THROWS_AS(m.fork(a, "b"), memory::SessionError);  // the name is taken
}

TEST_CASE("session: truncate keeps a prefix - front truncation recomputes") {
  SessionManager m(config(32));
  const auto a = m.create();
  m.append(a, sequence(3, 14));
  run(m, a);
  m.truncate(a, 6);
  CHECK(m.info(a).kv_tokens == 6);
  CHECK(m.tokens(a).size() == 6);
  m.append(a, sequence(50, 4));
  CHECK(run(m, a) == 4);
  CHECK(test::fake_kv_is_exact(m, a));
  CHECK(m.stats().tokens_recomputed == 0);  // new tokens after a truncation are new work

  m.truncate_front(a, 2);
  CHECK(m.tokens(a).size() == 8);
  CHECK(m.info(a).kv_tokens == 0);
  CHECK(run(m, a) == 8);
  CHECK(test::fake_kv_is_exact(m, a));
  CHECK_THROWS_AS(m.truncate(a, 100), memory::SessionError);
}

TEST_CASE("session: 1,000 sessions through a pool of a few blocks - pins hold") {
  SessionManager m(config(12, 40));
  const auto pinned = m.create("pinned");
  m.append(pinned, sequence(7, 8));
  run(m, pinned);
  m.pin(pinned);

  std::vector<memory::SessionId> ids;
  for (int i = 0; i < 1000; ++i) {
    const auto id = m.create();
    m.append(id, sequence(10 + i, 6 + i % 7));
    run(m, id);
    ids.push_back(id);
    const auto st = m.stats();
    REQUIRE(st.fast_used <= st.fast_capacity);
    REQUIRE(st.dram_used <= st.dram_capacity);
  }
  CHECK(m.info(pinned).fast_blocks == 2);
  CHECK(m.stats().blocks_evicted > 0);
  CHECK(m.stats().kv_tokens_dropped > 0);  // DRAM holds 40 blocks: most KV had to go

  // Every session still computes to exact KV; the recently used ones come back from DRAM.
  std::mt19937 rng(5);
  for (int k = 0; k < 200; ++k) {
    const auto id = ids[std::uniform_int_distribution<size_t>(0, ids.size() - 1)(rng)];
    run(m, id);
    REQUIRE(test::fake_kv_is_exact(m, id));
  }
  CHECK(m.stats().tokens_loaded > 0);
  CHECK(m.stats().tokens_recomputed > 0);
  CHECK(test::fake_kv_is_exact(m, pinned));
  CHECK(m.info(pinned).fast_blocks == 2);
  CHECK_THROWS_AS(m.hibernate(pinned, Tier::dram), memory::SessionError);
  m.unpin(pinned);
  m.hibernate(pinned, Tier::dram)->wait_or_throw();
  CHECK(m.info(pinned).fast_blocks == 0);
}

TEST_CASE("session: a lease that cannot find room fails cleanly") {
  SessionManager m(config(4));
  const auto a = m.create();
  m.append(a, sequence(1, 12));
  run(m, a);
  m.pin(a);
  const auto b = m.create();
  m.append(b, sequence(2, 8));
  CHECK_FALSE(m.lease(b, 8).has_value());  // 3 pinned blocks of 4
  CHECK(m.stats().fast_used == 3);
  m.unpin(a);
  CHECK(run(m, b) == 8);
  CHECK(test::fake_kv_is_exact(m, b));
}

TEST_CASE("session: hibernate to DRAM and SSD, wake, with bit-identical KV") {
  test::TempDir dir;
  SessionManager m(config(64, 64, dir.path()));
  const auto a = m.create("a");
  m.append(a, sequence(11, 23));
  run(m, a);
  const std::vector<float> before = test::kv_image(m, a);

  m.hibernate(a, Tier::dram)->wait_or_throw();
  CHECK(m.info(a).tier == Tier::dram);
  CHECK(m.info(a).fast_blocks == 0);
  m.wake(a)->wait_or_throw();
  CHECK(m.info(a).tier == Tier::fast);
  CHECK(test::kv_image(m, a) == before);

  auto op = m.hibernate(a, Tier::ssd);
  op->wait_or_throw();
  CHECK(op->total_bytes() == 6 * kLayout.block_bytes());
  CHECK(m.info(a).tier == Tier::ssd);
  CHECK(m.info(a).fast_blocks == 0);
  CHECK(m.info(a).dram_blocks == 0);
  CHECK(m.info(a).checkpoint_current);
  m.wake(a)->wait_or_throw();
  CHECK(test::kv_image(m, a) == before);
  CHECK(m.stats().bytes_ssd_read == 6 * kLayout.block_bytes());
  CHECK(m.stats().tokens_recomputed == 0);
}

TEST_CASE("session: a checkpointed store reopens with the same KV and nothing recomputed") {
  test::TempDir dir;
  std::vector<float> before;
  memory::SessionId a = 0, b = 0;
  {
    SessionManager m(config(64, 0, dir.path()));
    a = m.create("a");
    m.append(a, sequence(11, 41));
    run(m, a);
    b = m.fork(a, "b");
    m.append(b, sequence(99, 3));
    run(m, b);
    before = test::kv_image(m, a);
    m.checkpoint(a)->wait_or_throw();
    m.checkpoint(b)->wait_or_throw();
    m.pin(b);
  }
  SessionManager m(config(64, 0, dir.path()));
  CHECK(m.list().size() == 2);
  CHECK(m.find("b") == b);
  CHECK(m.info(a).tier == Tier::ssd);
  CHECK(m.info(a).generation == 1);
  CHECK(m.info(b).pinned);
  CHECK(test::kv_image(m, a) == before);
  CHECK(test::fake_kv_is_exact(m, b));
  CHECK(m.stats().tokens_recomputed == 0);
  CHECK(m.stats().tokens_computed == 0);
  // The shared 40-token prefix came back as one copy.
  CHECK(m.stats().fast_used == 11 + 1);
}

TEST_CASE("session: appending one token to a checkpointed 32K-token session writes one block") {
  test::TempDir dir;
  SessionManager m(config(8300, 0, dir.path()));
  const auto a = m.create();
  m.append(a, sequence(1, 32 * 1024 + 2));  // ends in a partial block
  run(m, a);
  m.checkpoint(a)->wait_or_throw();
  const int64_t first = m.stats().bytes_ssd_written;
  CHECK(first == 8193 * kLayout.block_bytes());

  m.append(a, sequence(7, 1));
  run(m, a);
  m.checkpoint(a)->wait_or_throw();
  CHECK(m.stats().bytes_ssd_written - first == kLayout.block_bytes());  // the partial block, rewritten

  m.append(a, sequence(8, 1));  // fills the block
  m.append(a, sequence(9, 1));  // and starts a new one
  run(m, a);
  const int64_t before_third = m.stats().bytes_ssd_written;
  m.checkpoint(a)->wait_or_throw();
  CHECK(m.stats().bytes_ssd_written - before_third == 2 * kLayout.block_bytes());
  // A checkpoint with nothing new writes no block.
  const int64_t before_fourth = m.stats().bytes_ssd_written;
  m.checkpoint(a)->wait_or_throw();
  CHECK(m.stats().bytes_ssd_written == before_fourth);
  // Superseded partial blocks' segments are collected: far less than two copies on disk.
  CHECK(m.stats().ssd_bytes < 2 * 8194 * 4096);
}

TEST_CASE("session: the cost model recomputes when that is faster than loading") {
  test::TempDir dir;
  auto c = config(64, 0, dir.path());
  c.cost_model = true;
  c.costs.ssd_read_bytes_per_s = 1e3;       // a very slow disk
  c.costs.prefill_tokens_per_s = 1e6;       // a very fast engine
  SessionManager m(c);
  const auto a = m.create();
  m.append(a, sequence(4, 30));
  run(m, a);
  m.hibernate(a, Tier::ssd)->wait_or_throw();
  const memory::RestorePlan plan = m.restore_plan(a);
  CHECK(plan.recompute_tokens == 30);
  CHECK(plan.load_tokens == 0);
  CHECK(plan.all_recompute_s < plan.all_load_s);
  CHECK(run(m, a) == 30);
  CHECK(m.stats().tokens_recomputed == 30);
  CHECK(m.stats().bytes_ssd_read == 0);
  CHECK(test::fake_kv_is_exact(m, a));

  // And loads when the disk is the faster way.
  const memory::RestorePlan slow = memory::plan_restore({1e9, 1e9, 10.0, 0, false}, Tier::ssd, 30, 128);
  CHECK(slow.load_tokens == 30);
  // With layer-wise overlap a split can beat both.
  const memory::RestorePlan split = memory::plan_restore({1e9, 1e6, 1e4, 0, true}, Tier::ssd, 1000, 100);
  CHECK(split.load_tokens > 0);
  CHECK(split.recompute_tokens > 0);
  CHECK(split.total_s < std::min(split.all_load_s, split.all_recompute_s));
}

TEST_CASE("session: a damaged segment is quarantined and its session recomputes, once") {
  test::TempDir dir;
  memory::SessionId a = 0;
  {
    SessionManager m(config(64, 0, dir.path()));
    a = m.create("a");
    m.append(a, sequence(3, 20));
    run(m, a);
    m.checkpoint(a)->wait_or_throw();
  }
  std::filesystem::path segment;
  for (const auto& e : std::filesystem::directory_iterator(dir.path() / "kv")) segment = e.path();
  REQUIRE(!segment.empty());
  {
    std::fstream f(segment, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(8192 + 100);  // inside the payload
    f.put('\x5a');
  }
  SessionManager m(config(64, 0, dir.path()));
  CHECK(m.tokens(a).size() == 20);
  CHECK(run(m, a) == 20);  // every block came from the bad segment
  CHECK(test::fake_kv_is_exact(m, a));
  CHECK(m.stats().segments_quarantined == 1);
  CHECK(m.stats().tokens_recomputed == 20);
  m.hibernate(a, Tier::ssd)->wait_or_throw();
  run(m, a);
  CHECK(m.stats().segments_quarantined == 1);
  CHECK(test::fake_kv_is_exact(m, a));
}

TEST_CASE("session: KV of another model is never loaded - its tokens are kept") {
  test::TempDir dir;
  {
    SessionManager m(config(64, 0, dir.path()));
    const auto a = m.create("a");
    m.append(a, sequence(3, 20));
    run(m, a);
    m.checkpoint(a)->wait_or_throw();
  }
  auto other = config(64, 0, dir.path());
  other.model_fingerprint = 0xbeef;
  {
    SessionManager m(other);
    const auto a = *m.find("a");
    CHECK(m.tokens(a).size() == 20);
    CHECK(m.info(a).kv_tokens == 0);
    CHECK(run(m, a) == 20);
    CHECK(m.stats().bytes_ssd_read == 0);
    m.checkpoint(a)->wait_or_throw();
    CHECK(m.stats().ssd_bytes > 0);
  }
  // The new model's checkpoint is the one that counts now.
  SessionManager m(other);
  const auto a = *m.find("a");
  CHECK(m.info(a).kv_tokens == 20);
  CHECK(run(m, a) == 0);
  CHECK(test::fake_kv_is_exact(m, a));
}

TEST_CASE("session: the SSD quota takes stored KV from the least valuable hibernated session") {
  int64_t segment_bytes = 0;  // what one 16-token session's checkpoint takes
  {
    test::TempDir probe;
    SessionManager m(config(64, 0, probe.path()));
    const auto id = m.create();
    m.append(id, sequence(1, 16));
    run(m, id);
    m.checkpoint(id)->wait_or_throw();
    segment_bytes = m.stats().ssd_bytes;
  }
  REQUIRE(segment_bytes > 0);
  test::TempDir dir;
  auto c = config(64, 0, dir.path());
  c.ssd_quota_bytes = segment_bytes * 5 / 2;  // room for two
  SessionManager m(c);
  std::vector<memory::SessionId> ids;
  for (int i = 0; i < 4; ++i) {
    const auto id = m.create();
    m.append(id, sequence(100 * i + 1, 16));
    run(m, id);
    m.hibernate(id, Tier::ssd)->wait_or_throw();
    ids.push_back(id);
    CHECK(m.stats().ssd_bytes <= c.ssd_quota_bytes);
  }
  CHECK(m.info(ids[0]).kv_tokens == 0);  // the oldest ones lost their KV, kept their tokens
  CHECK(m.info(ids[1]).kv_tokens == 0);
  CHECK(m.tokens(ids[0]).size() == 16);
  CHECK(m.info(ids[3]).tier == Tier::ssd);
  for (auto id : ids) {
    run(m, id);
    CHECK(test::fake_kv_is_exact(m, id));
  }
}

TEST_CASE("session: bad requests change nothing") {
  test::TempDir dir;
  SessionManager m(config(8, 0, dir.path()));
  const auto a = m.create();
  m.append(a, sequence(1, 5));
  run(m, a);
  CHECK_THROWS_AS(m.append(a, std::vector<int32_t>{4, -1}), memory::SessionError);
  CHECK(m.tokens(a).size() == 5);
  CHECK_THROWS_AS(m.truncate_front(a, 6), memory::SessionError);
  CHECK_THROWS_AS(m.hibernate(a, Tier::fast), memory::SessionError);
  CHECK_THROWS_AS(m.checkpoint(77), memory::SessionError);
  {
    auto lease = m.lease(a, 5);
    REQUIRE(lease.has_value());
    CHECK_THROWS_AS(m.drop(a), memory::SessionError);
    CHECK_THROWS_AS(m.fork(a), memory::SessionError);
    CHECK_THROWS_AS(lease->computed(9), memory::SessionError);
  }
  SessionManager no_ssd(config(8));
  const auto b = no_ssd.create();
  CHECK_THROWS_AS(no_ssd.hibernate(b, Tier::ssd), memory::SessionError);
  CHECK_THROWS_AS(no_ssd.hibernate(b, Tier::dram), memory::SessionError);
  auto op = no_ssd.checkpoint(b);
  op->wait();
  CHECK(op->state() == memory::Operation::State::failed);
  CHECK(op->error().find("state directory") != std::string::npos);
  CHECK(test::fake_kv_is_exact(m, a));
}

TEST_CASE("session: export to one file and import elsewhere, KV and all") {
  test::TempDir dir;
  const auto file = dir.path() / "story.densession";
  std::vector<float> image;
  std::vector<int32_t> tokens;
  {
    SessionManager m(config(64, 16, dir.path() / "a"));
    const auto id = m.create("story");
    m.append(id, sequence(21, 37));
    run(m, id);
    m.hibernate(id, Tier::dram)->wait_or_throw();  // exported from wherever it is
    image = test::kv_image(m, id);
    tokens = m.tokens(id);
    auto op = m.export_session(id, file);
    op->wait_or_throw();
    CHECK(op->total_bytes() > 10 * kLayout.block_bytes());
  }
  {
    SessionManager m(config(64, 0, dir.path() / "b"));
    const auto id = m.import_session(file, "copy");
    CHECK(m.tokens(id) == tokens);
    CHECK(m.info(id).kv_tokens == 37);
    CHECK(test::kv_image(m, id) == image);
    CHECK(run(m, id) == 0);
    CHECK(m.stats().tokens_recomputed == 0);
  }
  // The imported history is durable in its new store.
  {
    SessionManager m(config(64, 0, dir.path() / "b"));
    CHECK(m.tokens(*m.find("copy")) == tokens);
  }
  // Another model: the tokens come, the KV does not.
  {
    auto other = config(64);
    other.model_fingerprint = 0xabc;
    SessionManager m(other);
    const auto id = m.import_session(file);
    CHECK(m.tokens(id) == tokens);
    CHECK(m.info(id).kv_tokens == 0);
  }
  // Damage anywhere is refused, and nothing is created.
  const std::string good = test::read_file(file.string());
  for (size_t at : {size_t{3}, size_t{60}, good.size() / 2, good.size() - 3}) {
    std::string bad = good;
    bad[at] ^= 0x40;
    test::write_file(file.string(), bad);
    SessionManager m(config(64));
    CHECK_THROWS_AS(m.import_session(file), memory::SessionError);
    CHECK(m.list().empty());
  }
  test::write_file(file.string(), good.substr(0, good.size() - 100));
  SessionManager m(config(64));
  CHECK_THROWS_WITH_AS(m.import_session(file), doctest::Contains("cut short"), memory::SessionError);
}

TEST_CASE("session: eviction gives up the session that is cheapest to bring back, not just the oldest") {
  test::TempDir dir;
  auto c = config(7, 0, dir.path());  // 3 + 3 blocks taken, the newcomer needs 2
  c.costs.prefill_tokens_per_s = 10;     // recomputing is very slow
  c.costs.ssd_read_bytes_per_s = 1e10;   // reading a stored block is quick
  SessionManager m(c);
  const auto older = m.create();
  m.append(older, sequence(1, 12));
  run(m, older);
  const auto stored = m.create();
  m.append(stored, sequence(50, 12));
  run(m, stored);
  m.checkpoint(stored)->wait_or_throw();

  const auto newcomer = m.create();
  m.append(newcomer, sequence(90, 8));
  run(m, newcomer);  // someone must go
  CHECK(m.info(older).tier == Tier::fast);  // older, but only a recompute would bring it back
  CHECK(m.info(stored).tier == Tier::ssd);
  CHECK(m.stats().kv_tokens_dropped == 0);
  CHECK(test::fake_kv_is_exact(m, stored));
}

TEST_CASE("session: a layer-wise lease wakes from DRAM and settles before the blocks are shared") {
  SessionManager m(config(32, 32));
  const auto a = m.create();
  m.append(a, sequence(3, 21));
  run(m, a);
  const std::vector<float> before = test::kv_image(m, a);
  m.hibernate(a, Tier::dram)->wait_or_throw();
  m.append(a, sequence(70, 2));
  {
    auto lease = m.lease(a, 23, true);
    REQUIRE(lease.has_value());
    REQUIRE(lease->arrival() != nullptr);
    for (int32_t layer = 0; layer < kLayout.n_layers; ++layer) lease->arrival()->before_layer(layer, nullptr);
    test::fake_compute(m, *lease);
    CHECK(lease->arrival() == nullptr);  // computed() settled it
  }
  CHECK(test::fake_kv_is_exact(m, a));
  const std::vector<float> after = test::kv_image(m, a);
  CHECK(std::equal(before.begin(), before.end(), after.begin()));
  // A fork taken right after shares settled blocks.
  const auto b = m.fork(a);
  CHECK(test::fake_kv_is_exact(m, b));
  CHECK(m.stats().tokens_recomputed == 0);
}

// With the front's layers arriving while the engine computes, loading part and recomputing the
// rest overlap, and the cost model may split: here loading and recomputing a token cost the same,
// so half is loaded and half recomputed. A whole-block wake of the same session loads it all.
TEST_CASE("session: a layer-wise wake over a slow link loads the front and recomputes the tail") {
  auto c = config(64, 64);
  c.cost_model = true;
  const double bytes_per_token = static_cast<double>(kLayout.block_bytes()) / kLayout.block_tokens;
  c.costs.prefill_tokens_per_s = 1e3;
  c.costs.dram_to_fast_bytes_per_s = bytes_per_token * 1e3;  // a token loads as fast as it computes
  SessionManager m(c);
  const auto a = m.create();
  m.append(a, sequence(5, 40));  // ten full blocks
  run(m, a);
  m.hibernate(a, Tier::dram)->wait_or_throw();
  m.append(a, sequence(80, 2));
  {
    auto lease = m.lease(a, 42, true);
    REQUIRE(lease.has_value());
    CHECK(lease->kv_tokens() == 20);  // the front, five blocks
    if (lease->arrival() != nullptr) {
      for (int32_t layer = 0; layer < kLayout.n_layers; ++layer) lease->arrival()->before_layer(layer, nullptr);
    }
    test::fake_compute(m, *lease);
  }
  CHECK(test::fake_kv_is_exact(m, a));
  CHECK(m.stats().tokens_recomputed == 20);

  // Without the overlap the two parts would run one after the other: an end point wins.
  const auto b = m.create();
  m.append(b, sequence(7, 40));
  run(m, b);
  m.hibernate(b, Tier::dram)->wait_or_throw();
  m.append(b, sequence(90, 2));
  {
    auto lease = m.lease(b, 42, false);
    REQUIRE(lease.has_value());
    CHECK(lease->kv_tokens() == 40);
    test::fake_compute(m, *lease);
  }
  CHECK(test::fake_kv_is_exact(m, b));
  CHECK(m.stats().tokens_recomputed == 20);
}

// Two sessions of one engine step, both woken layer by layer from DRAM. The second lease must
// not wait for blocks the first leaves arriving: they settle only after the step that would
// hold both (the deadlock `den bench agents` found with a shared system prompt). Done on
// another thread with a deadline, so a regression fails instead of hanging.
TEST_CASE("session: layer-wise leases of one step never wait on each other's arriving blocks") {
  SessionManager m(config(64, 64));
  const std::vector<int32_t> prefix = sequence(1, 16);  // four full blocks, shared
  const auto a = m.create();
  m.append(a, prefix);
  m.append(a, sequence(300, 6));
  run(m, a);
  const auto b = m.create();
  m.append(b, prefix);
  m.append(b, sequence(400, 6));
  CHECK(run(m, b) == 6);  // the prefix was a hit
  m.hibernate(a, Tier::dram)->wait_or_throw();
  m.hibernate(b, Tier::dram)->wait_or_throw();
  m.append(a, sequence(500, 2));
  m.append(b, sequence(600, 2));

  auto first = m.lease(a, 24, true);
  REQUIRE(first.has_value());
  auto second = std::async(std::launch::async, [&] { return m.lease(b, 24, true); });
  const bool returned = second.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  CHECK_MESSAGE(returned, "the second lease waits for the first one's arriving blocks");
  for (int32_t layer = 0; layer < kLayout.n_layers; ++layer) {
    if (first->arrival() != nullptr) first->arrival()->before_layer(layer, nullptr);
  }
  test::fake_compute(m, *first);
  first.reset();
  auto lease_b = second.get();
  REQUIRE(lease_b.has_value());
  test::fake_compute(m, *lease_b);
  lease_b.reset();
  CHECK(test::fake_kv_is_exact(m, a));
  CHECK(test::fake_kv_is_exact(m, b));
  CHECK(m.stats().tokens_recomputed == 0);

  // A newcomer with the same prefix while a's blocks arrive: it takes no prefix hit on them
  // (it computes the prefix) rather than waiting.
  m.hibernate(a, Tier::dram)->wait_or_throw();
  m.drop(b);  // a alone holds the prefix now
  auto again = m.lease(a, 24, true);
  REQUIRE(again.has_value());
  const auto c = m.create();
  m.append(c, prefix);
  m.append(c, sequence(700, 3));
  auto third = std::async(std::launch::async, [&] { return m.lease(c, 19, true); });
  CHECK(third.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  again.reset();
  auto lease_c = third.get();
  REQUIRE(lease_c.has_value());
  test::fake_compute(m, *lease_c);
  lease_c.reset();
  CHECK(test::fake_kv_is_exact(m, a));
  CHECK(test::fake_kv_is_exact(m, c));
}

TEST_CASE("session: drop_kv keeps the history, and computing it again counts as recompute") {
  SessionManager m(config(16));
  const auto id = m.create();
  m.append(id, sequence(5, 10));
  CHECK(run(m, id) == 10);
  m.drop_kv(id);
  CHECK(m.info(id).kv_tokens == 0);
  CHECK(m.info(id).tier == Tier::none);
  CHECK(m.tokens(id) == sequence(5, 10));
  CHECK(m.stats().fast_used == 0);
  CHECK(m.stats().kv_tokens_dropped == 10);
  m.append(id, sequence(50, 2));
  CHECK(run(m, id) == 12);
  CHECK(m.stats().tokens_recomputed == 10);
  CHECK(m.stats().tokens_computed == 12);
  CHECK(test::fake_kv_is_exact(m, id));
}
