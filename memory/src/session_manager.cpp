// The session memory manager's public API (session_manager.h): sessions, verbs, leases and
// asynchronous operations, over the state and logic in session_manager_impl.h.
#include "session_manager_impl.h"

namespace den::memory {

// ---- Operation --------------------------------------------------------------------------------

Operation::State Operation::state() const {
  std::lock_guard lock(mutex_);
  return state_;
}

void Operation::wait() const {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return state_ == State::done || state_ == State::failed; });
}

void Operation::wait_or_throw() const {
  wait();
  std::lock_guard lock(mutex_);
  if (state_ == State::failed) throw SessionError(verb_ + " failed: " + error_);
}

std::string Operation::error() const {
  std::lock_guard lock(mutex_);
  return error_;
}

void Operation::start(int64_t total_bytes) {
  total_bytes_.store(total_bytes);
  std::lock_guard lock(mutex_);
  state_ = State::running;
}

void Operation::finish() {
  {
    std::lock_guard lock(mutex_);
    done_bytes_.store(total_bytes_.load());
    state_ = State::done;
  }
  changed_.notify_all();
}

void Operation::fail(std::string message) {
  {
    std::lock_guard lock(mutex_);
    error_ = std::move(message);
    state_ = State::failed;
  }
  changed_.notify_all();
}


// ---- SessionManager -----------------------------------------------------------------------------

SessionManager::SessionManager(MemoryConfig config) : config_(std::move(config)) {
  if (config_.layout.block_tokens <= 0 || config_.layout.block_bytes() <= 0) {
    throw std::invalid_argument("session manager: the KV layout is empty");
  }
  if (config_.fast_blocks <= 0) throw std::invalid_argument("session manager: the fast pool needs at least one block");
  if (config_.dram_blocks < 0) throw std::invalid_argument("session manager: negative DRAM pool size");
  impl_ = std::make_unique<Impl>(*this, config_);
  if (!config_.state_dir.empty()) {
    impl_->open_store();
    impl_->prepare_wake_staging();
  }
  impl_->worker = std::thread([this] { impl_->run_worker(); });
}

SessionManager::~SessionManager() {
  {
    std::lock_guard lock(impl_->queue_mutex);
    impl_->stopping = true;
  }
  impl_->queue_changed.notify_all();
  if (impl_->worker.joinable()) impl_->worker.join();
}

SessionId SessionManager::create(std::string_view name) {
  std::lock_guard lock(impl_->mutex);
  const std::string key(name);
  if (!key.empty() && impl_->names.count(key)) throw SessionError("a session named '" + key + "' exists already");
  SessionRecordMem s;
  s.id = impl_->next_id;
  s.name = key;
  s.last_use = ++impl_->tick;
  if (impl_->store) impl_->store->create_session(impl_->durable_record(s));
  ++impl_->next_id;
  if (!key.empty()) impl_->names[key] = s.id;
  const SessionId id = s.id;
  impl_->sessions.emplace(id, std::move(s));
  return id;
}

std::optional<SessionId> SessionManager::find(std::string_view name) const {
  std::lock_guard lock(impl_->mutex);
  auto it = impl_->names.find(std::string(name));
  if (it == impl_->names.end()) return std::nullopt;
  return it->second;
}

void SessionManager::append(SessionId id, std::span<const int32_t> tokens) {
  std::lock_guard lock(impl_->mutex);
  auto& s = impl_->session(id);
  for (int32_t t : tokens) {
    if (t < 0) throw SessionError("token id " + std::to_string(t) + " is negative");
  }
  s.tokens.insert(s.tokens.end(), tokens.begin(), tokens.end());
  ++s.history_version;
}

void SessionManager::save_history(SessionId id) {
  std::lock_guard lock(impl_->mutex);
  auto& s = impl_->session(id);
  if (!impl_->store) throw SessionError("saving a history needs a state directory");
  if (static_cast<size_t>(s.stored_kv_tokens) > s.tokens.size()) {
    // Truncated below its checkpoint: the stored KV no longer matches the history.
    impl_->store->invalidate_kv(id);
    s.stored_kv_tokens = 0;
  }
  impl_->store->save_tokens(id, s.tokens);
}

