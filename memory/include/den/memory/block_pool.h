// A pool of KV blocks allocated once, in host memory (the CPU backend's first tier), device
// memory (the CUDA backend's HBM tier) or pinned host memory (the CUDA backend's DRAM tier),
// handed out by id; and the block table of one sequence over it. The session memory manager
// (issue #4) builds its tiers on the same ids and layout; the transfer engine copies between them.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "den/kernels/paged_kv.h"

namespace den::memory {

// pinned_host: page-locked and mapped into the device's address space (the transfer engine's
// DRAM tier: DMA and zero-copy kernels reach it). Without a usable CUDA device (or in a build
// without CUDA) it is ordinary host memory; is_pinned() tells which.
enum class Placement { host, device, pinned_host };

class BlockPool {
 public:
  // poison: fill blocks with NaN when handed out, so that a kernel reading a slot nobody
  // wrote produces NaN instead of a plausible number (on in debug builds and in tests).
  // Device placement needs a CUDA build and allocates on the current device. Pinned placement
  // throws std::runtime_error when a present device cannot pin the bytes.
  BlockPool(const kernels::KvLayout& layout, int64_t n_blocks, Placement placement, bool poison);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  std::optional<int32_t> allocate();
  void release(int32_t block);

  int64_t capacity() const { return n_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  Placement placement() const { return placement_; }
  // True when the storage is page-locked, mapped CUDA host memory (pinned_host with a device).
  bool is_pinned() const { return pinned_; }
  const kernels::KvLayout& layout() const { return layout_; }
  kernels::PagedKvView view() const { return {storage_, n_blocks_, layout_}; }

 private:
  void poison_block(int32_t block);

  kernels::KvLayout layout_;
  int64_t n_blocks_;
  Placement placement_;
  bool poison_;
  bool pinned_ = false;
  void* storage_ = nullptr;
  std::vector<int32_t> free_;  // stack of free block ids
};

// The blocks of one sequence, in order. Releases them to the pool when destroyed.
class SequenceBlocks {
 public:
  explicit SequenceBlocks(BlockPool& pool) : pool_(&pool) {}
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
  BlockPool* pool_;
  std::vector<int32_t> blocks_;
};

}  // namespace den::memory
