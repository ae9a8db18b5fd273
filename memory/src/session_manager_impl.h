// The session manager's private state (session_manager.h): block records, session records and
// SessionManager::Impl with the residency, eviction and durability logic. Shared by the files
// that implement the public API (session_manager.cpp) and export/import (session_export.cpp).
// Concurrency: Impl::mutex guards every field; functions named *_locked expect it held and may
// release it only where they say so (file I/O), with the session marked busy and the blocks
// being filled marked in_flight.
#pragma once

#include <xxhash.h>

#include <sys/statvfs.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "den/memory/failpoints.h"
#include "den/memory/metadata_store.h"
#include "den/memory/segment_file.h"
#include "den/memory/session_manager.h"
#include "den/memory/transfer_engine.h"

namespace den::memory {
namespace fs = std::filesystem;

namespace detail {

constexpr int32_t kNoSlot = -1;
constexpr uint64_t kChainSeed = 0x44454e2d4b560001ULL;  // hash "parent" of a session's first block

// Content hash of one block: its parent's hash, the model, its token count and tokens. Two
// sessions whose histories agree up to the end of a block get the same hash for it.
inline uint64_t block_content_hash(uint64_t parent, uint64_t fingerprint, std::span<const int32_t> tokens) {
  std::vector<unsigned char> bytes(20 + tokens.size() * 4);
  const auto count = static_cast<uint32_t>(tokens.size());
  std::memcpy(bytes.data(), &parent, 8);
  std::memcpy(bytes.data() + 8, &fingerprint, 8);
  std::memcpy(bytes.data() + 16, &count, 4);
  if (!tokens.empty()) std::memcpy(bytes.data() + 20, tokens.data(), tokens.size() * 4);
  return XXH3_64bits(bytes.data(), bytes.size());
}

inline int64_t blocks_for(int64_t tokens, int32_t block_tokens) { return (tokens + block_tokens - 1) / block_tokens; }

}  // namespace detail

// ---- state ------------------------------------------------------------------------------------

namespace detail {

struct BlockRecord {
  int32_t refs = 0;           // sessions whose block table holds it; 0: free record
  int32_t fast = kNoSlot;     // slot in the fast pool
  int32_t dram = kNoSlot;     // slot in the DRAM pool
  int32_t leases = 0;         // leased sessions holding it: not evicted, not moved
  int32_t pins = 0;           // pinned sessions holding it: stays in the fast pool
  bool in_flight = false;     // being filled from SSD: wait before using or evicting
  bool arriving = false;      // in flight for a layer-wise lease: settled only after its engine step
  bool indexed = false;       // full, computed, immutable and in the prefix index under `hash`
  uint64_t hash = 0;          // content hash while indexed
  uint64_t durable_hash = 0;  // the store holds its current content under this hash (0: not)
  uint64_t version = 0;       // bumped on every write of its bytes
};

struct SessionRecordMem {
  SessionId id = 0;
  std::string name;
  std::vector<int32_t> tokens;
  int32_t kv_tokens = 0;              // KV valid for tokens [0, kv_tokens)
  int32_t computed_high = 0;          // most tokens ever computed (what is below is recompute)
  std::vector<int32_t> blocks;        // block records; covers kv_tokens, more while leased
  std::vector<uint64_t> chain;        // content hashes of the history's full blocks (a cache)
  bool pinned = false;
  int32_t leases = 0;
  bool busy = false;                  // an operation is filling its blocks without the lock
  uint64_t generation = 0;
  int32_t stored_kv_tokens = 0;       // KV tokens of the committed checkpoint
  uint64_t history_version = 0;       // bumped when tokens or KV change
  uint64_t checkpointed_version = ~0ULL;
  uint64_t last_use = 0;
};

}  // namespace detail

using namespace detail;

struct SessionManager::Impl {
  Impl(SessionManager& owner, const MemoryConfig& config)
      : owner(owner),
        config(config),
        block_tokens(config.layout.block_tokens),
        block_bytes(config.layout.block_bytes()),
        fast(config.layout, config.fast_blocks, config.fast_placement, config.poison),
        dram(config.layout, std::max<int64_t>(config.dram_blocks, 1),
             config.fast_placement == Placement::device ? Placement::pinned_host : Placement::host, false),
        dram_capacity(config.dram_blocks),
        transfers(fast, dram) {}

  SessionManager& owner;
  const MemoryConfig& config;
  int32_t block_tokens;
  int64_t block_bytes;
  BlockPool fast;
  BlockPool dram;
  int64_t dram_capacity;
  TransferEngine transfers;
  std::mutex transfer_mutex;  // the engine's staging is not shared; taken after `mutex`, never before
  std::unique_ptr<MetadataStore> store;
  fs::path kv_dir;
  std::map<std::string, SegmentRecord> segments;  // live segment files, by name

  std::vector<BlockRecord> blocks;
  std::vector<int32_t> free_records;
  std::unordered_map<uint64_t, int32_t> prefix_index;  // content hash -> block record
  std::map<SessionId, SessionRecordMem> sessions;
  std::unordered_map<std::string, SessionId> names;
  SessionId next_id = 1;
  uint64_t tick = 0;
  MemoryStats counters;

  mutable std::mutex mutex;
  std::condition_variable changed;  // busy / in_flight / leases changed

  // The worker thread runs the asynchronous verbs in order.
  std::mutex queue_mutex;
  std::condition_variable queue_changed;
  std::deque<std::function<void()>> queue;
  bool stopping = false;
  std::thread worker;

  // -- lookups -------------------------------------------------------------------------------
  SessionRecordMem& session(SessionId id) {
    auto it = sessions.find(id);
    if (it == sessions.end()) throw SessionError("no session with id " + std::to_string(id));
    return it->second;
  }
  void wait_not_busy(std::unique_lock<std::mutex>& lock, SessionId id) {
    changed.wait(lock, [&] {
      auto it = sessions.find(id);
      return it == sessions.end() || !it->second.busy;
    });
  }

