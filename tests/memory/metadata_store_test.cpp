// MetadataStore: round trips through a reopened database, transactions that throw and change
// nothing, quarantine and segment garbage collection, and the files it must refuse. The raw
// sqlite3 API is used only to build foreign or future databases and to inspect the journal.
#include <sqlite3.h>

#include <algorithm>
#include <limits>
#include <random>
#include <thread>

#include "den/memory/metadata_store.h"
#include "test_support.h"

using namespace den;
using memory::BlockLocation;
using memory::MetadataStore;
using memory::SegmentRecord;
using memory::SessionRecord;
using memory::StoreError;

namespace {

constexpr uint64_t kHigh = 0xF00DFACE12345678ull;  // >= 2^63: negative once bit-cast to int64

SessionRecord make_session(uint64_t id, std::string name = {}) {
  SessionRecord s;
  s.id = id;
  s.name = std::move(name);
  s.model_fingerprint = 0x8000000000000001ull;
  return s;
}

SegmentRecord make_segment(std::string name) {
  SegmentRecord seg;
  seg.name = std::move(name);
  seg.file_bytes = 4096;
  seg.footer_hash = 0xFFFFFFFFFFFFFFFFull;
  seg.model_fingerprint = 7;
  return seg;
}

BlockLocation make_block(uint64_t hash, const std::string& segment, int32_t index) {
  return BlockLocation{hash, segment, index, 16, hash ^ 0xA5A5A5A5A5A5A5A5ull};
}

void check_same(const SessionRecord& a, const SessionRecord& b) {
  CHECK(a.id == b.id);
  CHECK(a.name == b.name);
  CHECK(a.model_fingerprint == b.model_fingerprint);
  CHECK(a.generation == b.generation);
  CHECK(a.pinned == b.pinned);
  CHECK(a.tokens == b.tokens);
  CHECK(a.kv_tokens == b.kv_tokens);
  CHECK(a.block_hashes == b.block_hashes);
}

// Runs SQL on a database with the plain sqlite3 API, outside the store.
void raw_exec(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  char* err = nullptr;
  const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
  const std::string message = err != nullptr ? err : "";
  sqlite3_free(err);
  sqlite3_close(db);
  REQUIRE_MESSAGE(rc == SQLITE_OK, message);
}

std::string raw_text(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
  std::string out;
  if (sqlite3_step(st) == SQLITE_ROW) out = reinterpret_cast<const char*>(sqlite3_column_text(st, 0));
  sqlite3_finalize(st);
  sqlite3_close(db);
  return out;
}

}  // namespace

TEST_CASE("metadata store: a session round-trips every field through a reopen") {
  test::TempDir dir;
  const auto db = dir.file("den.db");
  std::mt19937 rng(42);
  SessionRecord s = make_session(kHigh, "agent-one");
  s.generation = 3;
  s.pinned = true;
  s.tokens.resize(40000);
  for (auto& t : s.tokens) t = static_cast<int32_t>(rng());  // negative ones included
  s.tokens[0] = -1;
  s.tokens[1] = std::numeric_limits<int32_t>::min();
  s.kv_tokens = 32;
  s.block_hashes = {kHigh, 1};
  {
    MetadataStore store(db);
    CHECK(store.schema_version() == 1);
    // Locate the hashes so the record is a consistent one.
    store.create_session(make_session(5));
    store.commit_checkpoint(make_session(5), std::vector{make_segment("seg-0")},
                            std::vector{make_block(kHigh, "seg-0", 0), make_block(1, "seg-0", 1)});
    store.create_session(s);
  }
  MetadataStore store(db);
  CHECK(store.schema_version() == 1);
  const auto loaded = store.load_session(kHigh);
  REQUIRE(loaded.has_value());
  check_same(*loaded, s);
  CHECK_FALSE(store.load_session(6).has_value());
  CHECK(store.max_session_id() == kHigh);
  const auto all = store.load_sessions();
  REQUIRE(all.size() == 2);
  CHECK(all[0].id == 5);  // ordered as uint64: kHigh last
  CHECK(all[0].name.empty());
  check_same(all[1], s);

  const auto loc = store.locate_block(kHigh);
  REQUIRE(loc.has_value());
  CHECK(loc->segment == "seg-0");
  CHECK(loc->index == 0);
  CHECK(loc->tokens == 16);
  CHECK(loc->checksum == (kHigh ^ 0xA5A5A5A5A5A5A5A5ull));
  const auto segs = store.segments();
  REQUIRE(segs.size() == 1);
  CHECK(segs[0].name == "seg-0");
  CHECK(segs[0].file_bytes == 4096);
  CHECK(segs[0].footer_hash == 0xFFFFFFFFFFFFFFFFull);
  CHECK(segs[0].model_fingerprint == 7);
  CHECK_FALSE(segs[0].quarantined);
}

