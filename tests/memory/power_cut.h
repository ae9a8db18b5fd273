// A simulated power cut under the SSD tier. PowerCutSimulator is an IoFaultInjector that
// records, per file, its content as of its last fsync and the writes since, and per directory
// its entries as of its last directory fsync and the creates, renames and unlinks since; cut()
// then rewrites those directories the way a power loss could have left them. Used by
// power_cut_test.cpp.
//
// The model is POSIX's, not ext4's kinder one: fsync(file) makes its bytes durable but not its
// name; fsync(dir) makes every entry change made in it so far durable; anything else may be
// kept, lost, or (for data) garbled. Each unsynced entry change is kept or undone on its own
// coin (a journal would only ever keep a prefix of them, so this is harsher). Files the
// simulator never saw change are left alone; a directory first seen by a call is taken as
// durable as it stands then.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "den/memory/file_io.h"

namespace den::test {

// Thrown into a process that would already be dead: see PowerCutSimulator::check_power().
class PowerCut : public std::runtime_error {
 public:
  PowerCut() : std::runtime_error("the power is off") {}
};

// What cut() did to the disk.
struct CutReport {
  int64_t writes_kept = 0;     // unsynced writes that reached the disk whole
  int64_t writes_dropped = 0;  // unsynced writes lost: the old bytes (or a shorter file) came back
  int64_t writes_garbled = 0;  // unsynced writes that left random bytes, zeros, a torn prefix or torn pages
  int64_t entries_kept = 0;    // unsynced creates, renames and unlinks that survived
  int64_t entries_undone = 0;  // ... that were undone (a file missing, under its old name, or back)
  int64_t durable_files_damaged = 0;  // CutOptions::damage_durable_files at work
  // Files present after the cut whose bytes differ from what the process last wrote to them.
  std::vector<std::filesystem::path> torn_files;
};

struct CutOptions {
  // A disk that breaks its word: each file that survives the cut is damaged with this
  // probability even where fsync made it durable (a bit flipped, a page zeroed, truncated, or
  // gone). 0: an honest disk, where only what no fsync covered can be lost.
  double damage_durable_files = 0.0;
};

class PowerCutSimulator final : public memory::IoFaultInjector {
 public:
  // The kinds of change, for cut_point().
  enum class Change { none, create, write, fsync, rename, fsync_dir, unlink };

  // `frozen`: files kept outside the simulation because they are durable at every moment (the
  // SQLite store under synchronous=FULL). cut() gives them back exactly as they were when the
  // power went off, undoing whatever the dying process did to them afterwards.
  explicit PowerCutSimulator(std::vector<std::filesystem::path> frozen = {}) : frozen_(std::move(frozen)) {}

  // The power goes off right after the `n`th change from now (n >= 1).
  void cut_after_changes(int64_t n) {
    std::lock_guard lock(mutex_);
    cut_at_change_ = changes_ + n;
  }
  // The power goes off now (between operations).
  void power_off() {
    std::lock_guard lock(mutex_);
    power_off_locked(Change::none);
  }
  bool powered_off() const {
    std::lock_guard lock(mutex_);
    return off_;
  }
  // Throws PowerCut once the power is off. File calls already fail then, but a process whose
  // last call succeeded just before the cut would go on to commit: a test calls this between
  // the steps of its commit protocol (MemoryConfig::on_commit_step) so nothing the dead
  // process does is acknowledged.
  void check_power() const {
    if (powered_off()) throw PowerCut();
  }
  // The change right after which the power went off (none: between operations).
  Change cut_point() const {
    std::lock_guard lock(mutex_);
    return cut_point_;
  }
  // Calls the model could not follow (a write to a file it never saw created): a test bug.
  std::vector<std::string> surprises() const {
    std::lock_guard lock(mutex_);
    return surprises_;
  }