  // -- block records -------------------------------------------------------------------------
  int32_t new_record() {
    int32_t h;
    if (!free_records.empty()) {
      h = free_records.back();
      free_records.pop_back();
      blocks[static_cast<size_t>(h)] = BlockRecord{};
    } else {
      h = static_cast<int32_t>(blocks.size());
      blocks.emplace_back();
    }
    blocks[static_cast<size_t>(h)].refs = 1;
    return h;
  }
  BlockRecord& rec(int32_t h) { return blocks[static_cast<size_t>(h)]; }
  const BlockRecord& rec(int32_t h) const { return blocks[static_cast<size_t>(h)]; }

  void unref(int32_t h) {
    BlockRecord& b = rec(h);
    if (--b.refs > 0) return;
    if (b.fast != kNoSlot) fast.release(b.fast);
    if (b.dram != kNoSlot) dram.release(b.dram);
    if (b.indexed) {
      auto it = prefix_index.find(b.hash);
      if (it != prefix_index.end() && it->second == h) prefix_index.erase(it);
    }
    b = BlockRecord{};
    free_records.push_back(h);
  }

  // Appends block record h (whose reference the caller already counted) to s's table.
  void attach(SessionRecordMem& s, int32_t h) {
    s.blocks.push_back(h);
    if (s.leases > 0) ++rec(h).leases;
    if (s.pinned) ++rec(h).pins;
  }
  // Removes s's blocks from index `first` on and drops their references.
  void detach_from(SessionRecordMem& s, size_t first) {
    while (s.blocks.size() > first) {
      const int32_t h = s.blocks.back();
      s.blocks.pop_back();
      if (s.leases > 0) --rec(h).leases;
      if (s.pinned) --rec(h).pins;
      unref(h);
    }
  }
  void replace(SessionRecordMem& s, size_t index, int32_t h) {
    const int32_t old = s.blocks[index];
    if (s.leases > 0) { --rec(old).leases; ++rec(h).leases; }
    if (s.pinned) { --rec(old).pins; ++rec(h).pins; }
    s.blocks[index] = h;
    unref(old);
  }
  void set_leased(SessionRecordMem& s, int delta) {
    if ((delta > 0 && s.leases++ == 0) || (delta < 0 && --s.leases == 0)) {
      for (int32_t h : s.blocks) rec(h).leases += delta;
    }
  }

  // Gives up the session's KV from block `index` on (it will be recomputed).
  void drop_kv_from(SessionRecordMem& s, size_t index) {
    const int32_t keep = std::min<int32_t>(s.kv_tokens, static_cast<int32_t>(index) * block_tokens);
    if (keep < s.kv_tokens) counters.kv_tokens_dropped += s.kv_tokens - keep;
    s.kv_tokens = keep;
    detach_from(s, std::min(index, s.blocks.size()));
    ++s.history_version;
  }

  // -- hashes --------------------------------------------------------------------------------
  // Content hashes of the history's first `n` full blocks.
  void ensure_chain(SessionRecordMem& s, size_t n) {
    const auto fp = config.model_fingerprint;
    while (s.chain.size() < n) {
      const size_t i = s.chain.size();
      const uint64_t parent = i == 0 ? kChainSeed : s.chain[i - 1];
      s.chain.push_back(block_content_hash(
          parent, fp, std::span(s.tokens).subspan(i * static_cast<size_t>(block_tokens), static_cast<size_t>(block_tokens))));
    }
  }
  // The content hash of every block covering the first kv tokens (the last one may be partial).
  std::vector<uint64_t> kv_hashes(SessionRecordMem& s, int32_t kv) {
    const auto n = static_cast<size_t>(blocks_for(kv, block_tokens));
    const size_t full = static_cast<size_t>(kv / block_tokens);
    ensure_chain(s, full);
    std::vector<uint64_t> hashes(s.chain.begin(), s.chain.begin() + static_cast<std::ptrdiff_t>(full));
    if (n > full) {
      const uint64_t parent = full == 0 ? kChainSeed : s.chain[full - 1];
      hashes.push_back(block_content_hash(parent, config.model_fingerprint,
                                          std::span(s.tokens).subspan(full * static_cast<size_t>(block_tokens),
                                                                      static_cast<size_t>(kv) - full * static_cast<size_t>(block_tokens))));
    }
    return hashes;
  }

  // Takes KV for the next whole blocks of the history from the prefix index.
  void prefix_extend(SessionRecordMem& s) {
    if (s.kv_tokens % block_tokens != 0 || s.blocks.size() != static_cast<size_t>(s.kv_tokens / block_tokens)) return;
    while (static_cast<size_t>(s.kv_tokens) + static_cast<size_t>(block_tokens) <= s.tokens.size()) {
      const size_t i = static_cast<size_t>(s.kv_tokens / block_tokens);
      ensure_chain(s, i + 1);
      auto it = prefix_index.find(s.chain[i]);
      // A block arriving for a layer-wise lease is settled only after that lease's engine
      // step; a lease of the same step that took it would wait for that step forever.
      if (it == prefix_index.end() || rec(it->second).arriving) break;
      ++rec(it->second).refs;
      attach(s, it->second);
      s.kv_tokens += block_tokens;
      counters.prefix_hit_tokens += block_tokens;
      ++s.history_version;
    }
  }

  // -- eviction ------------------------------------------------------------------------------
  // Seconds to bring back one of s's fast blocks if it were evicted now: a DRAM copy (kept, or
  // made while DRAM has room), else an SSD read where a durable copy exists, else a recompute,
  // each at the cost model's current rates.
  double restore_seconds_per_block(const SessionRecordMem& s) const {
    const auto& c = config.costs;
    const double from_dram = static_cast<double>(block_bytes) / c.dram_to_fast_bytes_per_s;
    const double recompute = block_tokens / c.prefill_tokens_per_s;
    const double from_ssd = std::min(recompute, static_cast<double>(block_bytes) / c.ssd_read_bytes_per_s);
    const bool dram_room = dram_capacity > 0 && dram.free_blocks() > 0;
    double total = 0;
    int64_t counted = 0;
    for (int32_t h : s.blocks) {
      const BlockRecord& b = rec(h);
      if (b.fast == kNoSlot) continue;
      ++counted;
      total += b.dram != kNoSlot || dram_room ? from_dram : durable(b) ? from_ssd : recompute;
    }
    return counted == 0 ? 0.0 : total / static_cast<double>(counted);
  }
  // Low scores go first: cheap to bring back per block freed, and not used for long.
  double eviction_score(const SessionRecordMem& s) const {
    const double age = static_cast<double>(tick - s.last_use) + 1.0;
    return restore_seconds_per_block(s) / age;
  }

