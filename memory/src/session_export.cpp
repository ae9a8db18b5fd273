// Export and import of a session as one verified file (session_manager.h).
#include <fstream>
#include <iterator>

#include "session_manager_impl.h"

namespace den::memory {

// ---- export / import ----------------------------------------------------------------------------
//
// An export file (little endian): "DENSESS1", version, model fingerprint, KV layout, token and
// KV-token counts, block count and size, name length; the name; the tokens; an XXH3-64 per
// block; XXH3-64 of all of that (the metadata); the blocks; "DENSEND1".

namespace {

constexpr char kExportMagic[9] = "DENSESS1";
constexpr char kExportEnd[9] = "DENSEND1";
constexpr uint32_t kExportVersion = 1;

template <typename T>
void put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof value);
}

class ExportReader {
 public:
  ExportReader(const std::string& bytes, std::string file) : bytes_(bytes), file_(std::move(file)) {}
  template <typename T>
  T get() {
    T value;
    need(sizeof value);
    std::memcpy(&value, bytes_.data() + at_, sizeof value);
    at_ += sizeof value;
    return value;
  }
  const char* take(size_t n) {
    need(n);
    const char* p = bytes_.data() + at_;
    at_ += n;
    return p;
  }
  size_t at() const { return at_; }
  [[noreturn]] void fail(const std::string& what) const {
    throw SessionError("cannot import '" + file_ + "': " + what);
  }

 private:
  void need(size_t n) const {
    if (bytes_.size() - at_ < n) fail("the file ends early (truncated?)");
  }
  const std::string& bytes_;
  std::string file_;
  size_t at_ = 0;
};

}  // namespace

std::shared_ptr<Operation> SessionManager::export_session(SessionId id, const std::filesystem::path& path) {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->session(id);
  }
  return impl_->enqueue("export", [this, id, path](Operation& op) {
    auto& impl = *impl_;
    std::unique_lock lock(impl.mutex);
    impl.wait_not_busy(lock, id);
    impl.set_leased(impl.session(id), +1);
    const bool resident = impl.make_resident_locked(lock, impl.session(id));
    auto& s = impl.session(id);
    const auto n_blocks = static_cast<size_t>(blocks_for(s.kv_tokens, impl.block_tokens));
    const auto block_bytes = static_cast<size_t>(impl.block_bytes);
    std::string payload;
    std::string meta;
    if (resident) {
      payload.resize(n_blocks * block_bytes);
      std::vector<int32_t> slots;
      std::vector<void*> hosts;
      for (size_t i = 0; i < n_blocks; ++i) {
        slots.push_back(impl.rec(s.blocks[i]).fast);
        hosts.push_back(payload.data() + i * block_bytes);
      }
      if (impl.fast.placement() == Placement::device) {
        std::lock_guard transfer_lock(impl.transfer_mutex);
        impl.transfers.fast_to_host(slots, hosts).wait();
      } else {
        for (size_t i = 0; i < n_blocks; ++i) {
          std::memcpy(hosts[i], static_cast<const char*>(impl.fast.view().blocks) + slots[i] * impl.block_bytes, block_bytes);
        }
      }
      meta.append(kExportMagic, 8);
      put(meta, kExportVersion);
      put(meta, config_.model_fingerprint);
      const kernels::KvLayout& l = config_.layout;
      for (int32_t v : {l.n_layers, l.n_kv_heads, l.head_dim, l.block_tokens, static_cast<int32_t>(l.dtype)}) put(meta, v);
      put(meta, static_cast<uint32_t>(s.tokens.size()));
      put(meta, static_cast<uint32_t>(s.kv_tokens));
      put(meta, static_cast<uint32_t>(n_blocks));
      put(meta, static_cast<uint64_t>(block_bytes));
      put(meta, static_cast<uint32_t>(s.name.size()));
      meta += s.name;
      meta.append(reinterpret_cast<const char*>(s.tokens.data()), s.tokens.size() * sizeof(int32_t));
    }
    impl.set_leased(s, -1);
    impl.changed.notify_all();
    lock.unlock();
    if (!resident) throw SessionError("cannot export session " + std::to_string(id) + ": the fast pool has no room to wake it");
    for (size_t i = 0; i < n_blocks; ++i) put(meta, block_checksum(payload.data() + i * block_bytes, impl.block_bytes));
    put(meta, static_cast<uint64_t>(XXH3_64bits(meta.data(), meta.size())));

    op.start(static_cast<int64_t>(meta.size() + payload.size() + 8));
    std::filesystem::path temp = path;
    temp += ".tmp";
    remove_file(temp);
    try {
      File file(temp, File::Mode::create_exclusive, false);
      file.write_at(meta.data(), static_cast<int64_t>(meta.size()), 0);
      file.write_at(payload.data(), static_cast<int64_t>(payload.size()), static_cast<int64_t>(meta.size()));
      file.write_at(kExportEnd, 8, static_cast<int64_t>(meta.size() + payload.size()));
      file.sync();
      rename_durably(temp, path);
    } catch (...) {
      try {
        remove_file(temp);
      } catch (const std::exception&) {
      }
      throw;
    }
  });
}