void SessionManager::truncate(SessionId id, int32_t keep_tokens) {
  std::unique_lock lock(impl_->mutex);
  impl_->wait_not_busy(lock, id);
  auto& s = impl_->session(id);
  if (keep_tokens < 0 || static_cast<size_t>(keep_tokens) > s.tokens.size()) {
    throw SessionError("cannot keep " + std::to_string(keep_tokens) + " tokens of a history of " +
                       std::to_string(s.tokens.size()));
  }
  if (s.leases > 0) throw SessionError("session " + std::to_string(id) + " is in use by a running step");
  s.tokens.resize(static_cast<size_t>(keep_tokens));
  s.computed_high = std::min(s.computed_high, keep_tokens);  // what follows will be new tokens
  s.chain.resize(std::min(s.chain.size(), static_cast<size_t>(keep_tokens / impl_->block_tokens)));
  if (s.kv_tokens > keep_tokens) {
    s.kv_tokens = keep_tokens;
    impl_->detach_from(s, static_cast<size_t>(blocks_for(keep_tokens, impl_->block_tokens)));
  }
  ++s.history_version;
}

void SessionManager::drop_kv(SessionId id) {
  std::unique_lock lock(impl_->mutex);
  impl_->wait_not_busy(lock, id);
  auto& s = impl_->session(id);
  if (s.leases > 0) throw SessionError("session " + std::to_string(id) + " is in use by a running step");
  impl_->drop_kv_from(s, 0);  // computed_high stays: the history is the same, so its KV comes back as recompute
}

void SessionManager::truncate_front(SessionId id, int32_t drop_tokens) {
  std::unique_lock lock(impl_->mutex);
  impl_->wait_not_busy(lock, id);
  auto& s = impl_->session(id);
  if (drop_tokens < 0 || static_cast<size_t>(drop_tokens) > s.tokens.size()) {
    throw SessionError("cannot drop " + std::to_string(drop_tokens) + " tokens of a history of " +
                       std::to_string(s.tokens.size()));
  }
  if (s.leases > 0) throw SessionError("session " + std::to_string(id) + " is in use by a running step");
  if (drop_tokens == 0) return;
  // K is stored after RoPE: every kept token changes position, so its KV is recomputed.
  s.tokens.erase(s.tokens.begin(), s.tokens.begin() + drop_tokens);
  s.chain.clear();
  impl_->drop_kv_from(s, 0);
  s.computed_high = 0;  // the shifted tokens were never computed at their new positions
}

SessionId SessionManager::fork(SessionId id, std::string_view name) {
  std::unique_lock lock(impl_->mutex);
  impl_->wait_not_busy(lock, id);
  auto& src = impl_->session(id);
  if (src.leases > 0) throw SessionError("session " + std::to_string(id) + " is in use by a running step: fork it between steps");
  const std::string key(name);
  if (!key.empty() && impl_->names.count(key)) throw SessionError("a session named '" + key + "' exists already");
  SessionRecordMem s;
  s.id = impl_->next_id;
  s.name = key;
  s.tokens = src.tokens;
  s.chain = src.chain;
  s.kv_tokens = src.kv_tokens;
  s.computed_high = src.kv_tokens;
  s.last_use = ++impl_->tick;
  if (impl_->store) impl_->store->create_session(impl_->durable_record(s));
  ++impl_->next_id;
  const auto covering = static_cast<size_t>(blocks_for(src.kv_tokens, impl_->block_tokens));
  for (size_t i = 0; i < covering; ++i) {
    ++impl_->rec(src.blocks[i]).refs;
    impl_->attach(s, src.blocks[i]);
  }
  if (!key.empty()) impl_->names[key] = s.id;
  const SessionId new_id = s.id;
  impl_->sessions.emplace(new_id, std::move(s));
  return new_id;
}

void SessionManager::drop(SessionId id) {
  std::unique_lock lock(impl_->mutex);
  impl_->wait_not_busy(lock, id);
  auto& s = impl_->session(id);
  if (s.leases > 0) throw SessionError("session " + std::to_string(id) + " is in use by a running step");
  if (impl_->store) impl_->store->delete_session(id);
  if (s.pinned) {
    for (int32_t h : s.blocks) --impl_->rec(h).pins;
    s.pinned = false;
  }
  impl_->detach_from(s, 0);
  if (!s.name.empty()) impl_->names.erase(s.name);
  impl_->sessions.erase(id);
  impl_->gc_segments_locked();
}

