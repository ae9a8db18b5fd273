// Corruption of the SSD tier, one kind at a time, under a restarted session manager: a flipped
// bit in a block's payload, in the header or the footer, a truncated segment, two blocks
// swapped, another session's segment put in place of this one's, and a segment of another
// model. Each is detected when the KV is needed, the segment quarantined (counted in
// segments_quarantined), the KV recomputed from the tokens (the fake engine's values prove it
// exact), and the other session, in its own segment, is untouched.
#include <fstream>

#include "den/memory/segment_file.h"
#include "den/memory/session_manager.h"
#include "fake_kv.h"
#include "test_support.h"

using namespace den;
using memory::SessionManager;

namespace {

const kernels::KvLayout kLayout{2, 2, 8, 4, kernels::DType::f32};  // 1 KiB blocks of 4 tokens

memory::MemoryConfig config(const std::filesystem::path& state, uint64_t fingerprint = 0xc0ffee) {
  memory::MemoryConfig c;
  c.layout = kLayout;
  c.model_fingerprint = fingerprint;
  c.fast_blocks = 64;
  c.state_dir = state;
  c.cost_model = false;
  return c;
}

int32_t run(SessionManager& m, memory::SessionId id) { return test::fake_compute_missing(m, id); }

std::vector<int32_t> tokens_from(int32_t first, int n) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(first + i * 3);
  return t;
}

// Two sessions, "a" (from token 10) and "b" (from token 900), 22 tokens each, checkpointed
// into one segment each. Returns their segment files.
std::pair<std::filesystem::path, std::filesystem::path> two_checkpointed(const std::filesystem::path& state,
                                                                         uint64_t fingerprint = 0xc0ffee) {
  SessionManager m(config(state, fingerprint));
  const auto a = m.create("a");
  m.append(a, tokens_from(10, 22));
  run(m, a);
  m.checkpoint(a)->wait_or_throw();
  const auto b = m.create("b");
  m.append(b, tokens_from(900, 22));
  run(m, b);
  m.checkpoint(b)->wait_or_throw();
  std::filesystem::path seg_a, seg_b;
  for (const auto& e : std::filesystem::directory_iterator(state / "kv")) {
    const std::string name = e.path().filename().string();
    (name.starts_with("s" + std::to_string(a) + "-") ? seg_a : seg_b) = e.path();
  }
  REQUIRE(!seg_a.empty());
  REQUIRE(!seg_b.empty());
  return {seg_a, seg_b};
}

std::string read_all(const std::filesystem::path& p) { return test::read_file(p.string()); }
void write_all(const std::filesystem::path& p, const std::string& bytes) { test::write_file(p.string(), bytes); }

}  // namespace

TEST_CASE("corruption of a segment is detected, quarantined, recomputed and reported - every kind") {
  const int64_t page = memory::kDirectIoAlignment;
  const int64_t block_stride = (kLayout.block_bytes() + page - 1) / page * page;
  struct Kind {
    const char* name;
    std::function<void(const std::filesystem::path& a, const std::filesystem::path& b, const std::filesystem::path& dir)> damage;
  };
  const std::vector<Kind> kinds = {
      {"a flipped bit in the second block's payload",
       [&](auto& a, auto&, auto&) {
         std::string bytes = read_all(a);
         bytes[static_cast<size_t>(page + block_stride + 100)] ^= 0x10;
         write_all(a, bytes);
       }},
      {"a flipped bit in the header",
       [](auto& a, auto&, auto&) {
         std::string bytes = read_all(a);
         bytes[20] ^= 0x01;
         write_all(a, bytes);
       }},
      {"a flipped bit in the footer",
       [&](auto& a, auto&, auto&) {
         std::string bytes = read_all(a);
         bytes[bytes.size() - static_cast<size_t>(page) + 9] ^= 0x04;
         write_all(a, bytes);
       }},
      {"truncated by a page",
       [&](auto& a, auto&, auto&) {
         std::filesystem::resize_file(a, std::filesystem::file_size(a) - static_cast<uintmax_t>(page));
       }},
      {"two blocks swapped",
       [&](auto& a, auto&, auto&) {
         std::string bytes = read_all(a);
         const auto first = static_cast<size_t>(page), second = static_cast<size_t>(page + block_stride);
         const std::string one = bytes.substr(first, static_cast<size_t>(block_stride));
         bytes.replace(first, static_cast<size_t>(block_stride), bytes.substr(second, static_cast<size_t>(block_stride)));
         bytes.replace(second, static_cast<size_t>(block_stride), one);
         write_all(a, bytes);
       }},
      {"another session's segment in its place", [](auto& a, auto& b, auto&) { write_all(a, read_all(b)); }},
      {"another model's segment of the same session",
       [](auto& a, auto&, auto& dir) {
         test::TempDir other;
         const auto [other_a, other_b] = two_checkpointed(other.path(), 0xbadbad);
         (void)other_b;
         (void)dir;
         write_all(a, read_all(other_a));
       }},
  };
  for (const Kind& kind : kinds) {
    CAPTURE(std::string(kind.name));
    test::TempDir dir;
    const auto [seg_a, seg_b] = two_checkpointed(dir.path());
    kind.damage(seg_a, seg_b, dir.path());

    SessionManager m(config(dir.path()));
    const auto a = *m.find("a");
    const auto b = *m.find("b");
    CHECK(m.tokens(a) == tokens_from(10, 22));  // the history is in SQLite, untouched
    const int32_t recomputed = run(m, a);
    CHECK(recomputed > 0);                       // detected: not loaded
    CHECK(test::fake_kv_is_exact(m, a));         // and recomputed right
    CHECK(m.stats().segments_quarantined >= 1);  // reported
    CHECK(m.stats().tokens_recomputed == recomputed);
    CHECK(run(m, b) == 0);  // the other session loads its own segment
    CHECK(test::fake_kv_is_exact(m, b));
    // A new checkpoint of "a" makes it whole again, across a restart.
    m.checkpoint(a)->wait_or_throw();
    SessionManager again(config(dir.path()));
    CHECK(run(again, *again.find("a")) == 0);
    CHECK(test::fake_kv_is_exact(again, *again.find("a")));
  }
}
