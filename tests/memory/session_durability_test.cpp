// Crash consistency of checkpoints: a child process is killed at each step of the commit
// protocol, and I/O faults (EIO, ENOSPC, short writes, signals) are injected into each file call; after
// a restart every session is at its previous or its new generation with verified KV, and no
// half-written file is used or left behind. Then the restart oracle: a process checkpoints a
// real model's session and exits; a new process wakes it and generates the same continuation as
// an uninterrupted run with 0 tokens recomputed.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/memory/session_manager.h"
#include "fake_kv.h"
#include "io_faults.h"
#include "test_support.h"

using namespace den;
using memory::SessionManager;

namespace {

const kernels::KvLayout kLayout{3, 2, 8, 4, kernels::DType::f32};

memory::MemoryConfig config(const std::filesystem::path& state) {
  memory::MemoryConfig c;
  c.layout = kLayout;
  c.model_fingerprint = 0x1234;
  c.fast_blocks = 64;
  c.state_dir = state;
  c.cost_model = false;
  return c;
}

// Leases the session and writes the KV it lacks.
void compute(SessionManager& m, memory::SessionId id) {
  auto lease = m.lease(id, static_cast<int32_t>(m.tokens(id).size()));
  REQUIRE(lease.has_value());
  test::fake_compute(m, *lease);
}

std::vector<int32_t> tokens_of(int32_t first, int n) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(first + i);
  return t;
}

// Generation 1: 18 tokens of KV (a partial last block) checkpointed.
memory::SessionId make_generation_one(const std::filesystem::path& state) {
  SessionManager m(config(state));
  const auto id = m.create("s");
  m.append(id, tokens_of(10, 18));
  compute(m, id);
  m.checkpoint(id)->wait_or_throw();
  return id;
}

// Generation 2 adds 9 tokens (new blocks and a rewritten partial one).
void attempt_generation_two(SessionManager& m, memory::SessionId id) {
  m.append(id, tokens_of(500, 9));
  compute(m, id);
  m.checkpoint(id)->wait();
}

std::vector<std::string> files_in(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename().string());
  return names;
}

// After a restart: the session is whole at generation 1 or 2, its KV loads from disk and is
// exactly what that generation wrote, and no temporary file is left.
uint64_t check_recovered(const std::filesystem::path& state, memory::SessionId id) {
  SessionManager m(config(state));
  const auto info = m.info(id);
  CHECK((info.generation == 1 || info.generation == 2));
  CHECK(info.tokens == (info.generation == 1 ? 18 : 27));
  CHECK(info.kv_tokens == info.tokens);
  CHECK(test::fake_kv_is_exact(m, id));
  CHECK(m.stats().tokens_recomputed == 0);
  CHECK(m.stats().tokens_computed == 0);
  CHECK(m.stats().segments_quarantined == 0);
  for (const auto& name : files_in(state / "kv")) CHECK(name.find(".tmp") == std::string::npos);
  return info.generation;
}

}  // namespace

TEST_CASE("durability: a process killed at each step of the commit protocol loses nothing acknowledged") {
  // (step, the generation a restart must find)
  const std::vector<std::pair<std::string, uint64_t>> steps = {
      {"write", 1}, {"fsync", 1}, {"rename", 1}, {"fsync_dir", 1}, {"commit", 2}};
  for (const auto& [step, expected] : steps) {
    CAPTURE(step);
    test::TempDir dir;
    const auto id = make_generation_one(dir.path());
    const pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      auto c = config(dir.path());
      const std::string target = step;
      c.on_commit_step = [target](std::string_view at) {
        if (at == target) raise(SIGKILL);
      };
      SessionManager m(c);
      attempt_generation_two(m, id);
      _exit(3);  // the kill never came
    }
    int status = 0;
    REQUIRE(waitpid(child, &status, 0) == child);
    REQUIRE(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGKILL);
    CHECK(check_recovered(dir.path(), id) == expected);
  }
}