std::vector<int32_t> SessionManager::tokens(SessionId id) const {
  std::lock_guard lock(impl_->mutex);
  return impl_->session(id).tokens;
}

namespace {
SessionInfo describe(SessionManager::Impl& impl, const SessionRecordMem& s) {
  SessionInfo info;
  info.id = s.id;
  info.name = s.name;
  info.tokens = static_cast<int32_t>(s.tokens.size());
  info.kv_tokens = s.kv_tokens;
  info.pinned = s.pinned;
  info.busy = s.busy;
  info.generation = s.generation;
  info.checkpoint_current = s.checkpointed_version == s.history_version;
  bool all_fast = true, all_dram = true, all_stored = true;
  const auto covering = static_cast<size_t>(blocks_for(s.kv_tokens, impl.block_tokens));
  for (size_t i = 0; i < covering; ++i) {
    const auto& b = impl.rec(s.blocks[i]);
    info.fast_blocks += b.fast != kNoSlot;
    info.dram_blocks += b.dram != kNoSlot;
    info.ssd_blocks += b.durable_hash != 0;
    all_fast = all_fast && b.fast != kNoSlot;
    all_dram = all_dram && (b.fast != kNoSlot || b.dram != kNoSlot);
    all_stored = all_stored && (b.fast != kNoSlot || b.dram != kNoSlot || b.durable_hash != 0);
  }
  info.tier = s.kv_tokens == 0 ? Tier::none
              : all_fast       ? Tier::fast
              : all_dram       ? Tier::dram
              : all_stored     ? Tier::ssd
                               : Tier::none;
  return info;
}
}  // namespace

SessionInfo SessionManager::info(SessionId id) const {
  std::lock_guard lock(impl_->mutex);
  return describe(*impl_, impl_->session(id));
}

std::vector<SessionInfo> SessionManager::list() const {
  std::lock_guard lock(impl_->mutex);
  std::vector<SessionInfo> out;
  for (const auto& [id, s] : impl_->sessions) out.push_back(describe(*impl_, s));
  return out;
}


MemoryStats SessionManager::stats() const {
  std::lock_guard lock(impl_->mutex);
  MemoryStats st = impl_->counters;
  st.sessions = static_cast<int64_t>(impl_->sessions.size());
  st.fast_capacity = impl_->fast.capacity();
  st.fast_used = impl_->fast.capacity() - impl_->fast.free_blocks();
  st.dram_capacity = impl_->dram_capacity;
  st.dram_used = impl_->dram_capacity == 0 ? 0 : impl_->dram.capacity() - impl_->dram.free_blocks();
  for (const auto& [name, seg] : impl_->segments) st.ssd_bytes += seg.file_bytes;
  return st;
}

void SessionManager::pin(SessionId id) {
  std::unique_lock lock(impl_->mutex);
  impl_->wait_not_busy(lock, id);
  auto& s = impl_->session(id);
  if (s.pinned) return;
  impl_->set_leased(s, +1);
  const bool resident = impl_->make_resident_locked(lock, impl_->session(id));
  auto& after = impl_->session(id);
  if (resident) {
    after.pinned = true;
    for (int32_t h : after.blocks) ++impl_->rec(h).pins;
  }
  impl_->set_leased(after, -1);
  impl_->changed.notify_all();
  if (!resident) throw SessionError("cannot pin session " + std::to_string(id) + ": the fast pool is full of pinned or running sessions");
  if (impl_->store) impl_->store->set_pinned(id, true);
}

void SessionManager::unpin(SessionId id) {
  std::lock_guard lock(impl_->mutex);
  auto& s = impl_->session(id);
  if (!s.pinned) return;
  for (int32_t h : s.blocks) --impl_->rec(h).pins;
  s.pinned = false;
  if (impl_->store) impl_->store->set_pinned(id, false);
}

