// The session memory manager. A session is a model fingerprint, a token history and the block
// table of its KV. Blocks live in up to three tiers — the fast pool the engine reads (HBM, or
// host memory on the CPU backend), a pinned DRAM pool and SSD segment files — and move between
// them on pin / checkpoint / hibernate / wake and under memory pressure. Full blocks are content
// addressed (hash of the parent's hash, the block's tokens and the model fingerprint), so equal
// prefixes share one copy; a shared partial block is copied before it is written.
//
// The engine only ever sees a Lease: the session's block table in the fast pool, valid while
// the lease lives (leased blocks are never evicted or moved). Durable state (tokens, checkpoint
// block tables, segments) is in a SQLite store under `state_dir`; a checkpoint is acknowledged
// only after its segment is fsynced and its row committed.
//
// Threads: every method may be called from any thread (one mutex guards the state). checkpoint,
// hibernate and wake run on the manager's worker thread and return an Operation; file I/O runs
// without the lock, with the session marked busy so leases wait for it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "den/kernels/paged_kv.h"
#include "den/memory/block_pool.h"
#include "den/memory/file_io.h"
#include "den/memory/restore_cost.h"
#include "den/memory/transfer_engine.h"

namespace den::memory {

using SessionId = uint64_t;

// A request the manager refuses: unknown session, name taken, pinned session hibernated, ...
// Nothing changed.
class SessionError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct MemoryConfig {
  kernels::KvLayout layout;
  uint64_t model_fingerprint = 0;
  int64_t fast_blocks = 0;                      // the engine's pool, allocated once
  Placement fast_placement = Placement::host;   // device on the CUDA backend
  int64_t dram_blocks = 0;                      // pinned DRAM tier; 0: none
  std::filesystem::path state_dir;              // SQLite store and kv/ segments; empty: no SSD tier
  int64_t ssd_quota_bytes = 0;                  // 0: no quota
  bool poison = false;                          // NaN-fill blocks when handed out (tests, debug)
  RestoreCosts costs;                           // bandwidths and prefill rate for the cost model
  bool cost_model = true;                       // off: always load what is stored
  // Tests only: faults for the SSD tier's file calls, and a hook called after each step of the
  // checkpoint commit protocol ("write", "fsync", "rename", "fsync_dir", "commit").
  IoFaultInjector* faults = nullptr;
  std::function<void(std::string_view step)> on_commit_step;
};

struct SessionInfo {
  SessionId id = 0;
  std::string name;
  int32_t tokens = 0;         // history length
  int32_t kv_tokens = 0;      // tokens whose KV is held somewhere
  int64_t fast_blocks = 0;    // blocks of its KV resident in each tier (a block may be in several)
  int64_t dram_blocks = 0;
  int64_t ssd_blocks = 0;
  bool pinned = false;
  bool busy = false;          // an operation is moving its blocks
  uint64_t generation = 0;    // checkpoints committed
  bool checkpoint_current = false;  // the last checkpoint holds its whole history and KV
  Tier tier = Tier::none;     // the fastest tier holding all its KV (none: no KV)
};

struct MemoryStats {
  int64_t sessions = 0;
  int64_t fast_capacity = 0, fast_used = 0;
  int64_t dram_capacity = 0, dram_used = 0;
  int64_t ssd_bytes = 0;               // segment files referenced by the store
  int64_t tokens_computed = 0;         // KV computed for the first time
  int64_t tokens_recomputed = 0;       // KV computed again (lost, dropped, or chosen by the cost model)
  int64_t tokens_loaded = 0;           // KV brought back from DRAM or SSD
  int64_t prefix_hit_tokens = 0;       // KV found in another session's blocks
  int64_t bytes_dram_to_fast = 0, bytes_fast_to_dram = 0;
  int64_t bytes_ssd_read = 0, bytes_ssd_written = 0;
  int64_t blocks_evicted = 0;          // fast copies given up under pressure
  int64_t kv_tokens_dropped = 0;       // KV given up entirely (to be recomputed)
  int64_t segments_quarantined = 0;
};

// An asynchronous verb. Progress is in bytes moved; failure keeps the message.
class Operation {
 public:
  enum class State { queued, running, done, failed };
  State state() const;
  void wait() const;                 // until done or failed; does not throw
  void wait_or_throw() const;        // throws SessionError with the message when failed
  std::string error() const;
  int64_t done_bytes() const { return done_bytes_.load(); }
  int64_t total_bytes() const { return total_bytes_.load(); }
  std::string_view verb() const { return verb_; }

  explicit Operation(std::string verb) : verb_(std::move(verb)) {}
  // The manager's side.
  void start(int64_t total_bytes);
  void progress(int64_t done_bytes) { done_bytes_.store(done_bytes); }
  void finish();
  void fail(std::string message);

 private:
  std::string verb_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  State state_ = State::queued;
  std::string error_;
  std::atomic<int64_t> done_bytes_{0}, total_bytes_{0};
};

class SessionManager;

// A session's KV made resident in the fast pool for engine steps. Move-only; the blocks stay
// put until it dies. The engine computes the KV of tokens [kv_tokens(), n) into block_table()
// and reports it with computed(n).
class Lease {
 public:
  Lease(Lease&& other) noexcept;
  Lease& operator=(Lease&& other) noexcept;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease();