  // Rewrites the disk as the power loss could have left it: call once, after the process's work
  // has stopped (the session manager destroyed, so nothing holds the store open). Powers off
  // first if that has not happened.
  CutReport cut(std::mt19937& rng, const CutOptions& options = {}) {
    std::lock_guard lock(mutex_);
    power_off_locked(cut_point_);
    CutReport report;
    std::vector<std::optional<Bytes>> survived(inodes_.size());  // each inode's fate is drawn once
    for (const auto& [dir, d] : dirs_) {
      const std::map<std::string, int> entries = surviving_entries(d, rng, report);
      for (const std::string& name : d.known) {
        const std::filesystem::path path = dir / name;
        auto it = entries.find(name);
        std::error_code ec;
        if (it == entries.end()) {
          std::filesystem::remove(path, ec);
          continue;
        }
        std::optional<Bytes>& bytes = survived[static_cast<size_t>(it->second)];
        if (!bytes) bytes = surviving_bytes(inodes_[static_cast<size_t>(it->second)], rng, report);
        Bytes content = *bytes;
        if (options.damage_durable_files > 0 && chance(rng, options.damage_durable_files)) {
          ++report.durable_files_damaged;
          if (!damage(content, rng)) {
            std::filesystem::remove(path, ec);
            continue;
          }
        }
        if (content != live_bytes(inodes_[static_cast<size_t>(it->second)])) report.torn_files.push_back(path);
        write_whole(path, content);
      }
    }
    for (size_t i = 0; i < frozen_.size(); ++i) {
      std::error_code ec;
      if (frozen_at_cut_[i]) {
        write_whole(frozen_[i], *frozen_at_cut_[i]);
      } else {
        std::filesystem::remove(frozen_[i], ec);
      }
    }
    return report;
  }

  // ---- IoFaultInjector ----
  // Once the power is off every call fails: the process is dead, nothing it does reaches the disk.
  memory::IoFault before(memory::IoOp op, const std::filesystem::path& path) override {
    std::lock_guard lock(mutex_);
    if (off_) return {EIO, -1};
    see_directory(op == memory::IoOp::fsync_dir ? normal(path) : normal(path).parent_path());
    return {};
  }
  void after_create(const std::filesystem::path& file) override {
    std::lock_guard lock(mutex_);
    if (off_) return;
    Directory& d = directory_of(file);
    const std::string name = normal(file).filename().string();
    inodes_.emplace_back();
    const int inode = static_cast<int>(inodes_.size()) - 1;
    d.live[name] = inode;
    d.known.insert(name);
    d.unsynced.push_back({EntryChange::Kind::create, name, {}, inode});
    changed(Change::create);
  }
  void after_write(const std::filesystem::path& file, int64_t offset, const void* bytes, int64_t size) override {
    std::lock_guard lock(mutex_);
    if (off_) return;
    Inode* inode = live_inode(file);
    if (inode == nullptr) return;
    const auto* p = static_cast<const unsigned char*>(bytes);
    inode->unsynced.push_back({offset, Bytes(p, p + size)});
    changed(Change::write);
  }
  void after_fsync(const std::filesystem::path& file) override {
    std::lock_guard lock(mutex_);
    if (off_) return;
    Inode* inode = live_inode(file);
    if (inode == nullptr) return;
    inode->durable = live_bytes(*inode);
    inode->unsynced.clear();
    changed(Change::fsync);
  }
  void after_rename(const std::filesystem::path& from, const std::filesystem::path& to) override {
    std::lock_guard lock(mutex_);
    if (off_) return;
    if (normal(from).parent_path() != normal(to).parent_path()) {
      surprises_.push_back("rename across directories: '" + from.string() + "' to '" + to.string() + "'");
      return;
    }
    Directory& d = directory_of(from);
    const std::string old_name = normal(from).filename().string();
    const std::string new_name = normal(to).filename().string();
    auto it = d.live.find(old_name);
    if (it == d.live.end()) {
      surprises_.push_back("rename of a file never seen: '" + from.string() + "'");
      return;
    }
    const int inode = it->second;
    d.live.erase(it);
    d.live[new_name] = inode;
    d.known.insert(new_name);
    d.unsynced.push_back({EntryChange::Kind::rename, old_name, new_name, inode});
    changed(Change::rename);
  }
  void after_fsync_dir(const std::filesystem::path& dir) override {
    std::lock_guard lock(mutex_);
    if (off_) return;
    Directory& d = see_directory(normal(dir));
    d.durable = d.live;
    d.unsynced.clear();
    changed(Change::fsync_dir);
  }
  void after_unlink(const std::filesystem::path& path) override {
    std::lock_guard lock(mutex_);
    if (off_) return;
    Directory& d = directory_of(path);
    const std::string name = normal(path).filename().string();
    auto it = d.live.find(name);
    if (it == d.live.end()) {
      surprises_.push_back("unlink of a file never seen: '" + path.string() + "'");
      return;
    }
    d.unsynced.push_back({EntryChange::Kind::unlink, name, {}, it->second});
    d.live.erase(it);
    changed(Change::unlink);
  }