std::shared_ptr<Operation> SessionManager::checkpoint(SessionId id) {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->session(id);  // unknown ids fail now, not later
  }
  return impl_->enqueue("checkpoint", [this, id](Operation& op) {
    std::unique_lock lock(impl_->mutex);
    impl_->checkpoint_locked(lock, id, op);
  });
}

std::shared_ptr<Operation> SessionManager::hibernate(SessionId id, Tier to) {
  if (to != Tier::dram && to != Tier::ssd) throw SessionError("hibernate goes to dram or ssd");
  {
    std::lock_guard lock(impl_->mutex);
    auto& s = impl_->session(id);
    if (s.pinned) throw SessionError("session " + std::to_string(id) + " is pinned: unpin it before hibernating it");
    if (to == Tier::dram && impl_->dram_capacity == 0) throw SessionError("there is no DRAM tier (kv.dram is 0)");
    if (to == Tier::ssd && !impl_->store) throw SessionError("there is no SSD tier: configure a state directory");
  }
  return impl_->enqueue("hibernate", [this, id, to](Operation& op) {
    auto& impl = *impl_;
    std::unique_lock lock(impl.mutex);
    impl.wait_not_busy(lock, id);
    if (impl.session(id).leases > 0) throw SessionError("session " + std::to_string(id) + " is in use by a running step");
    if (to == Tier::ssd) {
      impl.checkpoint_locked(lock, id, op);
      auto& s = impl.session(id);
      for (int32_t h : s.blocks) {
        BlockRecord& b = impl.rec(h);
        if (b.durable_hash == 0 || b.leases > 0 || b.pins > 0) continue;
        if (b.fast != kNoSlot) impl.fast.release(b.fast);
        if (b.dram != kNoSlot) impl.dram.release(b.dram);
        b.fast = b.dram = kNoSlot;
      }
      return;
    }
    auto& s = impl.session(id);
    std::vector<int32_t> moving, from, to_slots;
    for (int32_t h : s.blocks) {
      const BlockRecord& b = impl.rec(h);
      if (b.fast != kNoSlot && b.dram == kNoSlot && b.leases == 0 && b.pins == 0) moving.push_back(h);
    }
    if (impl.dram.free_blocks() < static_cast<int64_t>(moving.size()) &&
        !impl.evict_dram(static_cast<int64_t>(moving.size()), id)) {
      throw SessionError("the DRAM tier has no room for " + std::to_string(moving.size()) + " blocks");
    }
    op.start(static_cast<int64_t>(moving.size()) * impl.block_bytes);
    for (int32_t h : moving) {
      from.push_back(impl.rec(h).fast);
      to_slots.push_back(*impl.dram.allocate());
    }
    if (!moving.empty()) {
      std::lock_guard transfer_lock(impl.transfer_mutex);
      impl.transfers.fast_to_dram(from, to_slots).wait();
    }
    impl.counters.bytes_fast_to_dram += static_cast<int64_t>(moving.size()) * impl.block_bytes;
    for (size_t k = 0; k < moving.size(); ++k) impl.rec(moving[k]).dram = to_slots[k];
    for (int32_t h : impl.session(id).blocks) {
      BlockRecord& b = impl.rec(h);
      if (b.fast != kNoSlot && b.dram != kNoSlot && b.leases == 0 && b.pins == 0) {
        impl.fast.release(b.fast);
        b.fast = kNoSlot;
      }
    }
  });
}

std::shared_ptr<Operation> SessionManager::wake(SessionId id) {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->session(id);
  }
  return impl_->enqueue("wake", [this, id](Operation& op) {
    auto& impl = *impl_;
    std::unique_lock lock(impl.mutex);
    impl.wait_not_busy(lock, id);
    auto& s = impl.session(id);
    op.start(static_cast<int64_t>(s.blocks.size()) * impl.block_bytes);
    s.last_use = ++impl.tick;
    impl.set_leased(s, +1);
    const bool ok = impl.make_resident_locked(lock, impl.session(id));
    impl.set_leased(impl.session(id), -1);
    impl.changed.notify_all();
    if (!ok) throw SessionError("cannot wake session " + std::to_string(id) + ": the fast pool is full of pinned or running sessions");
  });
}

