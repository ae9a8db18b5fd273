// The transfer engine: moves whole KV blocks between the fast pool (HBM on the CUDA backend,
// host memory on the CPU backend) and the pinned DRAM pool, and between the fast pool and plain
// host buffers (the SSD tier's staging). On a GPU it runs on its own copy stream and moves many
// scattered 16-64 KiB blocks as one operation so that they still move near link speed (see
// TransferPath), and never lets a block be reused before its copy has finished: a Transfer is
// complete only after wait(). Used by the session manager; `den bench resume` measures it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "den/engine/backend.h"
#include "den/memory/block_pool.h"

namespace den::memory {

// A queued copy. Destroying it waits for it (a block is never freed while a copy reads it).
class Transfer {
 public:
  Transfer() = default;
  ~Transfer();
  Transfer(Transfer&& other) noexcept;
  Transfer& operator=(Transfer&& other) noexcept;
  Transfer(const Transfer&) = delete;
  Transfer& operator=(const Transfer&) = delete;
  // Blocks until the copy is done; rethrows its error (a CUDA fault), again on every call.
  // Idempotent; a default-constructed or moved-from Transfer is done.
  void wait();
  bool ready() const;  // done (successfully or not) without blocking
  int64_t bytes() const { return bytes_; }

  struct State;  // implementation detail (completion event, error)

 private:
  friend class TransferEngine;
  std::shared_ptr<State> state_;
  int64_t bytes_ = 0;
};

// A DRAM -> fast copy issued one layer at a time (layer-wise wake): layer l's K and V slices of
// every block are in place once before_layer(l, stream) has made `stream` wait for them, so the
// engine can compute layer l while later layers still arrive. Destroying it waits for it all.
class LayeredTransfer final : public engine::KvArrival {
 public:
  LayeredTransfer() = default;
  ~LayeredTransfer() override;
  LayeredTransfer(LayeredTransfer&& other) noexcept = default;
  LayeredTransfer& operator=(LayeredTransfer&& other) noexcept;
  LayeredTransfer(const LayeredTransfer&) = delete;
  LayeredTransfer& operator=(const LayeredTransfer&) = delete;

  // stream: a cudaStream_t to make wait (nullptr: block the calling thread until the layer is in).
  void before_layer(int32_t layer, void* stream) override;
  void wait();  // every layer; rethrows a CUDA fault

  struct Events;  // per-layer completion events (CUDA builds)

 private:
  friend class TransferEngine;
  std::shared_ptr<Events> events_;  // null: already complete
  Transfer all_;                    // the whole copy
};

// Host memory that a disk read can land in and a copy to the fast pool can read from where it
// lies: pinned and mapped when the fast pool is on a GPU (no bounce through the engine's own
// staging), plain otherwise; aligned for O_DIRECT either way. Handed out by
// TransferEngine::host_staging and returned to the engine's pool when destroyed (pinning costs
// milliseconds per buffer, too much to pay on every wake). Must not outlive its engine.
class HostStaging {
 public:
  HostStaging();
  ~HostStaging();
  HostStaging(HostStaging&& other) noexcept;
  HostStaging& operator=(HostStaging&& other) noexcept;
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;
  void* data() const;
  int64_t bytes() const;

  struct Buffer;  // implementation detail (pinned or aligned memory)