SessionId SessionManager::import_session(const std::filesystem::path& path, std::string_view name) {
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw SessionError("cannot import '" + path.string() + "': cannot open it");
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  ExportReader r(bytes, path.string());
  if (std::memcmp(r.take(8), kExportMagic, 8) != 0) r.fail("not a Den session export");
  if (const auto v = r.get<uint32_t>(); v != kExportVersion) r.fail("export version " + std::to_string(v) + " is not supported");
  const auto fingerprint = r.get<uint64_t>();
  kernels::KvLayout layout;
  layout.n_layers = r.get<int32_t>();
  layout.n_kv_heads = r.get<int32_t>();
  layout.head_dim = r.get<int32_t>();
  layout.block_tokens = r.get<int32_t>();
  layout.dtype = static_cast<kernels::DType>(r.get<int32_t>());
  const auto n_tokens = r.get<uint32_t>();
  const auto kv_tokens = r.get<uint32_t>();
  const auto n_blocks = r.get<uint32_t>();
  const auto block_bytes = r.get<uint64_t>();
  const auto name_bytes = r.get<uint32_t>();
  const std::string stored_name(r.take(name_bytes), name_bytes);
  if (n_tokens > bytes.size() / 4) r.fail("the token count is larger than the file");
  std::vector<int32_t> tokens(n_tokens);
  std::memcpy(tokens.data(), r.take(size_t{n_tokens} * 4), size_t{n_tokens} * 4);
  if (n_blocks > bytes.size() / 8) r.fail("the block count is larger than the file");
  std::vector<uint64_t> checksums(n_blocks);
  for (auto& c : checksums) c = r.get<uint64_t>();
  const size_t meta_end = r.at();
  if (r.get<uint64_t>() != XXH3_64bits(bytes.data(), meta_end)) r.fail("its metadata checksum does not match");
  if (kv_tokens > n_tokens) r.fail("it claims KV for more tokens than it holds");
  for (int32_t t : tokens) {
    if (t < 0) r.fail("it holds a negative token id");
  }
  const bool kv_usable = fingerprint == config_.model_fingerprint && layout == config_.layout &&
                         block_bytes == static_cast<uint64_t>(config_.layout.block_bytes()) &&
                         n_blocks == static_cast<uint64_t>(blocks_for(kv_tokens, config_.layout.block_tokens));
  if (block_bytes > 0 && n_blocks > (bytes.size() - r.at()) / block_bytes) r.fail("its KV blocks are cut short");
  const char* payload = r.take(size_t{n_blocks} * block_bytes);
  if (std::memcmp(r.take(8), kExportEnd, 8) != 0 || r.at() != bytes.size()) r.fail("its end marker is missing");
  for (uint32_t i = 0; i < n_blocks; ++i) {
    if (block_checksum(payload + i * block_bytes, static_cast<int64_t>(block_bytes)) != checksums[i]) {
      r.fail("KV block " + std::to_string(i) + " fails its checksum");
    }
  }

  const SessionId id = create(name);  // the exported name may be taken here: the caller names it
  append(id, tokens);
  auto& impl = *impl_;
  std::unique_lock lock(impl.mutex);
  if (kv_usable && n_blocks > 0) {
    // Slots first (invisible to eviction until the records exist), then the bytes, then records.
    std::vector<int32_t> slots;
    for (uint32_t i = 0; i < n_blocks; ++i) {
      std::optional<int32_t> slot = impl.allocate_fast();
      if (!slot) break;
      slots.push_back(*slot);
    }
    if (slots.size() == n_blocks) {
      if (impl.fast.placement() == Placement::device) {
        std::vector<const void*> hosts;
        for (uint32_t i = 0; i < n_blocks; ++i) hosts.push_back(payload + i * block_bytes);
        std::lock_guard transfer_lock(impl.transfer_mutex);
        impl.transfers.host_to_fast(hosts, slots).wait();
      } else {
        for (uint32_t i = 0; i < n_blocks; ++i) {
          std::memcpy(static_cast<char*>(impl.fast.view().blocks) + slots[i] * impl.block_bytes, payload + i * block_bytes,
                      block_bytes);
        }
      }
      auto& again = impl.session(id);
      for (int32_t slot : slots) {
        const int32_t h = impl.new_record();
        impl.rec(h).fast = slot;
        impl.attach(again, h);
      }
      again.kv_tokens = static_cast<int32_t>(kv_tokens);
      again.computed_high = again.kv_tokens;
      impl.ensure_chain(again, kv_tokens / static_cast<uint32_t>(impl.block_tokens));
      for (size_t i = 0; i < kv_tokens / static_cast<uint32_t>(impl.block_tokens); ++i) {
        if (impl.prefix_index.count(again.chain[i])) continue;
        auto& b = impl.rec(again.blocks[i]);
        b.indexed = true;
        b.hash = again.chain[i];
        impl.prefix_index[b.hash] = again.blocks[i];
      }
      ++again.history_version;
    } else {
      for (int32_t slot : slots) impl.fast.release(slot);  // no room now: the KV is recomputed later
    }
  }
  if (impl.store) impl.store->save_tokens(id, impl.session(id).tokens);
  return id;
}

}  // namespace den::memory