TEST_CASE("metadata store: ids and names are unique, unnamed sessions are not") {
  test::TempDir dir;
  MetadataStore store(dir.file("den.db"));
  CHECK(store.max_session_id() == 0);
  store.create_session(make_session(1, "a"));
  CHECK_THROWS_AS(store.create_session(make_session(1, "b")), StoreError);
  CHECK_THROWS_WITH_AS(store.create_session(make_session(2, "a")), doctest::Contains("'a'"), StoreError);
  store.create_session(make_session(3));
  store.create_session(make_session(4));
  CHECK(store.load_sessions().size() == 3);
  CHECK(store.load_session(1)->name == "a");
  CHECK(store.max_session_id() == 4);
  // The refused name left nothing behind.
  CHECK_FALSE(store.load_session(2).has_value());
}

TEST_CASE("metadata store: updates of one session") {
  test::TempDir dir;
  MetadataStore store(dir.file("den.db"));
  store.create_session(make_session(1));
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  store.save_tokens(1, tokens);
  store.set_pinned(1, true);
  auto s = *store.load_session(1);
  CHECK(s.tokens == tokens);
  CHECK(s.pinned);

  s.kv_tokens = 4;
  s.block_hashes = {11};
  s.generation = 1;
  store.commit_checkpoint(s, std::vector{make_segment("seg")}, std::vector{make_block(11, "seg", 0)});
  // Shorter than the checkpointed KV: refused until the block table is truncated.
  CHECK_THROWS_AS(store.save_tokens(1, std::vector<int32_t>{1, 2}), StoreError);
  CHECK(store.load_session(1)->tokens == tokens);
  store.invalidate_kv(1);
  s = *store.load_session(1);
  CHECK(s.kv_tokens == 0);
  CHECK(s.block_hashes.empty());
  CHECK(s.tokens == tokens);
  CHECK(s.generation == 1);
  store.save_tokens(1, std::vector<int32_t>{});
  CHECK(store.load_session(1)->tokens.empty());
  store.delete_session(1);
  CHECK_FALSE(store.load_session(1).has_value());
}

TEST_CASE("metadata store: unknown session ids are refused by name") {
  test::TempDir dir;
  MetadataStore store(dir.file("den.db"));
  const std::vector<int32_t> tokens = {1};
  CHECK_THROWS_WITH_AS(store.save_tokens(77, tokens), doctest::Contains("77"), StoreError);
  CHECK_THROWS_WITH_AS(store.set_pinned(77, true), doctest::Contains("77"), StoreError);
  CHECK_THROWS_WITH_AS(store.invalidate_kv(77), doctest::Contains("77"), StoreError);
  CHECK_THROWS_WITH_AS(store.delete_session(77), doctest::Contains("77"), StoreError);
  CHECK_THROWS_WITH_AS(store.commit_checkpoint(make_session(77), {}, {}), doctest::Contains("77"), StoreError);
  CHECK(store.load_sessions().empty());
}

TEST_CASE("metadata store: a checkpoint is committed and loaded") {
  test::TempDir dir;
  const auto db = dir.file("den.db");
  SessionRecord s = make_session(9, "ck");
  {
    MetadataStore store(db);
    store.create_session(s);
    s.tokens = {10, 20, 30, 40, 50};
    s.kv_tokens = 5;
    s.block_hashes = {kHigh, 2, kHigh + 1};
    s.generation = 1;
    s.pinned = true;
    store.commit_checkpoint(
        s, std::vector{make_segment("s1"), make_segment("s2")},
        std::vector{make_block(kHigh, "s1", 0), make_block(2, "s1", 1), make_block(kHigh + 1, "s2", 0)});
  }
  MetadataStore store(db);
  check_same(*store.load_session(9), s);
  CHECK(store.segments().size() == 2);
  CHECK(store.locate_block(kHigh + 1)->segment == "s2");
  CHECK(store.unreferenced_segments().empty());
}