  SessionId session() const { return session_; }
  std::span<const int32_t> block_table() const { return table_; }
  int32_t kv_tokens() const { return kv_tokens_; }
  // Room in the block table for the KV of `total_tokens` tokens (evicting other sessions if it
  // must). False when the fast pool cannot make room; nothing changed then.
  bool reserve(int32_t total_tokens);
  // The KV of the first `total_tokens` tokens of the history is now valid (<= history length).
  void computed(int32_t total_tokens);
  // For a layer-wise lease: the KV still arriving, to hand to Backend::forward (nullptr when
  // everything is in place). It stays valid until computed() or the lease's end.
  engine::KvArrival* arrival() { return arriving_records_.empty() ? nullptr : &arriving_; }

 private:
  friend class SessionManager;
  Lease(SessionManager* manager, SessionId session) : manager_(manager), session_(session) {}
  void release() noexcept;
  void settle();  // waits for arriving KV and lets other readers at those blocks
  SessionManager* manager_ = nullptr;
  SessionId session_ = 0;
  std::vector<int32_t> table_;
  int32_t kv_tokens_ = 0;
  LayeredTransfer arriving_;
  std::vector<int32_t> arriving_records_;  // block records in flight until settle()
};

class SessionManager {
 public:
  // Opens (or creates) the store under state_dir, removes temporary and unreferenced segment
  // files, and loads every session: tokens and checkpointed block tables, no KV resident yet.
  explicit SessionManager(MemoryConfig config);
  ~SessionManager();  // finishes queued operations; every Lease must be gone before
  SessionManager(const SessionManager&) = delete;
  SessionManager& operator=(const SessionManager&) = delete;

  SessionId create(std::string_view name = {});
  std::optional<SessionId> find(std::string_view name) const;
  // Adds tokens to the history (their KV is computed through a lease). Not durable by itself:
  // checkpoint (tokens and KV) or save_history (tokens only) makes it so.
  void append(SessionId id, std::span<const int32_t> tokens);
  // Makes the token history durable without writing KV (one small SQLite transaction).
  void save_history(SessionId id);
  // Keeps the first `keep_tokens` tokens (and their KV).
  void truncate(SessionId id, int32_t keep_tokens);
  // Gives up the session's KV in every tier and keeps its history; computing it again counts
  // as recompute (the `recompute` policy does this after every turn).
  void drop_kv(SessionId id);
  // Drops the first `drop_tokens` tokens. K is stored after RoPE, so the kept KV is at the wrong
  // positions and is recomputed (see docs/ARCHITECTURE.md for the measurement behind this).
  void truncate_front(SessionId id, int32_t drop_tokens);
  // A new session with the same history, sharing every block (copy-on-write).
  SessionId fork(SessionId id, std::string_view name = {});
  // Forgets the session, its blocks and its durable rows.
  void drop(SessionId id);

  std::vector<int32_t> tokens(SessionId id) const;
  SessionInfo info(SessionId id) const;
  std::vector<SessionInfo> list() const;
  MemoryStats stats() const;

  void pin(SessionId id);    // its KV stays in the fast pool (woken first if needed)
  void unpin(SessionId id);
  std::shared_ptr<Operation> checkpoint(SessionId id);
  std::shared_ptr<Operation> hibernate(SessionId id, Tier to);  // dram or ssd
  std::shared_ptr<Operation> wake(SessionId id);
  // A session announced as about to run: woken in the background if memory allows without
  // evicting pinned or leased sessions.
  std::shared_ptr<Operation> prefetch(SessionId id);

  // One file holding a session's tokens, KV and metadata, to move it to another store or
  // machine: written to `path` + ".tmp", fsynced and renamed. The KV is woken first if needed.
  std::shared_ptr<Operation> export_session(SessionId id, const std::filesystem::path& path);
  // A new session from an exported file (checksums verified; ImportError names what is wrong).
  // KV made for another model or layout is not loaded: the tokens come in and are recomputed.
  // With a store, the new session's history is durable when this returns.
  SessionId import_session(const std::filesystem::path& path, std::string_view name = {});

  // Makes the session's KV resident in the fast pool (waking it, reusing shared prefix blocks,
  // or — when the cost model says so — dropping stored KV to recompute it) and reserves room
  // for `total_tokens` tokens. nullopt when the fast pool cannot make room now (everything else
  // is leased or pinned): the caller waits and retries. Waits while the session is busy.
  // layerwise: blocks woken from DRAM arrive layer by layer while the engine already runs
  // (pass lease->arrival() to Backend::forward); otherwise the lease returns with all KV in place.
  std::optional<Lease> lease(SessionId id, int32_t total_tokens, bool layerwise = false);

  // What waking the session would cost, per the cost model.
  RestorePlan restore_plan(SessionId id) const;
  void set_prefill_rate(double tokens_per_s);

  // Times copies of `bytes` between pinned DRAM and the fast pool (benchmark floors, and the
  // cost model's bandwidth when the caller feeds it back through set_link_bandwidths).
  LinkBandwidths measure_links(int64_t bytes);
  void set_link_bandwidths(double dram_to_fast_bytes_per_s, double ssd_read_bytes_per_s);

  kernels::PagedKvView fast_view() const;
  const MemoryConfig& config() const { return config_; }
  // The fast pool's bytes per token of KV (all layers).
  int64_t kv_bytes_per_token() const;

  struct Impl;

 private:
  friend class Lease;
  MemoryConfig config_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace den::memory