 private:
  friend class TransferEngine;
  struct Pool;
  std::shared_ptr<Pool> pool_;
  std::unique_ptr<Buffer> buffer_;
};

// How DRAM <-> fast copies of scattered blocks run on a GPU (the CPU backend always memcpys):
//   kernel:       one copy kernel per request reads/writes the mapped pinned DRAM pool directly
//                 (zero-copy over PCIe/C2C); no staging.
//   memcpy_batch: cudaMemcpyBatchAsync with one entry per run of consecutive ids on both sides
//                 (copy engines, no SMs); plain cudaMemcpyAsync per run before CUDA 12.8.
//   staged:       runs of consecutive DRAM ids DMA'd (batched) into a device staging buffer,
//                 then a scatter kernel into the pool (gather + DMA out the other way); two
//                 buffers, so one chunk's DMA overlaps the previous chunk's kernel.
//   automatic:    the default (currently kernel).
enum class TransferPath { automatic, kernel, memcpy_batch, staged };

// DEN_TRANSFER_PATH=auto|kernel|memcpy-batch|staged (unset: automatic). Throws
// std::invalid_argument naming the accepted values on anything else. Read where an engine is
// built (the runtime, benchmarks, the GPU test), never inside the engine.
TransferPath transfer_path_from_env();
const char* transfer_path_name(TransferPath path);  // "kernel", "memcpy-batch", ...

// Bandwidths of the links, measured (bytes per second).
struct LinkBandwidths {
  double dram_to_fast = 0;   // one large pinned host -> fast pool copy
  double fast_to_dram = 0;
};

// Ordering: requests run in the order they were issued, each after the previous one finished
// (so a block copied out and then back in arrives intact). The copy stream does not order
// against the engine's compute stream: the caller makes sure compute that writes a fast block
// has finished before copying it out, and wait()s a Transfer before handing its target blocks
// to the engine (the session manager does both). Within one request, target ids must be
// distinct and, for fast_to_fast, disjoint from the source ids. Not thread-safe: one owner.
class TransferEngine {
 public:
  // Both pools must have the same layout (std::invalid_argument otherwise). With a device fast
  // pool, `dram` must be Placement::pinned_host and actually pinned (is_pinned()) and blocks a
  // multiple of 16 bytes; with a host fast pool, `dram` is host or pinned_host. On a GPU the
  // engine allocates its staging once here: two 32 MiB buffers (at least one block each) of
  // device and of pinned memory, and 4 MiB of id staging.
  TransferEngine(BlockPool& fast, BlockPool& dram, TransferPath path = TransferPath::automatic);
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  // fast[fast_blocks[i]] <- dram[dram_blocks[i]]
  Transfer dram_to_fast(std::span<const int32_t> dram_blocks, std::span<const int32_t> fast_blocks);
  // dram[dram_blocks[i]] <- fast[fast_blocks[i]]
  Transfer fast_to_dram(std::span<const int32_t> fast_blocks, std::span<const int32_t> dram_blocks);
  // hosts[i] (block_bytes of any host memory) <- fast[fast_blocks[i]]
  // This and host_to_fast are synchronous on a GPU (the bytes go through pinned staging chunks,
  // pipelined) and return a Transfer that is already complete.
  Transfer fast_to_host(std::span<const int32_t> fast_blocks, std::span<void* const> hosts);
  // The same copy as dram_to_fast, layer by layer, for a layer-wise wake. With a host fast pool
  // (or more blocks than one request holds) it completes before returning.
  LayeredTransfer dram_to_fast_by_layer(std::span<const int32_t> dram_blocks, std::span<const int32_t> fast_blocks);
  // fast[fast_blocks[i]] <- hosts[i]
  Transfer host_to_fast(std::span<const void* const> hosts, std::span<const int32_t> fast_blocks);
  // A staging buffer of at least `bytes` (thread-safe; reuses returned buffers of that size).
  HostStaging host_staging(int64_t bytes);
  // fast[fast_blocks[i]] <- block i of `from` (at from.data() + i * block_bytes). Synchronous
  // like host_to_fast, without its copy into the engine's staging on a GPU.
  Transfer staging_to_fast(const HostStaging& from, std::span<const int32_t> fast_blocks);
  // fast[dst[i]] <- fast[src[i]] (copy-on-write of a shared block)
  Transfer fast_to_fast(std::span<const int32_t> src_blocks, std::span<const int32_t> dst_blocks);

  // Copies of `bytes` between a pinned host buffer and the fast pool's memory, timed (the
  // floors of `den bench resume` and the inputs of the restore-vs-recompute cost model).
  LinkBandwidths measure(int64_t bytes);

  BlockPool& fast() { return fast_; }
  BlockPool& dram() { return dram_; }
  // The DRAM <-> fast path, automatic resolved (meaningless with a host fast pool: memcpy).
  TransferPath path() const { return path_; }

 private:
  // dram_to_fast (to_fast) and fast_to_dram: the same copy in two directions.
  Transfer between_pools(bool to_fast, std::span<const int32_t> from, std::span<const int32_t> to);
  struct Impl;
  BlockPool& fast_;
  BlockPool& dram_;
  TransferPath path_;
  std::unique_ptr<Impl> impl_;
  std::shared_ptr<HostStaging::Pool> staging_pool_;
};

}  // namespace den::memory
