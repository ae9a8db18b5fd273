// Power cuts under the SSD tier (issue #7): a randomized workload (create, append and compute,
// checkpoint, hibernate, wake, fork, truncate, save_history, pin, drop) runs on a state
// directory through PowerCutSimulator; the power goes off after a random file call (inside a
// checkpoint's commit protocol or a collection's unlinks) or between operations, the disk is
// rewritten as the loss could have left it, and a fresh manager must bring back everything it
// acknowledged, exactly (0 lost), and never serve KV the cut damaged (0 undetected). A second
// case lets the disk also damage fsynced files, to show such damage is always detected.
// Each state directory takes several cuts in a row: after a reboot what is on disk is durable
// (a fresh simulator starts from it) and the workload goes on from what came back.
// $DEN_POWER_CUT_RUNS sets the number of cuts (default 1,000), $DEN_POWER_CUT_SEED the seed.
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "den/memory/session_manager.h"
#include "fake_kv.h"
#include "power_cut.h"
#include "test_support.h"

using namespace den;
using memory::SessionId;
using memory::SessionManager;
using memory::Tier;
using test::PowerCutSimulator;

namespace {

const kernels::KvLayout kLayout{3, 2, 8, 4, kernels::DType::f32};  // 4 tokens per block, 1.5 KiB
constexpr int32_t kMaxTokens = 40;                                  // 10 blocks: any lease fits the pool
constexpr size_t kMaxSessions = 4;
const std::vector<int32_t> kSystemPrompt = {1, 2, 3, 4, 5, 6, 7, 8};  // equal blocks across sessions

int64_t env_or(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::strtoll(value, nullptr, 10) : fallback;
}

int64_t pick(std::mt19937& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// The state directory, on tmpfs where there is one: the simulator decides what survives, so the
// real fsyncs need not pay a disk's latency a thousand times over.
class ScratchDir {
 public:
  ScratchDir() {
    std::error_code ec;
    const std::filesystem::path shm = "/dev/shm";
    const bool use_shm = std::filesystem::is_directory(shm, ec) && ::access(shm.c_str(), W_OK) == 0;
    const std::filesystem::path base = use_shm ? shm : std::filesystem::temp_directory_path();
    std::string pattern = (base / "den-power-cut-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed under " + base.string());
    path_ = pattern;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

memory::MemoryConfig config(const std::filesystem::path& state, PowerCutSimulator* power) {
  memory::MemoryConfig c;
  c.layout = kLayout;
  c.model_fingerprint = 0x5eedULL;
  c.fast_blocks = 32;  // fewer than four full sessions: eviction happens
  c.dram_blocks = 8;
  c.state_dir = state;
  c.poison = true;
  c.cost_model = false;
  c.faults = power;
  c.on_commit_step = [power](std::string_view) { power->check_power(); };  // the dead commit nothing
  return c;
}

// The SQLite store is durable at each commit (WAL, synchronous=FULL): outside the simulation,
// frozen as it was when the power went off.
std::unique_ptr<PowerCutSimulator> boot(const std::filesystem::path& state) {
  return std::make_unique<PowerCutSimulator>(std::vector<std::filesystem::path>{
      state / "memory.sqlite", state / "memory.sqlite-wal", state / "memory.sqlite-shm"});
}

// What the manager acknowledged as durable for one session.
struct DurableSession {
  std::string name;
  std::vector<int32_t> tokens;    // the durable history
  int32_t stored_kv = 0;          // tokens of KV in its checkpoint row
  std::vector<int32_t> kv_basis;  // the history that KV was computed for (its first stored_kv tokens)
  uint64_t generation = 0;
  bool pinned = false;
};

// The KV a restart must serve: the stored blocks whose tokens still agree with the durable
// history (a save_history after a truncation can leave a tail that no longer matches).
int32_t servable_kv(const DurableSession& d) {
  int32_t kv = 0;
  while (kv < d.stored_kv) {
    const int32_t end = std::min(kv + kLayout.block_tokens, d.stored_kv);
    if (!std::equal(d.tokens.begin(), d.tokens.begin() + end, d.kv_basis.begin())) break;
    kv = end;
  }
  return kv;
}

struct Tally {
  int64_t cuts = 0;
  int64_t cuts_in_commit_protocol = 0;  // after the segment's create, write, fsync, rename or dir fsync
  int64_t cuts_in_collection = 0;       // between the unlinks of a checkpoint's or drop's collection
  int64_t cuts_between_operations = 0;
  std::map<PowerCutSimulator::Change, int64_t> cut_after;  // the change right before the cut
  int64_t acknowledged = 0;  // checkpoints and hibernations that returned success
  test::CutReport disk;      // summed
  int64_t torn_files_discarded = 0;
  int64_t sessions_verified = 0, checkpoints_verified = 0, kv_tokens_verified = 0;
  int64_t durable_kv_lost_detected = 0;  // sessions served less KV than stored, the rest recomputed
  int64_t segments_quarantined = 0;
  int64_t lost = 0;        // acknowledged durable state missing after a cut
  int64_t undetected = 0;  // KV served that is not what was computed

  void add(const test::CutReport& r) {
    disk.writes_kept += r.writes_kept;
    disk.writes_dropped += r.writes_dropped;
    disk.writes_garbled += r.writes_garbled;
    disk.entries_kept += r.entries_kept;
    disk.entries_undone += r.entries_undone;
    disk.durable_files_damaged += r.durable_files_damaged;
  }
};

const char* change_name(PowerCutSimulator::Change c) {
  switch (c) {
    case PowerCutSimulator::Change::create: return "create";
    case PowerCutSimulator::Change::write: return "write";
    case PowerCutSimulator::Change::fsync: return "fsync";
    case PowerCutSimulator::Change::rename: return "rename";
    case PowerCutSimulator::Change::fsync_dir: return "dir fsync";
    case PowerCutSimulator::Change::unlink: return "unlink";
    case PowerCutSimulator::Change::none: break;
  }
  return "nothing";
}

enum class Op { create, append, append_uncomputed, checkpoint, hibernate_ssd, hibernate_dram, wake, fork, truncate,
                save_history, pin, unpin, drop };

// One state directory through a chain of power cuts, with the oracle of what is durable.
class Workload {
 public:
  Workload(std::mt19937& rng, Tally& tally) : rng_(rng), tally_(tally) {}

  // Runs random operations until the power goes off: after a random number of changes within
  // one operation (mostly a checkpoint or hibernation), or right after it.
  void run_until_cut(SessionManager& m, PowerCutSimulator& sim) {
    const int64_t steps = pick(rng_, 2, 20);
    const int64_t victim = pick(rng_, 0, steps - 1);
    for (int64_t i = 0; i < steps; ++i) {
      const bool last = i == victim;
      const Op op = last ? victim_op() : any_op();
      // A segment's commit protocol makes 5 changes (create, write, fsync, rename, dir fsync),
      // a collection's unlinks follow; a drop makes only the unlinks.
      if (last) sim.cut_after_changes(op == Op::drop ? pick(rng_, 1, 2) : pick(rng_, 1, 7));
      const Op done = step(m, sim, op, last);
      if (!last) continue;
      ++tally_.cuts;
      if (!sim.powered_off()) {
        sim.power_off();
        ++tally_.cuts_between_operations;
      } else if (sim.cut_point() == PowerCutSimulator::Change::unlink) {
        ++tally_.cuts_in_collection;
      } else {
        ++tally_.cuts_in_commit_protocol;
        CHECK((done == Op::checkpoint || done == Op::hibernate_ssd));
      }
      ++tally_.cut_after[sim.cut_point()];
      return;
    }
  }

  // After the reboot: every acknowledged session, history, generation and pin is back, the KV
  // of every acknowledged checkpoint is served (honest disk) and whatever KV is served is exact.
  void verify(SessionManager& m, const test::CutReport& cut, bool honest_disk) {
    const memory::MemoryStats at_start = m.stats();
    CHECK(at_start.sessions == static_cast<int64_t>(durable_.size()));
    if (honest_disk) {
      // Start-up left exactly the store's segments: no stray file, none missing.
      int64_t on_disk = 0;
      for (const auto& e : std::filesystem::directory_iterator(m.config().state_dir / "kv")) {
        on_disk += static_cast<int64_t>(e.file_size());
      }
      CHECK(on_disk == at_start.ssd_bytes);
      CHECK(at_start.segments_quarantined == 0);
    }
    for (const auto& path : cut.torn_files) {
      if (std::filesystem::exists(path)) {
        // A file holding bytes no fsync covered is never a committed segment.
        CHECK_MESSAGE(!honest_disk, "a torn file survived start-up: " << path);
      } else {
        ++tally_.torn_files_discarded;
      }
    }

    std::map<SessionId, int32_t> expected_kv;
    for (const auto& [id, d] : durable_) {
      CAPTURE(id);
      memory::SessionInfo info;
      try {
        info = m.info(id);
      } catch (const memory::SessionError& e) {
        ++tally_.lost;
        FAIL_CHECK("an acknowledged session is gone: " << e.what());
        continue;
      }
      const bool same = info.name == d.name && m.tokens(id) == d.tokens && info.generation == d.generation &&
                        info.pinned == d.pinned;
      CHECK_MESSAGE(same, "session '" << d.name << "': generation " << info.generation << " (acknowledged "
                                      << d.generation << "), " << info.tokens << " tokens (acknowledged "
                                      << d.tokens.size() << ")");
      if (!same) ++tally_.lost;
      expected_kv[id] = servable_kv(d);
      if (honest_disk && info.kv_tokens < expected_kv[id]) {
        ++tally_.lost;
        FAIL_CHECK("session '" << d.name << "' came back with " << info.kv_tokens
                               << " tokens of KV, its checkpoint holds " << expected_kv[id]);
      }
    }

    for (const auto& [id, kv] : expected_kv) {
      CAPTURE(id);
      const std::vector<int32_t> tokens = m.tokens(id);
      auto lease = m.lease(id, static_cast<int32_t>(tokens.size()));
      REQUIRE(lease.has_value());
      const int32_t served = lease->kv_tokens();
      int64_t wrong = 0;
      const int64_t n = kLayout.token_elements();
      test::for_each_kv_slab(m, *lease, 0, served, [&](int32_t p, int32_t layer, int k, const float* slab) {
        for (int64_t e = 0; e < n; ++e) {
          wrong += slab[e] != test::fake_kv_value(tokens[static_cast<size_t>(p)], p, layer, k, e);
        }
      });
      if (wrong > 0) {
        ++tally_.undetected;
        FAIL_CHECK("session " << id << " was served " << wrong << " wrong KV values in its first " << served
                              << " tokens");
      }
      if (served < kv) {
        if (honest_disk) {
          ++tally_.lost;
          FAIL_CHECK("session " << id << " was served " << served << " tokens of KV, its checkpoint holds " << kv);
        } else {
          ++tally_.durable_kv_lost_detected;
        }
      }
      ++tally_.sessions_verified;
      tally_.checkpoints_verified += durable_.at(id).generation > 0;
      tally_.kv_tokens_verified += served;
    }
    tally_.segments_quarantined += m.stats().segments_quarantined;
  }

 private:
  Op any_op() {
    static constexpr std::pair<Op, int> kWeights[] = {
        {Op::create, 8},        {Op::append, 24},      {Op::append_uncomputed, 4}, {Op::checkpoint, 18},
        {Op::hibernate_ssd, 8}, {Op::hibernate_dram, 4}, {Op::wake, 6},           {Op::fork, 6},
        {Op::truncate, 5},      {Op::save_history, 6}, {Op::pin, 3},              {Op::unpin, 3},
        {Op::drop, 5}};
    int total = 0;
    for (const auto& [op, w] : kWeights) total += w;
    int64_t r = pick(rng_, 0, total - 1);
    for (const auto& [op, w] : kWeights) {
      if (r < w) return op;
      r -= w;
    }
    return Op::append;
  }
  // The operation the power may go off in: mostly one that writes a segment.
  Op victim_op() {
    const int64_t r = pick(rng_, 0, 19);
    return r < 10 ? Op::checkpoint : r < 14 ? Op::hibernate_ssd : r < 17 ? Op::drop : any_op();
  }

  std::vector<int32_t> random_tokens(int64_t n) {
    std::vector<int32_t> t;
    for (int64_t i = 0; i < n; ++i) t.push_back(static_cast<int32_t>(pick(rng_, 10, 60)));
    return t;
  }

  void compute(SessionManager& m, SessionId id) {
    auto lease = m.lease(id, static_cast<int32_t>(m.tokens(id).size()));
    REQUIRE(lease.has_value());
    test::fake_compute(m, *lease);
  }

  // A checkpoint or hibernation that returned success: its history, KV and generation are durable.
  void acknowledge_checkpoint(SessionManager& m, SessionId id) {
    DurableSession& d = durable_.at(id);
    const memory::SessionInfo info = m.info(id);
    d.tokens = m.tokens(id);
    d.stored_kv = info.kv_tokens;
    d.kv_basis.assign(d.tokens.begin(), d.tokens.begin() + info.kv_tokens);
    d.generation = info.generation;
    d.pinned = info.pinned;
    ++tally_.acknowledged;
  }

  // Runs one operation (on a random session; a create when there is none) and returns what ran.
  // As the victim of a cut, a checkpoint first gets new KV to write and a drop takes the session
  // with the most checkpoints, so that the cut finds a segment being written or collected.
  Op step(SessionManager& m, PowerCutSimulator& sim, Op op, bool victim) {
    if (durable_.empty() || (op == Op::create && durable_.size() >= kMaxSessions)) {
      op = durable_.empty() ? Op::create : Op::append;
    }
    auto it = durable_.begin();
    if (!durable_.empty()) std::advance(it, pick(rng_, 0, static_cast<int64_t>(durable_.size()) - 1));
    if (victim && op == Op::drop) {
      it = std::max_element(durable_.begin(), durable_.end(),
                            [](const auto& a, const auto& b) { return a.second.generation < b.second.generation; });
    }
    const SessionId id = op == Op::create ? 0 : it->first;
    if (victim && (op == Op::checkpoint || op == Op::hibernate_ssd)) {
      const auto size = static_cast<int32_t>(m.tokens(id).size());
      if (size + 9 > kMaxTokens) m.truncate(id, size / 2);
      m.append(id, random_tokens(pick(rng_, 1, 9)));
      compute(m, id);
    }
    switch (op) {
      case Op::create: {
        const std::string name = "s" + std::to_string(next_name_++);
        const SessionId fresh = m.create(name);
        durable_[fresh] = DurableSession{name, {}, 0, {}, 0, false};
        if (pick(rng_, 0, 1) == 0) m.append(fresh, kSystemPrompt);
        break;
      }
      case Op::append:
      case Op::append_uncomputed: {
        const int64_t room = kMaxTokens - static_cast<int64_t>(m.tokens(id).size());
        if (room > 0) m.append(id, random_tokens(std::min<int64_t>(room, pick(rng_, 1, 9))));
        if (op == Op::append) compute(m, id);
        break;
      }
      case Op::checkpoint:
      case Op::hibernate_ssd: {
        if (m.info(id).pinned) op = Op::checkpoint;  // a pinned session is not hibernated
        auto o = op == Op::checkpoint ? m.checkpoint(id) : m.hibernate(id, Tier::ssd);
        o->wait();
        if (o->state() == memory::Operation::State::done) {
          acknowledge_checkpoint(m, id);
        } else {
          // Nothing else makes a checkpoint fail here.
          CHECK_MESSAGE(sim.powered_off(), "a checkpoint failed with the power on: " << o->error());
        }
        break;
      }
      case Op::hibernate_dram:
        if (!m.info(id).pinned) m.hibernate(id, Tier::dram)->wait();  // may find DRAM full: not durable anyway
        break;
      case Op::wake:
        m.wake(id)->wait();
        break;
      case Op::fork:
        if (durable_.size() < kMaxSessions) {
          const std::string name = "f" + std::to_string(next_name_++);
          const SessionId fresh = m.fork(id, name);
          durable_[fresh] = DurableSession{name, m.tokens(fresh), 0, {}, 0, false};  // history durable, no KV yet
        }
        break;
      case Op::truncate:
        m.truncate(id, static_cast<int32_t>(pick(rng_, 0, static_cast<int64_t>(m.tokens(id).size()))));
        break;
      case Op::save_history: {
        m.save_history(id);
        DurableSession& d = durable_.at(id);
        d.tokens = m.tokens(id);
        if (static_cast<size_t>(d.stored_kv) > d.tokens.size()) {  // truncated below its checkpoint
          d.stored_kv = 0;
          d.kv_basis.clear();
        }
        break;
      }
      case Op::pin: {
        bool any_pinned = false;
        for (const auto& s : m.list()) any_pinned = any_pinned || s.pinned;
        if (any_pinned) break;  // one pinned session at most: every lease still finds room
        try {
          m.pin(id);
          durable_.at(id).pinned = true;
        } catch (const memory::SessionError&) {
          // No room in the fast pool: nothing changed.
        }
        break;
      }
      case Op::unpin:
        m.unpin(id);
        durable_.at(id).pinned = false;
        break;
      case Op::drop:
        m.drop(id);
        durable_.erase(id);
        break;
    }
    return op;
  }

  std::mt19937& rng_;
  Tally& tally_;
  std::map<SessionId, DurableSession> durable_;
  int next_name_ = 0;
};

// Runs `cuts` power cuts, `cuts_per_dir` in a row on each state directory (each reboot
// verifies, then the workload goes on from what came back).
Tally run_power_cuts(int64_t cuts, int64_t cuts_per_dir, const test::CutOptions& options, uint32_t seed) {
  Tally tally;
  const bool honest_disk = options.damage_durable_files == 0;
  for (int64_t dir_index = 0; tally.cuts < cuts; ++dir_index) {
    const uint32_t dir_seed = seed + static_cast<uint32_t>(dir_index);
    CAPTURE(dir_seed);  // rerun one directory with DEN_POWER_CUT_SEED=<dir_seed> DEN_POWER_CUT_RUNS=<cuts_per_dir>
    std::mt19937 rng(dir_seed);
    ScratchDir dir;
    Workload workload(rng, tally);
    auto sim = boot(dir.path());
    auto m = std::make_unique<SessionManager>(config(dir.path(), sim.get()));
    for (int64_t k = 0; k < cuts_per_dir && tally.cuts < cuts; ++k) {
      workload.run_until_cut(*m, *sim);
      m.reset();  // the dying process is gone before the disk is rewritten
      const test::CutReport report = sim->cut(rng, options);
      CHECK(sim->surprises().empty());
      tally.add(report);
      sim = boot(dir.path());
      m = std::make_unique<SessionManager>(config(dir.path(), sim.get()));
      workload.verify(*m, report, honest_disk);
      if (tally.lost > 0 || tally.undetected > 0) return tally;  // the first failure says most
    }
  }
  return tally;
}

// The summary line.
std::string describe(const Tally& t) {
  std::ostringstream s;
  s << t.cuts << " cuts [" << t.cuts_in_commit_protocol << " in a checkpoint's commit protocol, "
    << t.cuts_in_collection << " in a collection's unlinks, " << t.cuts_between_operations
    << " between operations; right after";
  const char* separator = " ";
  for (const auto& [change, n] : t.cut_after) {
    if (change == PowerCutSimulator::Change::none) continue;
    s << separator << change_name(change) << " " << n;
    separator = ", ";
  }
  s << "]; " << t.acknowledged << " checkpoints acknowledged; unsynced writes: " << t.disk.writes_kept << " kept, "
    << t.disk.writes_dropped << " dropped, " << t.disk.writes_garbled << " garbled; unsynced entry changes: "
    << t.disk.entries_kept << " kept, " << t.disk.entries_undone << " undone; torn files discarded at start-up: "
    << t.torn_files_discarded;
  if (t.disk.durable_files_damaged > 0) {
    s << "; durable files damaged: " << t.disk.durable_files_damaged << ", segments quarantined: "
      << t.segments_quarantined << ", sessions served less KV than stored (detected, recomputed): "
      << t.durable_kv_lost_detected;
  }
  s << "; sessions verified: " << t.sessions_verified << " (" << t.checkpoints_verified << " checkpointed, "
    << t.kv_tokens_verified << " KV tokens exact); lost " << t.lost << ", undetected corruptions " << t.undetected;
  return s.str();
}

}  // namespace

TEST_CASE("power cut simulator: fsync keeps the bytes, a directory fsync keeps the name, nothing else holds") {
  using memory::File;
  const auto write_file = [](const std::filesystem::path& path, const std::string& bytes, bool sync,
                             PowerCutSimulator& sim) {
    File f(path, File::Mode::create_exclusive, false, &sim);
    f.write_at(bytes.data(), static_cast<int64_t>(bytes.size()), 0);
    if (sync) f.sync();
  };
  std::map<std::string, int> seen;  // outcomes met, to show each allowed one happens
  for (uint32_t seed = 0; seed < 300; ++seed) {
    CAPTURE(seed);
    ScratchDir dir;
    const auto in = [&](const char* name) { return dir.path() / name; };
    PowerCutSimulator sim;
    write_file(in("a"), "aaaa", true, sim);
    memory::sync_directory(dir.path(), &sim);
    write_file(in("b"), "bbbb", true, sim);   // bytes durable, name not
    write_file(in("c"), "cccc", false, sim);  // nothing durable
    memory::rename_file(in("a"), in("a2"), &sim);
    std::mt19937 rng(seed);
    sim.cut(rng);
    CHECK(sim.surprises().empty());

    const auto content = [&](const char* name) -> std::optional<std::string> {
      if (!std::filesystem::exists(in(name))) return std::nullopt;
      return test::read_file(in(name).string());
    };
    // The renamed file is under exactly one of its names, whole.
    const std::optional<std::string> a = content("a"), a2 = content("a2");
    CHECK(a.has_value() != a2.has_value());
    CHECK((a ? *a : a2.value_or("")) == "aaaa");
    ++seen[a ? "a under its old name" : "a under its new name"];
    // Durable bytes without a durable name: whole or gone.
    CHECK((!content("b") || *content("b") == "bbbb"));
    ++seen[content("b") ? "b kept" : "b gone"];
    // Nothing durable: gone, or any four bytes at most.
    if (content("c")) CHECK(content("c")->size() <= 4);
    ++seen[!content("c") ? "c gone" : *content("c") == "cccc" ? "c whole" : "c torn"];
  }
  CHECK(seen.size() == 7);
}

TEST_CASE("power cut: at any file call, nothing acknowledged is lost and nothing torn is served") {
  const int64_t cuts = env_or("DEN_POWER_CUT_RUNS", 1000);
  const auto seed = static_cast<uint32_t>(env_or("DEN_POWER_CUT_SEED", 7001));
  const Tally t = run_power_cuts(cuts, 6, {}, seed);
  MESSAGE("power cut (honest disk): " << describe(t));
  CHECK(t.cuts >= cuts);
  CHECK(t.lost == 0);
  CHECK(t.undetected == 0);
  CHECK(t.cuts_in_commit_protocol > 0);
  CHECK(t.torn_files_discarded > 0);  // the simulation did tear files
}

TEST_CASE("power cut: a disk that damages fsynced files too - every damage is detected, none served") {
  const int64_t cuts = std::max<int64_t>(1, env_or("DEN_POWER_CUT_RUNS", 1000) / 5);
  const auto seed = static_cast<uint32_t>(env_or("DEN_POWER_CUT_SEED", 7001)) + 1000003u;
  // One cut per directory: after a detected loss the store no longer matches the oracle's
  // notion of what a later restart must serve.
  const Tally t = run_power_cuts(cuts, 1, test::CutOptions{0.5}, seed);
  MESSAGE("power cut (lying disk): " << describe(t));
  CHECK(t.cuts >= cuts);
  CHECK(t.undetected == 0);
  CHECK(t.durable_kv_lost_detected > 0);  // the damage did reach stored KV
}

