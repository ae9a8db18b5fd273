// A pool of KV blocks in host memory, allocated once, handed out by id, and the block table
// of one sequence over it. This is the first tier on the CPU backend; the session memory
// manager (issue #4) builds its HBM / DRAM / SSD tiers on the same block ids and layout.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "den/kernels/paged_kv.h"

namespace den::memory {

class HostBlockPool {
 public:
  // poison: fill blocks with NaN when handed out, so that a kernel reading a slot nobody
  // wrote produces NaN instead of a plausible number (on in debug builds and in tests).
  HostBlockPool(const kernels::KvLayout& layout, int64_t n_blocks, bool poison);
  HostBlockPool(const HostBlockPool&) = delete;
  HostBlockPool& operator=(const HostBlockPool&) = delete;

  std::optional<int32_t> allocate();
  void release(int32_t block);

  int64_t capacity() const { return n_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  const kernels::KvLayout& layout() const { return layout_; }
  kernels::PagedKvView view() const { return {storage_.get(), n_blocks_, layout_}; }

 private:
  struct AlignedFree {
    void operator()(void* p) const;
  };
  kernels::KvLayout layout_;
  int64_t n_blocks_;
  bool poison_;
  std::unique_ptr<void, AlignedFree> storage_;
  std::vector<int32_t> free_;  // stack of free block ids
};

// The blocks of one sequence, in order. Releases them to the pool when destroyed.
class SequenceBlocks {
 public:
  explicit SequenceBlocks(HostBlockPool& pool) : pool_(&pool) {}
  ~SequenceBlocks();
  SequenceBlocks(SequenceBlocks&& other) noexcept;
  SequenceBlocks& operator=(SequenceBlocks&& other) noexcept;
  SequenceBlocks(const SequenceBlocks&) = delete;
  SequenceBlocks& operator=(const SequenceBlocks&) = delete;

  // Ensures blocks for `tokens` tokens. False (and nothing changed) when the pool is short.
  bool reserve(int64_t tokens);
  // Releases the blocks past those needed for `tokens` tokens.
  void shrink_to(int64_t tokens);
  std::span<const int32_t> table() const { return blocks_; }

 private:
  void release_all() noexcept;
  HostBlockPool* pool_;
  std::vector<int32_t> blocks_;
};

}  // namespace den::memory
