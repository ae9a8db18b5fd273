// Failpoints (memory/failpoints.h): arming by API and by DEN_FAILPOINTS, the Nth-hit rule, and
// what each kind does on the checkpoint path: an error fails the checkpoint and changes
// nothing; a crash kills the process and a restart finds the previous or the new checkpoint.
#include "den/memory/failpoints.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "den/memory/session_manager.h"
#include "fake_kv.h"
#include "test_support.h"

using namespace den;
using memory::FailAction;

namespace {

const kernels::KvLayout kLayout{2, 2, 8, 4, kernels::DType::f32};

memory::MemoryConfig config(const std::filesystem::path& state) {
  memory::MemoryConfig c;
  c.layout = kLayout;
  c.model_fingerprint = 0x77;
  c.fast_blocks = 32;
  c.state_dir = state;
  c.cost_model = false;
  return c;
}

// A session of `n` tokens with its KV computed.
memory::SessionId session_with_kv(memory::SessionManager& m, int n, int first = 10) {
  const auto id = m.create("s");
  std::vector<int32_t> tokens;
  for (int i = 0; i < n; ++i) tokens.push_back(first + i);
  m.append(id, tokens);
  auto lease = m.lease(id, n);
  REQUIRE(lease.has_value());
  test::fake_compute(m, *lease);
  return id;
}

struct Disarm {
  ~Disarm() { memory::disarm_failpoints(); }
};

}  // namespace

TEST_CASE("failpoints fire on their Nth hit only, and refuse unknown names") {
  Disarm disarm;
  CHECK_THROWS_WITH_AS(memory::arm_failpoint("no.such.point", FailAction::error),
                       doctest::Contains("unknown failpoint 'no.such.point'"), std::invalid_argument);
  CHECK_THROWS_AS(memory::arm_failpoint("sqlite.before_commit", FailAction::error, 0), std::invalid_argument);
  // After a commit succeeded nothing real can fail: those points only crash.
  CHECK_THROWS_WITH_AS(memory::arm_failpoint("sqlite.after_commit", FailAction::error),
                       doctest::Contains("only crashes"), std::invalid_argument);
  memory::arm_failpoint("sqlite.after_commit", FailAction::crash, 1000000);
  memory::failpoint("sqlite.after_commit");  // nothing armed: nothing happens

  memory::arm_failpoint("cleanup.remove_segment", FailAction::error, 3);
  memory::failpoint("cleanup.remove_segment");
  memory::failpoint("cleanup.remove_segment");
  CHECK_THROWS_WITH_AS(memory::failpoint("cleanup.remove_segment"),
                       doctest::Contains("failpoint 'cleanup.remove_segment' fired"), memory::FailpointError);
  memory::failpoint("cleanup.remove_segment");  // the 4th: no more
  CHECK(memory::failpoint_hits("cleanup.remove_segment") == 4);
  memory::disarm_failpoints();
  CHECK(memory::failpoint_hits("cleanup.remove_segment") == 0);
}

TEST_CASE("failpoints from DEN_FAILPOINTS, and clear errors for bad entries") {
  Disarm disarm;
  const auto arm_from = [](const char* spec) {
    ::setenv("DEN_FAILPOINTS", spec, 1);
    auto armed = memory::arm_failpoints_from_env();
    ::unsetenv("DEN_FAILPOINTS");
    return armed;
  };
  CHECK(arm_from("").empty());
  CHECK(arm_from("sqlite.before_commit=error@2,checkpoint.after_fsync=crash") ==
        std::vector<std::string>{"sqlite.before_commit", "checkpoint.after_fsync"});
  CHECK(memory::failpoint_hits("sqlite.before_commit") == 0);
  for (const auto& [spec, why] : std::vector<std::pair<const char*, const char*>>{
           {"sqlite.before_commit", "no '='"},
           {"sqlite.before_commit=explode", "the action must be crash or error"},
           {"sqlite.before_commit=error@0", "whole number >= 1"},
           {"sqlite.before_commit=error@x", "whole number >= 1"},
           {"nope=crash", "no failpoint is called 'nope'"},
           {"sqlite.after_commit=error", "this point only crashes"}}) {
    CAPTURE(spec);
    CHECK_THROWS_WITH_AS(arm_from(spec), doctest::Contains(why), std::invalid_argument);
  }
  // Every known point has a name that DEN_FAILPOINTS can carry.
  for (const auto& point : memory::known_failpoints()) {
    CHECK(std::string(point.name).find_first_of(",=@ ") == std::string::npos);
    CHECK_FALSE(point.where.empty());
  }
}

TEST_CASE("failpoints - an error at each checkpoint step fails that checkpoint, changes nothing, and the next one succeeds") {
  Disarm disarm;
  for (const char* point : {"checkpoint.after_write", "checkpoint.after_fsync", "checkpoint.after_rename",
                            "checkpoint.after_fsync_dir", "sqlite.before_commit"}) {
    const std::string name = point;
    CAPTURE(name);
    test::TempDir dir;
    memory::SessionManager m(config(dir.path()));
    const auto id = session_with_kv(m, 21);
    memory::arm_failpoint(point, FailAction::error);
    CHECK_THROWS(m.checkpoint(id)->wait_or_throw());
    CHECK(m.info(id).generation == 0);
    memory::disarm_failpoints();
    m.checkpoint(id)->wait_or_throw();
    CHECK(m.info(id).generation == 1);
    memory::SessionManager reopened(config(dir.path()));
    CHECK(reopened.info(id).generation == 1);
    CHECK(test::fake_kv_is_exact(reopened, id));
    CHECK(reopened.stats().segments_quarantined == 0);
  }
}

TEST_CASE("failpoints - a crash at each checkpoint step leaves the previous or the new checkpoint, whole") {
  // (point, the generation a restart must find; 0: either, whole). The sqlite points fire at
  // the first SQLite transaction, which need not be the checkpoint's own.
  const std::vector<std::pair<const char*, uint64_t>> points = {
      {"checkpoint.after_write", 1},      {"checkpoint.after_fsync", 1}, {"checkpoint.after_rename", 1},
      {"checkpoint.after_fsync_dir", 1}, {"sqlite.before_commit", 0},   {"sqlite.after_commit", 0},
      {"checkpoint.after_commit", 2}};
  for (const auto& [point, expected] : points) {
    const std::string name = point;
    CAPTURE(name);
    test::TempDir dir;
    memory::SessionId id;
    {
      memory::SessionManager m(config(dir.path()));
      id = session_with_kv(m, 18);
      m.checkpoint(id)->wait_or_throw();  // generation 1
    }
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      memory::SessionManager m(config(dir.path()));
      const std::vector<int32_t> more = {700, 701, 702, 703, 704, 705, 706, 707, 708};
      m.append(id, more);
      auto lease = m.lease(id, 27);
      if (!lease) _exit(4);
      test::fake_compute(m, *lease);
      lease.reset();
      memory::arm_failpoint(point, FailAction::crash);
      m.checkpoint(id)->wait();
      _exit(3);  // the crash never came
    }
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    REQUIRE(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGKILL);
    memory::SessionManager after(config(dir.path()));
    const uint64_t generation = after.info(id).generation;
    if (expected != 0) CHECK(generation == expected);
    REQUIRE((generation == 1 || generation == 2));
    CHECK(after.info(id).kv_tokens == (generation == 1 ? 18 : 27));
    CHECK(test::fake_kv_is_exact(after, id));
    CHECK(after.stats().segments_quarantined == 0);
  }
}