TEST_CASE("durability: a checkpoint does not put back a history saved while it wrote its segment") {
  // An agent's append saves the history while a checkpoint of the same session is writing (its
  // lock released). The checkpoint's commit used to write the history it had snapshotted, so a
  // crash after it restored a history one append short (a soak lost a message that way).
  test::TempDir dir;
  const auto id = make_generation_one(dir.path());
  {
    auto c = config(dir.path());
    SessionManager* manager = nullptr;
    bool appended = false;
    c.on_commit_step = [&](std::string_view at) {
      if (at != "write" || appended) return;
      appended = true;
      manager->append(id, tokens_of(700, 5));
      manager->save_history(id);
    };
    SessionManager m(c);
    manager = &m;
    m.append(id, tokens_of(500, 9));
    compute(m, id);
    m.checkpoint(id)->wait_or_throw();
    REQUIRE(appended);
  }
  SessionManager m(config(dir.path()));
  const auto info = m.info(id);
  CHECK(info.tokens == 18 + 9 + 5);
  CHECK(info.kv_tokens == 27);  // the KV the checkpoint wrote still describes the history's start
  CHECK(test::fake_kv_is_exact(m, id));
}

TEST_CASE("durability: EIO, ENOSPC and short writes fail the checkpoint and change nothing") {
  struct Case {
    std::string name;
    memory::IoOp op;
    memory::IoFault fault;
  };
  const std::vector<Case> cases = {
      {"open EIO", memory::IoOp::open, {EIO, -1}},
      {"write EIO", memory::IoOp::write, {EIO, -1}},
      {"write ENOSPC", memory::IoOp::write, {ENOSPC, -1}},
      {"write EDQUOT", memory::IoOp::write, {EDQUOT, -1}},
      {"open ENOSPC", memory::IoOp::open, {ENOSPC, -1}},
      {"fsync ENOSPC", memory::IoOp::fsync, {ENOSPC, -1}},
      {"short write", memory::IoOp::write, {0, 1000}},
      {"fsync EIO", memory::IoOp::fsync, {EIO, -1}},
      {"rename EIO", memory::IoOp::rename, {EIO, -1}},
      {"directory fsync EIO", memory::IoOp::fsync_dir, {EIO, -1}},
  };
  for (const Case& k : cases) {
    CAPTURE(k.name);
    test::TempDir dir;
    const auto id = make_generation_one(dir.path());
    // Only the new segment's calls: its temp file, the file itself and the kv/ directory.
    test::FailOp faults(k.op, k.fault, 0, [](const std::filesystem::path& path) {
      return path.string().find(".seg") != std::string::npos || path.filename() == "kv";
    });
    faults.armed = false;  // armed just before the checkpoint under test
    {
      auto c = config(dir.path());
      c.faults = &faults;
      SessionManager m(c);
      m.append(id, tokens_of(500, 9));
      compute(m, id);
      faults.armed = true;
      auto op = m.checkpoint(id);
      op->wait();
      CHECK(faults.fired());
      CHECK(op->state() == memory::Operation::State::failed);
      CHECK(!op->error().empty());
      CHECK(m.info(id).generation == 1);
      CHECK(test::fake_kv_is_exact(m, id));  // the memory copy stays authoritative
      // The next checkpoint writes a new file (the failed one is never retried) and succeeds.
      m.checkpoint(id)->wait_or_throw();
      CHECK(m.info(id).generation == 2);
    }
    CHECK(check_recovered(dir.path(), id) == 2);
  }
}