 private:
  using Bytes = std::vector<unsigned char>;
  struct Write {
    int64_t offset = 0;
    Bytes bytes;
  };
  struct Inode {
    Bytes durable;                // content as of the last fsync
    std::vector<Write> unsynced;  // writes since, in order
  };
  struct EntryChange {
    enum class Kind { create, rename, unlink } kind;
    std::string name;  // created, renamed from, or unlinked
    std::string to;    // renamed to
    int inode = -1;
  };
  struct Directory {
    std::map<std::string, int> durable;  // entries as of the last directory fsync
    std::map<std::string, int> live;     // entries now
    std::vector<EntryChange> unsynced;   // changes since the last directory fsync, in order
    std::set<std::string> known;         // every name it ever held: cut() settles each one
  };

  static std::filesystem::path normal(const std::filesystem::path& p) { return p.lexically_normal(); }

  static bool chance(std::mt19937& rng, double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; }
  static int64_t pick(std::mt19937& rng, int64_t lo, int64_t hi) {  // uniform in [lo, hi]
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  }

  static Bytes read_whole(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  static void write_whole(const std::filesystem::path& path, const Bytes& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error("power cut: cannot rewrite '" + path.string() + "'");
  }
  static void put(Bytes& content, int64_t offset, const unsigned char* bytes, int64_t size) {
    if (size <= 0) return;
    const auto end = static_cast<size_t>(offset + size);
    if (content.size() < end) content.resize(end, 0);  // a hole reads as zeros
    std::copy(bytes, bytes + size, content.begin() + offset);
  }

  // Every byte the process wrote, as it reads back now from the page cache.
  static Bytes live_bytes(const Inode& inode) {
    Bytes content = inode.durable;
    for (const Write& w : inode.unsynced) {
      put(content, w.offset, w.bytes.data(), static_cast<int64_t>(w.bytes.size()));
    }
    return content;
  }

  // The durable bytes plus each unsynced write kept, dropped or garbled. A dropped write that
  // extended the file leaves it shorter; garbage lands where the write would have.
  static Bytes surviving_bytes(const Inode& inode, std::mt19937& rng, CutReport& report) {
    Bytes content = inode.durable;
    for (const Write& w : inode.unsynced) {
      const auto size = static_cast<int64_t>(w.bytes.size());
      const int64_t fate = pick(rng, 0, 9);
      if (fate < 4) {
        put(content, w.offset, w.bytes.data(), size);
        ++report.writes_kept;
        continue;
      }
      if (fate < 7) {
        ++report.writes_dropped;
        continue;
      }
      ++report.writes_garbled;
      Bytes garbage = w.bytes;
      switch (pick(rng, 0, 3)) {
        case 0:  // random bytes where the write went
          for (auto& b : garbage) b = static_cast<unsigned char>(rng());
          put(content, w.offset, garbage.data(), size);
          break;
        case 1:  // zeros: the size reached the disk, the data did not
          std::fill(garbage.begin(), garbage.end(), 0);
          put(content, w.offset, garbage.data(), size);
          break;
        case 2:  // a torn write: only a prefix of whole 512-byte sectors made it
          put(content, w.offset, w.bytes.data(), 512 * pick(rng, 0, (size - 1) / 512));
          break;
        default:  // torn pages: each 4 KiB page of the write made it or not
          for (int64_t page = 0; page < size; page += 4096) {
            const int64_t page_bytes = std::min<int64_t>(4096, size - page);
            if (chance(rng, 0.5)) put(content, w.offset + page, w.bytes.data() + page, page_bytes);
          }
          break;
      }
    }
    return content;
  }

  // The durable entries plus each unsynced change kept or undone, in order (a rename or unlink
  // whose file is not there after the earlier coins is moot).
  static std::map<std::string, int> surviving_entries(const Directory& d, std::mt19937& rng, CutReport& report) {
    std::map<std::string, int> entries = d.durable;
    for (const EntryChange& c : d.unsynced) {
      if (!chance(rng, 0.5)) {
        ++report.entries_undone;
        continue;
      }
      ++report.entries_kept;
      auto it = entries.find(c.name);
      switch (c.kind) {
        case EntryChange::Kind::create:
          if (it == entries.end()) entries[c.name] = c.inode;
          break;
        case EntryChange::Kind::rename:
          if (it != entries.end() && it->second == c.inode) {
            entries.erase(it);
            entries[c.to] = c.inode;
          }
          break;
        case EntryChange::Kind::unlink:
          if (it != entries.end() && it->second == c.inode) entries.erase(it);
          break;
      }
    }
    return entries;
  }

  // A durable file damaged by a lying disk. False: the file is gone.
  static bool damage(Bytes& content, std::mt19937& rng) {
    const int64_t size = static_cast<int64_t>(content.size());
    const int64_t how = size == 0 ? 3 : pick(rng, 0, 3);
    switch (how) {
      case 0:
        content[static_cast<size_t>(pick(rng, 0, size - 1))] ^= static_cast<unsigned char>(1u << pick(rng, 0, 7));
        return true;
      case 1: {
        const int64_t page = pick(rng, 0, (size - 1) / 4096) * 4096;
        std::fill(content.begin() + page, content.begin() + std::min(size, page + 4096), 0);
        return true;
      }
      case 2:
        content.resize(static_cast<size_t>(pick(rng, 0, (size - 1) / 4096) * 4096));
        return true;
      default:
        return false;
    }
  }

  // The first call in a directory takes it as durable as it stands.
  Directory& see_directory(const std::filesystem::path& dir) {
    auto [it, fresh] = dirs_.try_emplace(dir);
    if (!fresh) return it->second;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      if (!entry.is_regular_file()) continue;
      inodes_.push_back({read_whole(entry.path()), {}});
      const std::string name = entry.path().filename().string();
      const int inode = static_cast<int>(inodes_.size()) - 1;
      it->second.durable[name] = inode;
      it->second.live[name] = inode;
      it->second.known.insert(name);
    }
    return it->second;
  }
  Directory& directory_of(const std::filesystem::path& file) { return see_directory(normal(file).parent_path()); }