  bool fast_evictable(const BlockRecord& b) const {
    return b.fast != kNoSlot && b.leases == 0 && b.pins == 0 && !b.in_flight;
  }
  bool durable(const BlockRecord& b) const { return b.durable_hash != 0; }

  // Frees DRAM slots until `need` are free, never touching `protect`. Copies that exist in
  // another tier go first (no loss); then KV that lives only in DRAM is given up, tail first.
  bool evict_dram(int64_t need, SessionId protect) {
    if (dram_capacity == 0) return false;
    std::set<SessionId> tried;
    while (dram.free_blocks() < need) {
      SessionRecordMem* victim = nullptr;
      for (auto& [id, s] : sessions) {
        if (id == protect || s.busy || tried.count(id)) continue;
        bool has = false;
        for (int32_t h : s.blocks) has = has || rec(h).dram != kNoSlot;
        if (has && (victim == nullptr || eviction_score(s) < eviction_score(*victim))) victim = &s;
      }
      if (victim == nullptr) return false;
      tried.insert(victim->id);
      for (size_t i = victim->blocks.size(); i-- > 0 && dram.free_blocks() < need;) {
        if (i >= victim->blocks.size()) continue;
        BlockRecord& b = rec(victim->blocks[i]);
        if (b.dram == kNoSlot) continue;
        if (b.fast != kNoSlot || durable(b)) {
          dram.release(b.dram);
          b.dram = kNoSlot;
        } else if (b.refs == 1 && b.leases == 0) {
          drop_kv_from(*victim, i);
        }
      }
    }
    return true;
  }

  // Frees fast slots until `need` are free: whole sessions, lowest score first. A block keeps a
  // copy in DRAM or on SSD where it can; one that can keep none is given up (tail first).
  bool evict_fast(int64_t need) {
    std::set<SessionId> tried;
    while (fast.free_blocks() < need) {
      SessionRecordMem* victim = nullptr;
      for (auto& [id, s] : sessions) {
        if (s.busy || s.leases > 0 || s.pinned || tried.count(id)) continue;
        bool has = false;
        for (int32_t h : s.blocks) has = has || fast_evictable(rec(h));
        if (has && (victim == nullptr || eviction_score(s) < eviction_score(*victim))) victim = &s;
      }
      if (victim == nullptr) return false;
      tried.insert(victim->id);
      demote_fast(*victim);
    }
    return true;
  }

  void demote_fast(SessionRecordMem& s) {
    std::vector<int32_t> moving, from, to;
    for (size_t i = s.blocks.size(); i-- > 0;) {
      if (i >= s.blocks.size()) continue;
      const int32_t h = s.blocks[i];
      BlockRecord& b = rec(h);
      if (!fast_evictable(b)) continue;
      if (b.dram != kNoSlot || durable(b)) {
        fast.release(b.fast);
        b.fast = kNoSlot;
        ++counters.blocks_evicted;
        continue;
      }
      std::optional<int32_t> slot = dram_capacity > 0 ? dram.allocate() : std::nullopt;
      if (!slot && dram_capacity > 0 && evict_dram(1, s.id)) slot = dram.allocate();
      if (slot) {
        moving.push_back(h);
        from.push_back(b.fast);
        to.push_back(*slot);
      } else if (b.refs == 1) {
        // Undo the demotions planned past this block first: drop_kv_from releases them.
        for (size_t k = 0; k < moving.size(); ++k) dram.release(to[k]);
        moving.clear(), from.clear(), to.clear();
        drop_kv_from(s, i);
      }
    }
    if (moving.empty()) return;
    {
      std::lock_guard transfer_lock(transfer_mutex);
      transfers.fast_to_dram(from, to).wait();
    }
    counters.bytes_fast_to_dram += static_cast<int64_t>(moving.size()) * block_bytes;
    for (size_t k = 0; k < moving.size(); ++k) {
      BlockRecord& b = rec(moving[k]);
      b.dram = to[k];
      fast.release(b.fast);
      b.fast = kNoSlot;
      ++counters.blocks_evicted;
    }
  }

  std::optional<int32_t> allocate_fast() {
    if (fast.free_blocks() == 0 && !evict_fast(1)) return std::nullopt;
    return fast.allocate();
  }

  // -- residency -----------------------------------------------------------------------------
  // The cost model learns the rates wakes really achieve (large ones only: small transfers are
  // dominated by fixed costs the model does not describe).
  static void calibrate(double& rate, int64_t bytes, double seconds) {
    if (bytes < (int64_t{64} << 20) || seconds <= 0) return;
    const double observed = static_cast<double>(bytes) / seconds;
    rate = 0.5 * rate + 0.5 * observed;
  }

  int32_t tokens_in_block(const SessionRecordMem& s, size_t index) const {
    return std::clamp(s.kv_tokens - static_cast<int32_t>(index) * block_tokens, 0, block_tokens);
  }

  // An SSD wake reads chunks of 32 MiB (at least one block) on a few threads at once: a VM or
  // NVMe disk reaches its rate only with several requests in flight, and checksums and uploads
  // then overlap the reads. On a GPU each chunk lands in pinned staging that the copy kernel
  // reads in place (a copy through pageable memory held the upload lock 10x longer and left
  // the disk idle meanwhile: wakes at 1.3-1.4x the disk floor, now 1.05-1.07x on an H200 host).
  static constexpr int64_t kWakeChunkBytes = 32 << 20;
  static constexpr size_t kReadThreads = 4;
  int64_t wake_chunk_blocks() const { return std::max<int64_t>(1, kWakeChunkBytes / block_bytes); }

  // Pins the SSD wake's staging up front (cudaHostAlloc takes ~20 ms per buffer, serialized),
  // so that the first wake runs as fast as the others.
  void prepare_wake_staging() {
    if (fast.placement() != Placement::device) return;
    std::vector<HostStaging> warm;
    for (size_t t = 0; t < kReadThreads; ++t) warm.push_back(transfers.host_staging(wake_chunk_blocks() * block_bytes));
  }  // returned to the engine's pool here