TEST_CASE("durability: file calls interrupted by signals still checkpoint, and wake the KV exactly") {
  for (const int signals : {1, 4}) {
    CAPTURE(signals);
    test::TempDir dir;
    test::InterruptEveryCall faults(signals);
    memory::SessionId id;
    {
      auto c = config(dir.path());
      c.faults = &faults;
      SessionManager m(c);
      id = m.create("s");
      m.append(id, tokens_of(10, 18));
      compute(m, id);
      m.checkpoint(id)->wait_or_throw();
      m.append(id, tokens_of(500, 9));
      compute(m, id);
      m.checkpoint(id)->wait_or_throw();
      CHECK(m.info(id).generation == 2);
    }
    CHECK(faults.interrupted(memory::IoOp::open) > 0);
    CHECK(faults.interrupted(memory::IoOp::write) > 0);
    CHECK(faults.interrupted(memory::IoOp::fsync_dir) > 0);
    // A new process reads it back through interrupted reads too.
    auto c = config(dir.path());
    c.faults = &faults;
    SessionManager m(c);
    CHECK(m.info(id).generation == 2);
    CHECK(test::fake_kv_is_exact(m, id));
    CHECK(m.stats().tokens_recomputed == 0);
    CHECK(m.stats().tokens_computed == 0);
    CHECK(faults.interrupted(memory::IoOp::read) > 0);
  }
}

TEST_CASE("durability: a full disk or quota during hibernate keeps the session in memory and says what was needed") {
  for (const int error : {ENOSPC, EDQUOT}) {
    CAPTURE(error);
    test::TempDir dir;
    const auto id = make_generation_one(dir.path());
    test::FailOp full(memory::IoOp::write, {error, -1}, 0,
                      [](const std::filesystem::path& path) { return path.string().find(".seg") != std::string::npos; });
    full.armed = false;
    auto c = config(dir.path());
    c.faults = &full;
    {
      SessionManager m(c);
      m.append(id, tokens_of(500, 9));
      compute(m, id);
      full.armed = true;
      auto op = m.hibernate(id, memory::Tier::ssd);
      op->wait();
      REQUIRE(op->state() == memory::Operation::State::failed);
      const std::string message = op->error();
      CHECK(message.find("no space on the SSD tier for the checkpoint of session") != std::string::npos);
      CHECK(message.find("it needs ") != std::string::npos);
      CHECK(message.find(" is free") != std::string::npos);
      CHECK(message.find(std::strerror(error)) != std::string::npos);  // the system's own words too
      // Still in memory, whole, at its old checkpoint.
      CHECK(m.info(id).tier == memory::Tier::fast);
      CHECK(m.info(id).generation == 1);
      CHECK(test::fake_kv_is_exact(m, id));
      // Space freed: the next checkpoint succeeds.
      full.armed = false;
      m.hibernate(id, memory::Tier::ssd)->wait_or_throw();
      CHECK(m.info(id).generation == 2);
    }
    CHECK(check_recovered(dir.path(), id) == 2);
  }
}

TEST_CASE("durability: a read error while waking recomputes the KV from the tokens and says so") {
  for (const auto& [op, name] : std::vector<std::pair<memory::IoOp, const char*>>{{memory::IoOp::read, "read EIO"},
                                                                                  {memory::IoOp::open, "open EIO"}}) {
    CAPTURE(std::string(name));
    test::TempDir dir;
    const auto id = make_generation_one(dir.path());
    test::FailOp broken(op, {EIO, -1}, 0,
                        [](const std::filesystem::path& path) { return path.string().find(".seg") != std::string::npos; });
    auto c = config(dir.path());
    c.faults = &broken;
    SessionManager m(c);
    auto lease = m.lease(id, 18);
    REQUIRE(lease.has_value());
    CHECK(broken.fired());
    CHECK(lease->kv_tokens() == 0);  // nothing loaded: all of it is to compute
    test::fake_compute(m, *lease);
    lease.reset();
    CHECK(test::fake_kv_is_exact(m, id));
    CHECK(m.stats().tokens_recomputed == 18);
  }
}