std::shared_ptr<Operation> SessionManager::prefetch(SessionId id) {
  // A wake that only uses free slots and evicts nothing pinned or leased: the eviction rules
  // already spare those, so a prefetch is a wake that may fail quietly.
  return wake(id);
}

std::optional<Lease> SessionManager::lease(SessionId id, int32_t total_tokens, bool layerwise) {
  auto& impl = *impl_;
  // Declared before the lock: if anything below throws, the lock goes first and the lease's
  // release (which takes it) then undoes what was done.
  Lease lease(nullptr, id);
  std::unique_lock lock(impl.mutex);
  impl.wait_not_busy(lock, id);
  auto& s = impl.session(id);
  if (total_tokens < 0 || static_cast<size_t>(total_tokens) < s.tokens.size()) {
    throw SessionError("a lease must cover the whole history (" + std::to_string(s.tokens.size()) + " tokens), asked for " +
                       std::to_string(total_tokens));
  }
  s.last_use = ++impl.tick;
  impl.set_leased(s, +1);
  lease.manager_ = this;  // from here on the lease owns the count
  const bool ready = impl.make_resident_locked(lock, impl.session(id), layerwise ? &lease.arriving_ : nullptr,
                                               layerwise ? &lease.arriving_records_ : nullptr) &&
                     impl.copy_on_write_locked(impl.session(id)) && impl.reserve_locked(impl.session(id), total_tokens);
  if (!ready) {
    lock.unlock();
    lease.release();  // settles what was arriving and gives the blocks back
    return std::nullopt;
  }
  auto& after = impl.session(id);
  lease.kv_tokens_ = after.kv_tokens;
  for (int32_t h : after.blocks) lease.table_.push_back(impl.rec(h).fast);
  return lease;
}

RestorePlan SessionManager::restore_plan(SessionId id) const {
  std::lock_guard lock(impl_->mutex);
  auto& s = impl_->session(id);
  const SessionInfo info = describe(*impl_, s);
  int32_t tokens = 0;
  const auto covering = static_cast<size_t>(blocks_for(s.kv_tokens, impl_->block_tokens));
  for (size_t i = 0; i < covering; ++i) {
    if (impl_->rec(s.blocks[i]).fast == kNoSlot) {
      tokens = s.kv_tokens - static_cast<int32_t>(i) * impl_->block_tokens;
      break;
    }
  }
  return plan_restore(config_.costs, info.tier, tokens, kv_bytes_per_token());
}

void SessionManager::set_prefill_rate(double tokens_per_s) {
  std::lock_guard lock(impl_->mutex);
  if (tokens_per_s > 0) config_.costs.prefill_tokens_per_s = tokens_per_s;
}

LinkBandwidths SessionManager::measure_links(int64_t bytes) {
  std::lock_guard transfer_lock(impl_->transfer_mutex);
  return impl_->transfers.measure(bytes);
}

void SessionManager::set_link_bandwidths(double dram_to_fast_bytes_per_s, double ssd_read_bytes_per_s) {
  std::lock_guard lock(impl_->mutex);
  if (dram_to_fast_bytes_per_s > 0) config_.costs.dram_to_fast_bytes_per_s = dram_to_fast_bytes_per_s;
  if (ssd_read_bytes_per_s > 0) config_.costs.ssd_read_bytes_per_s = ssd_read_bytes_per_s;
}

kernels::PagedKvView SessionManager::fast_view() const { return impl_->fast.view(); }

int64_t SessionManager::kv_bytes_per_token() const { return config_.layout.block_bytes() / config_.layout.block_tokens; }

// ---- Lease --------------------------------------------------------------------------------------

Lease::Lease(Lease&& other) noexcept
    : manager_(std::exchange(other.manager_, nullptr)),
      session_(other.session_),
      table_(std::move(other.table_)),
      kv_tokens_(other.kv_tokens_),
      arriving_(std::move(other.arriving_)),
      arriving_records_(std::exchange(other.arriving_records_, {})) {}

Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    manager_ = std::exchange(other.manager_, nullptr);
    session_ = other.session_;
    table_ = std::move(other.table_);
    kv_tokens_ = other.kv_tokens_;
    arriving_ = std::move(other.arriving_);
    arriving_records_ = std::exchange(other.arriving_records_, {});
  }
  return *this;
}