  Inode* live_inode(const std::filesystem::path& file) {
    Directory& d = directory_of(file);
    auto it = d.live.find(normal(file).filename().string());
    if (it == d.live.end()) {
      surprises_.push_back("a call on a file never seen: '" + file.string() + "'");
      return nullptr;
    }
    return &inodes_[static_cast<size_t>(it->second)];
  }

  void changed(Change kind) {
    ++changes_;
    if (cut_at_change_ > 0 && changes_ >= cut_at_change_) power_off_locked(kind);
  }

  // The frozen files are read at this instant: what the store held when the power went off.
  void power_off_locked(Change at) {
    if (off_) return;
    off_ = true;
    cut_point_ = at;
    frozen_at_cut_.clear();
    for (const auto& path : frozen_) {
      std::error_code ec;
      if (std::filesystem::exists(path, ec)) {
        frozen_at_cut_.emplace_back(read_whole(path));
      } else {
        frozen_at_cut_.emplace_back(std::nullopt);
      }
    }
  }

  mutable std::mutex mutex_;  // file calls come from the manager's worker, its read threads and the caller
  std::vector<std::filesystem::path> frozen_;
  std::vector<std::optional<Bytes>> frozen_at_cut_;
  std::map<std::filesystem::path, Directory> dirs_;
  std::vector<Inode> inodes_;
  int64_t changes_ = 0;
  int64_t cut_at_change_ = 0;  // 0: not armed
  bool off_ = false;
  Change cut_point_ = Change::none;
  std::vector<std::string> surprises_;
};

}  // namespace den::test