TEST_CASE("durability: start-up removes temporary and unreferenced files, keeps referenced ones") {
  test::TempDir dir;
  const auto id = make_generation_one(dir.path());
  const auto kv = dir.path() / "kv";
  const std::vector<std::string> before = files_in(kv);
  REQUIRE(before.size() == 1);
  test::write_file((kv / "s1-g9-1.seg.tmp").string(), "half a segment");
  test::write_file((kv / "orphan.seg").string(), std::string(8192, 'x'));
  CHECK(check_recovered(dir.path(), id) == 1);
  CHECK(files_in(kv) == before);
}

namespace {

int32_t argmax(std::span<const float> row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// Greedy continuation of a session: each step feeds what the KV lacks and appends the argmax.
std::vector<int32_t> continue_greedy(SessionManager& m, engine::Backend& backend, memory::SessionId id, int n) {
  std::vector<int32_t> out;
  engine::StepOutput step;
  for (int i = 0; i < n; ++i) {
    const std::vector<int32_t> tokens = m.tokens(id);
    auto lease = m.lease(id, static_cast<int32_t>(tokens.size()));
    REQUIRE(lease.has_value());
    const int32_t kv = lease->kv_tokens();
    REQUIRE(kv < static_cast<int32_t>(tokens.size()));
    engine::SequenceInput in{std::span(tokens).subspan(static_cast<size_t>(kv)), kv, lease->block_table(),
                             engine::LogitsWanted::last};
    backend.forward({&in, 1}, m.fast_view(), step);
    lease->computed(static_cast<int32_t>(tokens.size()));
    const int32_t next = argmax(step.row(0));
    m.append(id, std::span(&next, 1));
    out.push_back(next);
  }
  return out;
}

memory::MemoryConfig model_config(const engine::Model& model, const std::filesystem::path& state) {
  memory::MemoryConfig c;
  c.layout = model.kv_layout(16, kernels::DType::f32);
  c.model_fingerprint = model.fingerprint();
  c.fast_blocks = 32;
  c.state_dir = state;
  return c;
}

}  // namespace

TEST_CASE("durability: a restarted process continues a checkpointed session exactly, recomputing nothing") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  const std::vector<int32_t> prompt = {1, 403, 407, 261, 378, 49, 395, 280, 263, 325, 24};
  std::vector<int32_t> uninterrupted;
  {
    auto model = engine::Model::load(test::stories_model());
    auto backend = engine::make_cpu_backend(*model, 2);
    SessionManager m(model_config(*model, {}));
    const auto id = m.create();
    m.append(id, prompt);
    uninterrupted = continue_greedy(m, *backend, id, 40);
  }

  test::TempDir dir;
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    int code = 1;
    try {
      auto model = engine::Model::load(test::stories_model());
      auto backend = engine::make_cpu_backend(*model, 1);
      SessionManager m(model_config(*model, dir.path()));
      const auto id = m.create("story");
      m.append(id, prompt);
      const std::vector<int32_t> first = continue_greedy(m, *backend, id, 20);
      m.checkpoint(id)->wait_or_throw();
      code = std::equal(first.begin(), first.end(), uninterrupted.begin()) ? 0 : 2;
    } catch (...) {
      code = 4;
    }
    _exit(code);
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);

  auto model = engine::Model::load(test::stories_model());
  auto backend = engine::make_cpu_backend(*model, 2);
  SessionManager m(model_config(*model, dir.path()));
  const auto id = *m.find("story");
  CHECK(m.info(id).tier == memory::Tier::ssd);
  CHECK(m.tokens(id).size() == prompt.size() + 20);
  const std::vector<int32_t> rest = continue_greedy(m, *backend, id, 20);
  CHECK(std::vector<int32_t>(uninterrupted.begin() + 20, uninterrupted.end()) == rest);
  const auto st = m.stats();
  CHECK(st.tokens_recomputed == 0);
  CHECK(st.tokens_loaded == static_cast<int64_t>(prompt.size()) + 19);  // whole blocks: 30 tokens, 2 blocks of 16
  CHECK(st.bytes_ssd_read > 0);
}