void Lease::settle() {
  if (arriving_records_.empty()) return;
  std::exception_ptr fault;
  try {
    arriving_.wait();
  } catch (...) {
    fault = std::current_exception();  // a CUDA fault: the blocks are not trustworthy, but unblock readers
  }
  auto& impl = *manager_->impl_;
  {
    std::lock_guard lock(impl.mutex);
    for (int32_t h : arriving_records_) impl.rec(h).in_flight = impl.rec(h).arriving = false;
    arriving_records_.clear();
  }
  impl.changed.notify_all();
  if (fault) std::rethrow_exception(fault);
}

Lease::~Lease() { release(); }

void Lease::release() noexcept {
  if (manager_ == nullptr) return;
  try {
    settle();
  } catch (...) {
    // A sticky CUDA fault; the process is going down and the next call will say so.
  }
  auto& impl = *manager_->impl_;
  std::lock_guard lock(impl.mutex);
  auto it = impl.sessions.find(session_);
  if (it != impl.sessions.end()) {
    auto& s = it->second;
    impl.set_leased(s, -1);
    const auto covering = static_cast<size_t>(blocks_for(s.kv_tokens, impl.block_tokens));
    if (s.leases == 0 && s.blocks.size() > covering) impl.detach_from(s, covering);
    s.last_use = ++impl.tick;
  }
  manager_ = nullptr;
  impl.changed.notify_all();
}

bool Lease::reserve(int32_t total_tokens) {
  auto& impl = *manager_->impl_;
  std::lock_guard lock(impl.mutex);
  auto& s = impl.session(session_);
  if (!impl.reserve_locked(s, total_tokens)) return false;
  table_.clear();
  for (int32_t h : s.blocks) table_.push_back(impl.rec(h).fast);
  return true;
}

void Lease::computed(int32_t total_tokens) {
  settle();  // the written blocks' DRAM copies are released below; nothing may still read them
  auto& impl = *manager_->impl_;
  std::lock_guard lock(impl.mutex);
  auto& s = impl.session(session_);
  if (total_tokens < s.kv_tokens || static_cast<size_t>(total_tokens) > s.tokens.size() ||
      blocks_for(total_tokens, impl.block_tokens) > static_cast<int64_t>(s.blocks.size())) {
    throw SessionError("computed(" + std::to_string(total_tokens) + "): the KV holds " + std::to_string(s.kv_tokens) +
                       " tokens, the history " + std::to_string(s.tokens.size()) + ", the lease " +
                       std::to_string(s.blocks.size()) + " blocks");
  }
  if (total_tokens == s.kv_tokens) return;
  const int32_t B = impl.block_tokens;
  // The blocks written: their DRAM and SSD copies are stale now.
  for (auto i = static_cast<size_t>(s.kv_tokens / B); i < static_cast<size_t>(blocks_for(total_tokens, B)); ++i) {
    BlockRecord& b = impl.rec(s.blocks[i]);
    ++b.version;
    b.durable_hash = 0;
    if (b.dram != kNoSlot) {
      impl.dram.release(b.dram);
      b.dram = kNoSlot;
    }
  }
  const int32_t recomputed = std::max(0, std::min(total_tokens, s.computed_high) - s.kv_tokens);
  impl.counters.tokens_recomputed += recomputed;
  impl.counters.tokens_computed += total_tokens - s.kv_tokens - recomputed;
  // Blocks that became full join the prefix index (unless an equal block is there already).
  impl.ensure_chain(s, static_cast<size_t>(total_tokens / B));
  for (auto i = static_cast<size_t>(s.kv_tokens / B); i < static_cast<size_t>(total_tokens / B); ++i) {
    const int32_t h = s.blocks[i];
    BlockRecord& b = impl.rec(h);
    if (b.indexed || impl.prefix_index.count(s.chain[i])) continue;
    b.indexed = true;
    b.hash = s.chain[i];
    impl.prefix_index[b.hash] = h;
  }
  s.kv_tokens = total_tokens;
  s.computed_high = std::max(s.computed_high, total_tokens);
  kv_tokens_ = total_tokens;
  ++s.history_version;
}

}  // namespace den::memory