TEST_CASE("metadata store: a checkpoint that references an unlocated block changes nothing") {
  test::TempDir dir;
  const auto db = dir.file("den.db");
  SessionRecord before = make_session(1);
  before.tokens = {1, 2};
  {
    MetadataStore store(db);
    store.create_session(before);
    SessionRecord s = before;
    s.tokens = {1, 2, 3};
    s.kv_tokens = 3;
    s.block_hashes = {100, 101};  // 101 is located nowhere
    s.generation = 1;
    CHECK_THROWS_WITH_AS(store.commit_checkpoint(s, std::vector{make_segment("new")}, std::vector{make_block(100, "new", 0)}),
                         doctest::Contains("not located"), StoreError);
    // kv_tokens beyond the history is refused too.
    s.block_hashes = {100};
    s.kv_tokens = 4;
    CHECK_THROWS_AS(store.commit_checkpoint(s, std::vector{make_segment("new")}, std::vector{make_block(100, "new", 0)}),
                    StoreError);
    // A block in a segment that has no row breaks the foreign key.
    s.kv_tokens = 3;
    CHECK_THROWS_AS(store.commit_checkpoint(s, {}, std::vector{make_block(100, "missing", 0)}), StoreError);
  }
  MetadataStore store(db);
  check_same(*store.load_session(1), before);
  CHECK(store.segments().empty());
  CHECK_FALSE(store.locate_block(100).has_value());
  // The store is still usable after the rollbacks.
  SessionRecord s = before;
  s.block_hashes = {100};
  s.kv_tokens = 2;
  store.commit_checkpoint(s, std::vector{make_segment("new")}, std::vector{make_block(100, "new", 0)});
  CHECK(store.load_session(1)->block_hashes == std::vector<uint64_t>{100});
}

TEST_CASE("metadata store: the first location of a block wins") {
  test::TempDir dir;
  MetadataStore store(dir.file("den.db"));
  SessionRecord a = make_session(1);
  SessionRecord b = make_session(2);
  store.create_session(a);
  store.create_session(b);
  a.tokens = {1};
  a.kv_tokens = 1;
  a.block_hashes = {kHigh};
  store.commit_checkpoint(a, std::vector{make_segment("first")}, std::vector{make_block(kHigh, "first", 3)});
  b.tokens = {1};
  b.kv_tokens = 1;
  b.block_hashes = {kHigh};
  store.commit_checkpoint(b, std::vector{make_segment("second")}, std::vector{make_block(kHigh, "second", 0)});
  const auto loc = store.locate_block(kHigh);
  REQUIRE(loc.has_value());
  CHECK(loc->segment == "first");
  CHECK(loc->index == 3);
  // "second" holds no block anyone's table points to.
  CHECK(store.unreferenced_segments() == std::vector<std::string>{"second"});
}

TEST_CASE("metadata store: quarantine removes locations and names the affected sessions") {
  test::TempDir dir;
  MetadataStore store(dir.file("den.db"));
  for (uint64_t id : {1, 2, 3}) store.create_session(make_session(id));
  SessionRecord s1 = make_session(1), s2 = make_session(2), s3 = make_session(3);
  s1.tokens = s2.tokens = s3.tokens = {1, 2};
  s1.kv_tokens = s2.kv_tokens = s3.kv_tokens = 2;
  s1.block_hashes = {10, 20};
  s2.block_hashes = {30};
  s3.block_hashes = {10, 30};
  store.commit_checkpoint(s1, std::vector{make_segment("bad"), make_segment("good")},
                          std::vector{make_block(10, "bad", 0), make_block(20, "good", 0)});
  store.commit_checkpoint(s2, std::vector{make_segment("other")}, std::vector{make_block(30, "other", 0)});
  store.commit_checkpoint(s3, {}, {});

  CHECK(store.quarantine_segment("bad") == std::vector<uint64_t>{1, 3});
  CHECK_FALSE(store.locate_block(10).has_value());
  CHECK(store.locate_block(20).has_value());
  const auto segs = store.segments();
  REQUIRE(segs.size() == 3);
  CHECK(segs[0].name == "bad");
  CHECK(segs[0].quarantined);
  CHECK_FALSE(segs[1].quarantined);
  // Quarantined segments are always garbage.
  CHECK(store.unreferenced_segments() == std::vector<std::string>{"bad"});
  CHECK_THROWS_WITH_AS(store.quarantine_segment("nope"), doctest::Contains("nope"), StoreError);
}

