// BlockPool and SequenceBlocks.
#include "den/memory/block_pool.h"

#include <cstdlib>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#ifdef DEN_HAVE_CUDA
#include <cuda_runtime.h>

#include "den/kernels/cuda_check.h"
#endif

namespace den::memory {
namespace {

constexpr size_t kAlignment = 64;

// Page-locked, mapped host memory; nullptr when there is no CUDA device to pin it for.
void* pin_host(size_t bytes) {
#ifdef DEN_HAVE_CUDA
  if (!kernels::cuda_device_available()) return nullptr;
  void* p = nullptr;
  // Portable: pinned for every context; mapped: kernels may read and write it (zero-copy).
  if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error("KV block pool: cannot pin " + std::to_string(bytes) +
                             " bytes of host memory (make the DRAM tier smaller or raise the locked-memory limit)");
  }
  return p;
#else
  (void)bytes;
  return nullptr;
#endif
}

}  // namespace

BlockPool::BlockPool(const kernels::KvLayout& layout, int64_t n_blocks, Placement placement, bool poison)
    : layout_(layout), n_blocks_(n_blocks), placement_(placement), poison_(poison) {
  if (n_blocks <= 0 || n_blocks > std::numeric_limits<int32_t>::max() || layout.block_bytes() <= 0) {
    throw std::invalid_argument("KV block pool: " + std::to_string(n_blocks) + " blocks of " +
                                std::to_string(layout.block_bytes()) + " bytes is not a valid pool");
  }
  const auto bytes = static_cast<size_t>(layout.block_bytes()) * static_cast<size_t>(n_blocks);
  if (placement == Placement::device) {
#ifdef DEN_HAVE_CUDA
    if (cudaMalloc(&storage_, bytes) != cudaSuccess) {
      (void)cudaGetLastError();
      throw std::runtime_error("KV block pool: cannot allocate " + std::to_string(bytes) + " bytes of device memory");
    }
#else
    throw std::runtime_error("KV block pool: device memory needs a build with CUDA");
#endif
  } else {
    if (placement == Placement::pinned_host) storage_ = pin_host(bytes);
    pinned_ = storage_ != nullptr;
    if (!pinned_) {
      // host, or pinned_host without a device: ordinary memory.
      storage_ = std::aligned_alloc(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
      if (storage_ == nullptr) {
        throw std::runtime_error("KV block pool: cannot allocate " + std::to_string(bytes) + " bytes of host memory");
      }
    }
  }
  free_.reserve(static_cast<size_t>(n_blocks));
  // Highest id at the bottom of the stack: blocks come out in ascending order.
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

BlockPool::~BlockPool() {
#ifdef DEN_HAVE_CUDA
  if (pinned_) {
    cudaFreeHost(storage_);
    return;
  }
  if (placement_ == Placement::device) {
    cudaFree(storage_);
    return;
  }
#endif
  std::free(storage_);
}

void BlockPool::poison_block(int32_t block) {
  const int64_t n = layout_.block_elements();
  const int64_t bytes = layout_.block_bytes();
  char* base = static_cast<char*>(storage_) + block * bytes;
  if (placement_ == Placement::device) {
#ifdef DEN_HAVE_CUDA
    // All-ones bytes are a NaN in f32, f16 and bf16 alike.
    kernels::check(cudaMemset(base, 0xff, static_cast<size_t>(bytes)));
#endif
    return;
  }
  if (layout_.dtype == kernels::DType::f32) {
    float* p = reinterpret_cast<float*>(base);
    for (int64_t i = 0; i < n; ++i) p[i] = std::numeric_limits<float>::quiet_NaN();
  } else {
    // 0x7e00 is a quiet NaN in fp16, 0x7fc0 in bf16.
    const uint16_t nan = layout_.dtype == kernels::DType::f16 ? 0x7e00 : 0x7fc0;
    uint16_t* p = reinterpret_cast<uint16_t*>(base);
    for (int64_t i = 0; i < n; ++i) p[i] = nan;
  }
}

std::optional<int32_t> BlockPool::allocate() {
  if (free_.empty()) return std::nullopt;
  const int32_t block = free_.back();
  free_.pop_back();
  if (poison_) poison_block(block);
  return block;
}

void BlockPool::release(int32_t block) { free_.push_back(block); }

SequenceBlocks::~SequenceBlocks() { release_all(); }

SequenceBlocks::SequenceBlocks(SequenceBlocks&& other) noexcept
    : pool_(other.pool_), blocks_(std::exchange(other.blocks_, {})) {}

SequenceBlocks& SequenceBlocks::operator=(SequenceBlocks&& other) noexcept {
  if (this != &other) {
    release_all();
    pool_ = other.pool_;
    blocks_ = std::exchange(other.blocks_, {});
  }
  return *this;
}

void SequenceBlocks::release_all() noexcept {
  for (int32_t b : blocks_) pool_->release(b);
  blocks_.clear();
}

bool SequenceBlocks::reserve(int64_t tokens) {
  const int64_t per_block = pool_->layout().block_tokens;
  const auto needed = static_cast<size_t>((tokens + per_block - 1) / per_block);
  if (needed <= blocks_.size()) return true;
  if (static_cast<int64_t>(needed - blocks_.size()) > pool_->free_blocks()) return false;
  while (blocks_.size() < needed) blocks_.push_back(*pool_->allocate());
  return true;
}

void SequenceBlocks::shrink_to(int64_t tokens) {
  const int64_t per_block = pool_->layout().block_tokens;
  const auto needed = static_cast<size_t>((tokens + per_block - 1) / per_block);
  while (blocks_.size() > needed) {
    pool_->release(blocks_.back());
    blocks_.pop_back();
  }
}

}  // namespace den::memory