  // Makes every block covering s's KV resident in the fast pool. The caller has leased s (its
  // resident blocks cannot be evicted meanwhile). May release the lock while reading segments.
  // False when the fast pool cannot make room.
  //
  // With `arriving` (a layer-wise wake), DRAM copies are issued layer by layer and not waited
  // for: their records stay in_flight (listed in `arriving_records`) until the caller has
  // waited on `arriving` and cleared them; every other reader waits for them meanwhile.
  bool make_resident_locked(std::unique_lock<std::mutex>& lock, SessionRecordMem& s,
                            LayeredTransfer* arriving = nullptr, std::vector<int32_t>* arriving_records = nullptr) {
    prefix_extend(s);  // once: after a cost-model drop the index must not hand the blocks back
    std::unordered_set<int32_t> ours_set;  // the records this call left in flight
    auto ours = [&](int32_t h) { return ours_set.count(h) != 0; };
    bool planned = false;
    for (;;) {
      changed.wait(lock, [&] {
        for (int32_t h : s.blocks) if (rec(h).in_flight && !ours(h)) return false;
        return true;
      });
      const auto covering = static_cast<size_t>(blocks_for(s.kv_tokens, block_tokens));
      if (s.blocks.size() > covering && s.leases <= 1) detach_from(s, covering);
      std::vector<size_t> missing;
      bool from_ssd = false;
      for (size_t i = 0; i < covering; ++i) {
        const BlockRecord& b = rec(s.blocks[i]);
        if (b.fast != kNoSlot) continue;
        missing.push_back(i);
        from_ssd = from_ssd || b.dram == kNoSlot;
      }
      if (missing.empty()) return true;

      if (config.cost_model && !planned) {
        planned = true;  // once: the plan for the front left would split it again, and again
        const int32_t first_token = static_cast<int32_t>(missing.front()) * block_tokens;
        const int32_t restore_tokens = s.kv_tokens - first_token;
        // A layer-wise wake from DRAM overlaps the copy of the front with the engine's work on the
        // tail (layer l computes while later layers arrive), so a split can beat both pure plans;
        // SSD reads bring whole blocks, one part after the other.
        RestoreCosts costs = config.costs;
        costs.layerwise = arriving != nullptr && !from_ssd;
        const RestorePlan plan = plan_restore(costs, from_ssd ? Tier::ssd : Tier::dram, restore_tokens,
                                              block_bytes / block_tokens);
        if (plan.load_tokens < restore_tokens) {
          const int32_t keep_blocks = (first_token + plan.load_tokens) / block_tokens;
          drop_kv_from(s, static_cast<size_t>(keep_blocks));
          continue;
        }
      }

      // Slots first (evicting others), then DRAM copies, then segment reads.
      std::vector<int32_t> slots;
      for (size_t k = 0; k < missing.size(); ++k) {
        std::optional<int32_t> slot = allocate_fast();
        if (!slot) {
          for (int32_t x : slots) fast.release(x);
          return false;
        }
        slots.push_back(*slot);
      }
      std::vector<int32_t> dram_src, dram_dst;        // copied now
      std::vector<int32_t> layered_src, layered_dst;  // left arriving layer by layer
      std::vector<int32_t> layered_records;
      std::vector<std::pair<size_t, int32_t>> from_disk;  // (block index in s, fast slot)
      const bool layered = arriving != nullptr && arriving_records->empty();
      int64_t dram_tokens = 0;
      for (size_t k = 0; k < missing.size(); ++k) {
        const int32_t h = s.blocks[missing[k]];
        BlockRecord& b = rec(h);
        if (b.dram != kNoSlot) {
          dram_tokens += tokens_in_block(s, missing[k]);
          // Only blocks no other session holds arrive layer by layer: another lease in the same
          // engine step would wait for a shared one, and it settles only after that step.
          if (layered && b.refs == 1) {
            layered_src.push_back(b.dram);
            layered_dst.push_back(slots[k]);
            layered_records.push_back(h);
          } else {
            dram_src.push_back(b.dram);
            dram_dst.push_back(slots[k]);
          }
          b.fast = slots[k];
        } else {
          from_disk.emplace_back(missing[k], slots[k]);
        }
      }
      if (!layered_src.empty()) {
        std::lock_guard transfer_lock(transfer_mutex);
        *arriving = transfers.dram_to_fast_by_layer(layered_src, layered_dst);
        for (int32_t h : layered_records) {
          rec(h).in_flight = true;
          rec(h).arriving = true;
          arriving_records->push_back(h);
          ours_set.insert(h);
        }
        counters.bytes_dram_to_fast += static_cast<int64_t>(layered_src.size()) * block_bytes;
      }
      if (!dram_src.empty()) {
        std::lock_guard transfer_lock(transfer_mutex);
        const auto started = std::chrono::steady_clock::now();
        transfers.dram_to_fast(dram_src, dram_dst).wait();
        calibrate(owner.config_.costs.dram_to_fast_bytes_per_s, static_cast<int64_t>(dram_src.size()) * block_bytes,
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
        counters.bytes_dram_to_fast += static_cast<int64_t>(dram_src.size()) * block_bytes;
      }
      counters.tokens_loaded += dram_tokens;
      if (from_disk.empty()) continue;
      if (!read_from_disk_locked(lock, s, from_disk)) return false;  // out of host memory: later
      // A quarantine may have dropped part of s's KV: go round again to check.
    }
  }

  // Fills fast slots from segment files. Releases the lock for the reads; blocks being filled
  // are in_flight and the session busy meanwhile. An unreadable or damaged segment is
  // quarantined (its blocks' KV is lost and recomputed). False when part could not be read for
  // lack of host memory (nothing lost; a later wake retries).
  bool read_from_disk_locked(std::unique_lock<std::mutex>& lock, SessionRecordMem& s,
                             const std::vector<std::pair<size_t, int32_t>>& wanted) {
    struct Read {
      int32_t record;
      int32_t slot;
      BlockLocation where;
      int32_t tokens;  // valid tokens in it
    };
    std::map<std::string, std::vector<Read>> by_segment;
    std::map<std::string, uint64_t> footers;
    std::vector<int32_t> unlocated;
    std::vector<uint64_t> wanted_hashes;
    for (const auto& [index, slot] : wanted) wanted_hashes.push_back(rec(s.blocks[index]).durable_hash);
    std::vector<std::optional<BlockLocation>> locations =
        store ? store->locate_blocks(wanted_hashes) : std::vector<std::optional<BlockLocation>>(wanted.size());
    for (size_t w = 0; w < wanted.size(); ++w) {
      const auto& [index, slot] = wanted[w];
      const int32_t h = s.blocks[index];
      BlockRecord& b = rec(h);
      const std::optional<BlockLocation>& where = locations[w];
      if (!where || !segments.count(where->segment)) {
        fast.release(slot);
        unlocated.push_back(h);
        continue;
      }
      b.in_flight = true;
      footers[where->segment] = segments.at(where->segment).footer_hash;
      by_segment[where->segment].push_back({h, slot, *where, tokens_in_block(s, index)});
    }
    s.busy = true;
    std::vector<std::string> bad_segments;
    std::vector<Read> done;
    lock.unlock();
    const bool on_device = fast.placement() == Placement::device;
    const auto chunk_blocks = static_cast<size_t>(wake_chunk_blocks());
    struct Chunk {
      const std::string* segment;
      const SegmentReader* reader;
      size_t first, n;
    };
    std::map<std::string, std::unique_ptr<SegmentReader>> readers;
    std::set<std::string> bad;  // guarded by io_mutex while the readers run
    std::mutex io_mutex;
    std::vector<Chunk> chunks;
    for (auto& [name, reads] : by_segment) {
      std::sort(reads.begin(), reads.end(), [](const Read& a, const Read& b) { return a.where.index < b.where.index; });
      try {
        readers[name] = std::make_unique<SegmentReader>(
            kv_dir / name, SegmentHeader{config.model_fingerprint, 0, 0, config.layout}, footers.at(name), config.faults);
      } catch (const std::exception&) {
        bad.insert(name);
        continue;
      }
      for (size_t first = 0; first < reads.size(); first += chunk_blocks) {
        chunks.push_back({&name, readers[name].get(), first, std::min(chunk_blocks, reads.size() - first)});
      }
    }
    std::atomic<size_t> next_chunk{0};
    std::vector<char> chunk_done(chunks.size(), 0);  // each written by the one thread that took it
    auto read_chunks = [&] {
      try {
        HostStaging staging;
        if (on_device) staging = transfers.host_staging(static_cast<int64_t>(chunk_blocks) * block_bytes);
        for (size_t c = next_chunk++; c < chunks.size(); c = next_chunk++) {
          const Chunk& chunk = chunks[c];
          chunk_done[c] = 1;
          {
            std::lock_guard io_lock(io_mutex);
            if (bad.count(*chunk.segment)) continue;
          }
          try {
            const std::vector<Read>& reads = by_segment.at(*chunk.segment);
            std::vector<int32_t> indices, slots;
            std::vector<void*> destinations;
            for (size_t k = 0; k < chunk.n; ++k) {
              const Read& r = reads[chunk.first + k];
              indices.push_back(r.where.index);
              slots.push_back(r.slot);
              destinations.push_back(on_device ? static_cast<char*>(staging.data()) + static_cast<int64_t>(k) * block_bytes
                                               : static_cast<char*>(fast.view().blocks) + r.slot * block_bytes);
            }
            chunk.reader->read_blocks(indices, destinations);
            if (on_device) {
              std::lock_guard transfer_lock(transfer_mutex);
              transfers.staging_to_fast(staging, slots).wait();
            }
          } catch (const std::exception&) {
            std::lock_guard io_lock(io_mutex);
            bad.insert(*chunk.segment);
          }
        }
      } catch (const std::exception&) {
        // No staging memory: this thread stops; chunks nobody took are retried by a later wake.
      }
    };
    const auto started = std::chrono::steady_clock::now();
    std::vector<std::thread> helpers;
    for (size_t t = 1; t < std::min(kReadThreads, chunks.size()); ++t) helpers.emplace_back(read_chunks);
    read_chunks();
    for (auto& t : helpers) t.join();
    std::set<std::string> unread;
    for (size_t c = 0; c < chunks.size(); ++c) {
      if (!chunk_done[c]) unread.insert(*chunks[c].segment);
    }
    for (const auto& [name, reads] : by_segment) {
      if (bad.count(name)) {
        bad_segments.push_back(name);
      } else if (!unread.count(name)) {
        done.insert(done.end(), reads.begin(), reads.end());
      }
    }
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    lock.lock();
    for (const Read& r : done) {
      BlockRecord& b = rec(r.record);
      b.in_flight = false;
      b.fast = r.slot;
      counters.bytes_ssd_read += block_bytes;
      counters.tokens_loaded += r.tokens;
    }
    calibrate(owner.config_.costs.ssd_read_bytes_per_s, static_cast<int64_t>(done.size()) * block_bytes, elapsed);
    std::unordered_set<int32_t> lost(unlocated.begin(), unlocated.end());
    for (const auto& name : bad_segments) {
      for (const Read& r : by_segment[name]) {
        rec(r.record).in_flight = false;
        fast.release(r.slot);
      }
      quarantine_locked(name, lost);
    }
    for (const auto& name : unread) {
      if (bad.count(name)) continue;
      for (const Read& r : by_segment[name]) {
        rec(r.record).in_flight = false;
        fast.release(r.slot);
      }
    }
    s.busy = false;
    give_up_lost(lost);
    changed.notify_all();
    return unread.empty();
  }

  // A segment failed verification or could not be read: never read it again; blocks whose only
  // copy was there are lost (their sessions recompute).
  void quarantine_locked(const std::string& name, std::unordered_set<int32_t>& lost) {
    for (size_t h = 0; h < blocks.size(); ++h) {
      BlockRecord& b = blocks[h];
      if (b.refs == 0 || b.durable_hash == 0) continue;
      auto where = store->locate_block(b.durable_hash);
      if (!where || where->segment != name) continue;
      b.durable_hash = 0;
      if (b.fast == kNoSlot && b.dram == kNoSlot) lost.insert(static_cast<int32_t>(h));
    }
    try {
      store->quarantine_segment(name);
    } catch (const std::exception&) {
      // The store is unusable; the blocks are already treated as lost in memory.
    }
    segments.erase(name);
    ++counters.segments_quarantined;
  }

  void give_up_lost(const std::unordered_set<int32_t>& lost) {
    if (lost.empty()) return;
    for (auto& [id, s] : sessions) {
      for (size_t i = 0; i < s.blocks.size(); ++i) {
        if (lost.count(s.blocks[i])) {
          drop_kv_from(s, i);
          break;
        }
      }
    }
  }

  // Before the engine writes into block kv/B of s: a shared block is copied first.
  bool copy_on_write_locked(SessionRecordMem& s) {
    if (s.kv_tokens % block_tokens == 0) return true;
    const auto index = static_cast<size_t>(s.kv_tokens / block_tokens);
    const int32_t h = s.blocks[index];
    if (rec(h).refs == 1) {
      if (rec(h).indexed) {
        prefix_index.erase(rec(h).hash);
        rec(h).indexed = false;
      }
      return true;
    }
    std::optional<int32_t> slot = allocate_fast();
    if (!slot) return false;
    const int32_t fresh = new_record();
    rec(fresh).fast = *slot;
    const int32_t src_slot = rec(h).fast;
    {
      std::lock_guard transfer_lock(transfer_mutex);
      transfers.fast_to_fast(std::span(&src_slot, 1), std::span(&*slot, 1)).wait();
    }
    replace(s, index, fresh);
    return true;
  }

  bool reserve_locked(SessionRecordMem& s, int32_t total_tokens) {
    const auto needed = static_cast<size_t>(blocks_for(total_tokens, block_tokens));
    const size_t before = s.blocks.size();
    while (s.blocks.size() < needed) {
      std::optional<int32_t> slot = allocate_fast();
      if (!slot) {
        detach_from(s, before);
        return false;
      }
      const int32_t h = new_record();
      rec(h).fast = *slot;
      attach(s, h);
    }
    return true;
  }

  // -- durability ----------------------------------------------------------------------------
  void commit_step(std::string_view step) {
    if (config.on_commit_step) config.on_commit_step(step);
    if (step == "write") failpoint("checkpoint.after_write");
    if (step == "fsync") failpoint("checkpoint.after_fsync");
    if (step == "rename") failpoint("checkpoint.after_rename");
    if (step == "fsync_dir") failpoint("checkpoint.after_fsync_dir");
    if (step == "commit") failpoint("checkpoint.after_commit");
  }

  SessionRecord durable_record(const SessionRecordMem& s) const {
    SessionRecord r;
    r.id = s.id;
    r.name = s.name;
    r.model_fingerprint = config.model_fingerprint;
    r.generation = s.generation;
    r.pinned = s.pinned;
    r.tokens = s.tokens;
    return r;
  }

  // Writes the blocks of s's KV not yet on SSD to a new segment and commits the checkpoint.
  // Releases the lock while writing. Throws (IoError, StoreError, SessionError) on failure, with
  // nothing committed; the memory copy stays authoritative.
  void checkpoint_locked(std::unique_lock<std::mutex>& lock, SessionId id, Operation& op) {
    if (!store) throw SessionError("checkpoints need an SSD tier: configure a state directory");
    wait_not_busy(lock, id);
    SessionRecordMem& s = session(id);
    const uint64_t snapshot_version = s.history_version;
    const int32_t kv = s.kv_tokens;
    const std::vector<uint64_t> hashes = kv_hashes(s, kv);

    struct Pending {
      int32_t record;
      uint64_t version;
      uint64_t hash;
      int32_t tokens;
    };
    std::vector<Pending> pending;
    const std::vector<std::optional<BlockLocation>> stored = store->locate_blocks(hashes);
    for (size_t i = 0; i < hashes.size(); ++i) {
      BlockRecord& b = rec(s.blocks[i]);
      if (b.durable_hash == hashes[i]) continue;
      if (stored[i]) {  // another session wrote the same content
        b.durable_hash = hashes[i];
        continue;
      }
      if (b.fast == kNoSlot && b.dram == kNoSlot) {
        // Only an older content of this block is on SSD (a truncation into it): recompute.
        drop_kv_from(s, i);
        break;
      }
      const int32_t tokens_in_block = std::min(block_tokens, kv - static_cast<int32_t>(i) * block_tokens);
      pending.push_back({s.blocks[i], b.version, hashes[i], tokens_in_block});
    }
    const int32_t committed_kv = s.kv_tokens;
    std::vector<uint64_t> committed_hashes(hashes.begin(),
                                           hashes.begin() + static_cast<std::ptrdiff_t>(blocks_for(committed_kv, block_tokens)));
    SessionRecord record = durable_record(s);
    record.generation = s.generation + 1;
    record.kv_tokens = committed_kv;
    record.block_hashes = committed_hashes;

    // Snapshot the bytes: the session may go on generating while the file is written.
    AlignedBuffer bytes(std::max<int64_t>(1, static_cast<int64_t>(pending.size())) * block_bytes);
    std::vector<int32_t> device_slots;
    std::vector<void*> device_dst;
    for (size_t k = 0; k < pending.size(); ++k) {
      const BlockRecord& b = rec(pending[k].record);
      char* dst = static_cast<char*>(bytes.data()) + static_cast<int64_t>(k) * block_bytes;
      if (b.fast != kNoSlot && fast.placement() == Placement::device) {
        device_slots.push_back(b.fast);
        device_dst.push_back(dst);
      } else if (b.fast != kNoSlot) {
        std::memcpy(dst, static_cast<const char*>(fast.view().blocks) + b.fast * block_bytes, static_cast<size_t>(block_bytes));
      } else {
        std::memcpy(dst, static_cast<const char*>(dram.view().blocks) + b.dram * block_bytes, static_cast<size_t>(block_bytes));
      }
    }
    if (!device_slots.empty()) {
      std::lock_guard transfer_lock(transfer_mutex);
      transfers.fast_to_host(device_slots, device_dst).wait();
    }

    std::vector<SegmentRecord> new_segments;
    std::vector<BlockLocation> new_blocks;
    const int64_t total = static_cast<int64_t>(pending.size()) * block_bytes;
    if (!pending.empty()) enforce_quota_locked(id, estimated_segment_bytes(static_cast<int64_t>(pending.size())));
    op.start(total);
    lock.unlock();
    std::string name;
    try {
      if (!pending.empty()) {
        const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
        name = "s" + std::to_string(id) + "-g" + std::to_string(record.generation) + "-" + std::to_string(stamp) + ".seg";
        std::vector<SegmentBlockSource> sources;
        for (size_t k = 0; k < pending.size(); ++k) {
          sources.push_back({pending[k].hash, pending[k].tokens,
                             static_cast<const char*>(bytes.data()) + static_cast<int64_t>(k) * block_bytes});
        }
        const SegmentInfo info = write_segment(
            kv_dir / name, SegmentHeader{config.model_fingerprint, id, record.generation, config.layout}, sources,
            config.faults, [&](int64_t done, int64_t) { op.progress(done); },
            [&](const char* step) { commit_step(step); });
        new_segments.push_back({name, info.file_bytes, info.footer_hash, config.model_fingerprint, false});
        for (size_t k = 0; k < info.entries.size(); ++k) {
          new_blocks.push_back({info.entries[k].content_hash, name, static_cast<int32_t>(k), info.entries[k].tokens,
                                info.entries[k].checksum});
        }
      }
    } catch (const IoError& e) {
      lock.lock();
      if (e.error_code() != ENOSPC && e.error_code() != EDQUOT) throw;
      throw IoError(disk_full_message(id, total, e.what()), e.error_code());
    } catch (...) {
      lock.lock();
      throw;
    }
    lock.lock();
    if (!sessions.count(id)) {  // dropped meanwhile: the file is unreferenced
      if (!name.empty()) remove_file(kv_dir / name);
      throw SessionError("session " + std::to_string(id) + " was deleted during its checkpoint");
    }
    // The history may have changed while the lock was released (an append saved it): the commit
    // writes the current one, never the snapshot, or a crash after it would find an older,
    // shorter history than one already saved. The KV it commits describes the snapshot's first
    // committed_kv tokens, so it is kept only while the current history still starts with them.
    SessionRecordMem& after = session(id);
    if (after.history_version != snapshot_version) {
      const bool prefix_kept =
          after.tokens.size() >= static_cast<size_t>(committed_kv) &&
          std::equal(record.tokens.begin(), record.tokens.begin() + committed_kv, after.tokens.begin());
      record.tokens = after.tokens;
      if (!prefix_kept) {
        record.kv_tokens = 0;
        record.block_hashes.clear();
      }
    }
    try {
      store->commit_checkpoint(record, new_segments, new_blocks);
    } catch (...) {
      if (!name.empty()) {
        try {
          remove_file(kv_dir / name);
        } catch (const std::exception&) {
          // Left for the cleanup at the next start.
        }
      }
      throw;
    }
    commit_step("commit");
    for (const Pending& p : pending) {
      BlockRecord& b = rec(p.record);
      if (b.refs > 0 && b.version == p.version) b.durable_hash = p.hash;
    }
    for (const auto& seg : new_segments) segments[seg.name] = seg;
    after.generation = record.generation;
    after.stored_kv_tokens = record.kv_tokens;
    if (after.history_version == snapshot_version) after.checkpointed_version = snapshot_version;
    counters.bytes_ssd_written += total;
    gc_segments_locked();
  }

  // A full disk (or quota) says what the checkpoint needed and what was free, so that whoever
  // reads it knows how much to free; the session's KV stays in memory meanwhile.
  std::string disk_full_message(SessionId id, int64_t payload_bytes, const std::string& cause) const {
    const auto mib = [](int64_t bytes) {
      char text[32];
      std::snprintf(text, sizeof text, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
      return std::string(text);
    };
    const int64_t needed = estimated_segment_bytes(payload_bytes / std::max<int64_t>(1, block_bytes));
    std::string free_text = "unknown";
    struct statvfs fs_stats {};
    if (::statvfs(kv_dir.c_str(), &fs_stats) == 0)
      free_text = mib(static_cast<int64_t>(fs_stats.f_bavail) * static_cast<int64_t>(fs_stats.f_frsize));
    return "no space on the SSD tier for the checkpoint of session " + std::to_string(id) + ": it needs " +
           mib(needed) + " in " + kv_dir.string() + ", where " + free_text +
           " is free; the session stays in memory: free space, then checkpoint again (" + cause + ")";
  }

  // A segment's size on disk: header and table, 4 KiB-aligned block strides, a footer page.
  int64_t estimated_segment_bytes(int64_t n_blocks) const {
    const auto round_up = [](int64_t x) { return (x + kDirectIoAlignment - 1) / kDirectIoAlignment * kDirectIoAlignment; };
    return round_up(256 + 24 * n_blocks) + n_blocks * round_up(block_bytes) + kDirectIoAlignment;
  }

  // Makes room under the SSD quota for `incoming` bytes: hibernated sessions (not `protect`,
  // not pinned, nothing resident) lose their stored KV, least valuable first.
  void enforce_quota_locked(SessionId protect, int64_t incoming) {
    if (config.ssd_quota_bytes <= 0) return;
    std::set<SessionId> tried;
    auto used = [&] {
      int64_t sum = 0;
      for (const auto& [n, seg] : segments) sum += seg.file_bytes;
      return sum;
    };
    while (used() + incoming > config.ssd_quota_bytes) {
      SessionRecordMem* victim = nullptr;
      for (auto& [id, s] : sessions) {
        if (id == protect || s.pinned || s.busy || s.leases > 0 || tried.count(id)) continue;
        bool hot = false, stored = false;
        for (int32_t h : s.blocks) {
          hot = hot || rec(h).fast != kNoSlot;
          stored = stored || durable(rec(h));
        }
        if (!hot && stored && (victim == nullptr || eviction_score(s) < eviction_score(*victim))) victim = &s;
      }
      if (victim == nullptr) {
        throw SessionError("the SSD quota (" + std::to_string(config.ssd_quota_bytes) +
                           " bytes) is full of pinned or active sessions");
      }
      tried.insert(victim->id);
      for (size_t i = 0; i < victim->blocks.size(); ++i) {
        BlockRecord& b = rec(victim->blocks[i]);
        if (b.fast == kNoSlot && b.dram == kNoSlot) {
          drop_kv_from(*victim, i);
          break;
        }
      }
      for (int32_t h : victim->blocks) rec(h).durable_hash = 0;
      store->invalidate_kv(victim->id);
      victim->stored_kv_tokens = 0;
      gc_segments_locked();
    }
  }

  // Deletes segment files no session references, in the store or in memory.
  void gc_segments_locked() {
    if (!store) return;
    std::vector<std::string> candidates = store->unreferenced_segments();
    if (candidates.empty()) return;
    std::vector<uint64_t> held;
    for (const BlockRecord& b : blocks) {
      if (b.refs > 0 && b.durable_hash != 0) held.push_back(b.durable_hash);
    }
    std::unordered_set<std::string> in_memory;
    for (const auto& where : store->locate_blocks(held)) {
      if (where) in_memory.insert(where->segment);
    }
    std::vector<std::string> doomed;
    for (auto& name : candidates) {
      if (!in_memory.count(name)) doomed.push_back(name);
    }
    if (doomed.empty()) return;
    store->forget_segments(doomed);  // the row goes first: a file without a row is cleaned at start
    for (const auto& name : doomed) {
      segments.erase(name);
      try {
        failpoint("cleanup.remove_segment");
        remove_file(kv_dir / name, config.faults);
      } catch (const std::exception&) {
        // Removed at the next start.
      }
    }
  }

  // Start-up: temp files and files without a row go; rows without a file are quarantined;
  // sessions come back with their checkpointed blocks known on SSD (nothing resident).
  void open_store() {
    // A directory made here must reach the disk itself: its entry in its parent is what a
    // power cut could otherwise lose, with everything under it.
    const auto make_durable_directory = [&](const fs::path& dir) {
      std::vector<fs::path> made;  // the levels that do not exist yet, deepest first
      for (fs::path p = fs::absolute(dir); p.has_relative_path() && !fs::exists(p); p = p.parent_path()) made.push_back(p);
      fs::create_directories(dir);
      for (const fs::path& p : made) sync_directory(p.parent_path(), config.faults);
    };
    make_durable_directory(config.state_dir);
    kv_dir = config.state_dir / "kv";
    make_durable_directory(kv_dir);
    store = std::make_unique<MetadataStore>(config.state_dir / "memory.sqlite");
    for (const SegmentRecord& seg : store->segments()) {
      if (!seg.quarantined) segments[seg.name] = seg;
    }
    for (const auto& entry : fs::directory_iterator(kv_dir)) {
      const std::string name = entry.path().filename().string();
      if (!segments.count(name)) remove_file(entry.path());
    }
    std::unordered_set<int32_t> lost;
    for (auto it = segments.begin(); it != segments.end();) {
      if (fs::exists(kv_dir / it->first)) {
        ++it;
        continue;
      }
      const std::string name = it->first;
      ++it;
      store->quarantine_segment(name);
      segments.erase(name);
      ++counters.segments_quarantined;
    }

    std::unordered_map<uint64_t, int32_t> loaded;  // durable hash -> record (shared prefixes stay shared)
    for (SessionRecord& r : store->load_sessions()) {
      SessionRecordMem s;
      s.id = r.id;
      s.name = r.name;
      s.tokens = std::move(r.tokens);
      s.generation = r.generation;
      s.pinned = false;  // re-pinned below, once its blocks are attached
      s.computed_high = r.kv_tokens;
      next_id = std::max(next_id, r.id + 1);
      if (r.model_fingerprint != config.model_fingerprint) {
        store->invalidate_kv(r.id);  // a different model: tokens stay, KV is recomputed
      } else {
        const std::vector<uint64_t> expected = kv_hashes(s, r.kv_tokens);
        const std::vector<std::optional<BlockLocation>> located = store->locate_blocks(expected);
        size_t good = 0;
        while (good < r.block_hashes.size() && good < expected.size() && r.block_hashes[good] == expected[good] &&
               located[good]) {
          ++good;
        }
        for (size_t i = 0; i < good; ++i) {
          auto found = loaded.find(expected[i]);
          int32_t h;
          if (found != loaded.end()) {
            h = found->second;
            ++rec(h).refs;
          } else {
            h = new_record();
            rec(h).durable_hash = expected[i];
            const bool full = static_cast<int64_t>(i + 1) * block_tokens <= r.kv_tokens;
            if (full && !prefix_index.count(expected[i])) {
              rec(h).indexed = true;
              rec(h).hash = expected[i];
              prefix_index[expected[i]] = h;
            }
            loaded[expected[i]] = h;
          }
          s.blocks.push_back(h);
        }
        s.kv_tokens = std::min<int32_t>(r.kv_tokens, static_cast<int32_t>(good) * block_tokens);
        s.stored_kv_tokens = r.kv_tokens;
        if (good == expected.size()) s.checkpointed_version = s.history_version;
      }
      if (!s.name.empty()) names[s.name] = s.id;
      const bool pinned = r.pinned;
      auto& placed = sessions.emplace(s.id, std::move(s)).first->second;
      if (pinned) {
        placed.pinned = true;
        for (int32_t h : placed.blocks) ++rec(h).pins;
      }
    }
    gc_segments_locked();
  }

  // -- the worker ----------------------------------------------------------------------------
  std::shared_ptr<Operation> enqueue(std::string verb, std::function<void(Operation&)> work) {
    auto op = std::make_shared<Operation>(std::move(verb));
    {
      std::lock_guard lock(queue_mutex);
      queue.emplace_back([op, work = std::move(work)] {
        try {
          work(*op);
          if (op->state() != Operation::State::failed) op->finish();
        } catch (const std::exception& e) {
          op->fail(e.what());
        }
      });
    }
    queue_changed.notify_one();
    return op;
  }

  void run_worker() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock lock(queue_mutex);
        queue_changed.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;
        job = std::move(queue.front());
        queue.pop_front();
      }
      job();
    }
  }
};

}  // namespace den::memory