TEST_CASE("metadata store: segments become unreferenced and are forgotten") {
  test::TempDir dir;
  const auto db = dir.file("den.db");
  MetadataStore store(db);
  store.create_session(make_session(1));
  store.create_session(make_session(2));
  SessionRecord s1 = make_session(1), s2 = make_session(2);
  s1.tokens = s2.tokens = {1};
  s1.kv_tokens = s2.kv_tokens = 1;
  s1.block_hashes = {1};
  s2.block_hashes = {2};
  store.commit_checkpoint(s1, std::vector{make_segment("old")}, std::vector{make_block(1, "old", 0)});
  store.commit_checkpoint(s2, std::vector{make_segment("two")}, std::vector{make_block(2, "two", 0)});
  CHECK(store.unreferenced_segments().empty());

  // Session 1 moves to new blocks: "old" is garbage.
  s1.block_hashes = {3};
  s1.generation = 2;
  store.commit_checkpoint(s1, std::vector{make_segment("new")}, std::vector{make_block(3, "new", 0)});
  CHECK(store.unreferenced_segments() == std::vector<std::string>{"old"});
  // Session 2 is deleted: "two" too.
  store.delete_session(2);
  auto garbage = store.unreferenced_segments();
  CHECK(garbage == std::vector<std::string>{"old", "two"});

  store.forget_segments(garbage);
  CHECK(store.segments().size() == 1);
  CHECK(store.segments()[0].name == "new");
  CHECK_FALSE(store.locate_block(1).has_value());
  CHECK_FALSE(store.locate_block(2).has_value());
  CHECK(store.unreferenced_segments().empty());
  // Forgetting is idempotent.
  store.forget_segments(garbage);
  CHECK(store.segments().size() == 1);
}

TEST_CASE("metadata store: the journal is WAL and the file is marked as Den's") {
  test::TempDir dir;
  const auto db = dir.file("den.db");
  { MetadataStore store(db); }
  CHECK(raw_text(db, "PRAGMA journal_mode") == "wal");
  CHECK(raw_text(db, "PRAGMA application_id") == std::to_string(0x44454E31));
  CHECK(raw_text(db, "PRAGMA user_version") == "1");
  // A second open of the same file migrates nothing and keeps the data.
  {
    MetadataStore store(db);
    store.create_session(make_session(1));
  }
  MetadataStore store(db);
  CHECK(store.load_sessions().size() == 1);
}

TEST_CASE("metadata store: a store written by a newer Den is refused") {
  test::TempDir dir;
  const auto db = dir.file("den.db");
  { MetadataStore store(db); }
  raw_exec(db, "PRAGMA user_version = 99");
  CHECK_THROWS_WITH_AS(MetadataStore{db}, doctest::Contains("newer"), StoreError);
}

TEST_CASE("metadata store: a foreign SQLite database is refused and left alone") {
  test::TempDir dir;
  const auto db = dir.file("other.db");
  raw_exec(db, "CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT); INSERT INTO photos VALUES (1, 'x')");
  CHECK_THROWS_WITH_AS(MetadataStore{db}, doctest::Contains("not a Den store"), StoreError);
  CHECK(raw_text(db, "PRAGMA journal_mode") == "delete");
  CHECK(raw_text(db, "SELECT path FROM photos") == "x");
  // Another application's id, even on an empty database.
  const auto tagged = dir.file("tagged.db");
  raw_exec(tagged, "PRAGMA application_id = 1234");
  CHECK_THROWS_WITH_AS(MetadataStore{tagged}, doctest::Contains("not a Den store"), StoreError);
}

TEST_CASE("metadata store: a file that is not SQLite is refused") {
  test::TempDir dir;
  const auto db = dir.file("junk.db");
  std::mt19937 rng(7);
  std::string bytes(8192, '\0');
  for (auto& b : bytes) b = static_cast<char>(rng());
  test::write_file(db, bytes);
  CHECK_THROWS_AS(MetadataStore{db}, StoreError);
  CHECK(test::read_file(db) == bytes);
  // An empty file is an empty database.
  const auto empty = dir.file("empty.db");
  test::write_file(empty, "");
  MetadataStore store(empty);
  CHECK(store.schema_version() == 1);
}

TEST_CASE("metadata store: a missing directory is an error, not a crash") {
  test::TempDir dir;
  CHECK_THROWS_AS(MetadataStore{dir.file("no/such/dir/den.db")}, StoreError);
}

TEST_CASE("metadata store: two threads write through one store") {
  test::TempDir dir;
  MetadataStore store(dir.file("den.db"));
  auto writer = [&](uint64_t first) {
    for (uint64_t id = first; id < first + 40; ++id) {
      store.create_session(make_session(id));
      store.set_pinned(id, true);
    }
  };
  std::thread a(writer, 1), b(writer, 1001);
  a.join();
  b.join();
  const auto all = store.load_sessions();
  CHECK(all.size() == 80);
  CHECK(std::all_of(all.begin(), all.end(), [](const auto& s) { return s.pinned; }));
  CHECK(store.max_session_id() == 1040);
}
