// Fault injectors for the memory tests: FailOp fails the nth call (0-based) of one file
// operation, optionally only on paths a predicate accepts and only once armed;
// InterruptEveryCall makes every call meet signals. Used by the file, segment and durability
// tests.
#pragma once

#include <filesystem>
#include <functional>
#include <utility>

#include "den/memory/file_io.h"

namespace den::test {

class FailOp : public memory::IoFaultInjector {
 public:
  using PathFilter = std::function<bool(const std::filesystem::path&)>;
  FailOp(memory::IoOp op, memory::IoFault fault, int nth = 0, PathFilter applies = {})
      : op_(op), fault_(fault), nth_(nth), applies_(std::move(applies)) {}
  memory::IoFault before(memory::IoOp op, const std::filesystem::path& path) override {
    if (!armed || op != op_ || (applies_ && !applies_(path))) return {};
    return calls_++ == nth_ ? fault_ : memory::IoFault{};
  }
  int calls() const { return calls_; }
  bool fired() const { return calls_ > nth_; }
  bool armed = true;  // calls before arming are neither counted nor failed

 private:
  memory::IoOp op_;
  memory::IoFault fault_;
  int nth_;
  PathFilter applies_;
  int calls_ = 0;
};

// Interrupts every open, read, write and directory open `n` times (EINTR, then partial
// transfers, alternately: IoFault::interruptions), failing nothing; counts the calls it touched.
class InterruptEveryCall : public memory::IoFaultInjector {
 public:
  explicit InterruptEveryCall(int n) : n_(n) {}
  memory::IoFault before(memory::IoOp op, const std::filesystem::path&) override {
    if (op != memory::IoOp::open && op != memory::IoOp::read && op != memory::IoOp::write &&
        op != memory::IoOp::fsync_dir) {
      return {};
    }
    ++interrupted_[static_cast<int>(op)];
    return memory::IoFault{0, -1, n_};
  }
  int interrupted(memory::IoOp op) const { return interrupted_[static_cast<int>(op)]; }

 private:
  int n_;
  int interrupted_[16] = {};
};

}  // namespace den::test
