// TransferEngine and Transfer: whole-block copies between the fast pool, the pinned DRAM pool
// and plain host buffers. A device fast pool gets the CUDA paths (kernel, memcpy-batch, staged;
// see TransferPath); a host fast pool gets memcpy and transfers that are complete on return.
// Used by the session manager and `den bench resume`.
#include "den/memory/transfer_engine.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "den/kernels/kv_blocks.h"
#include "den/memory/file_io.h"

#ifdef DEN_HAVE_CUDA
#include <cuda_runtime.h>

#include "den/kernels/cuda_check.h"
#include "den/kernels/cuda_resources.h"
#endif

namespace den::memory {

// ---------------------------------------------------------------------------------------------
// Transfer

struct Transfer::State {
#ifdef DEN_HAVE_CUDA
  kernels::Event done{cudaEventDisableTiming};  // recorded on the copy stream after the last copy
#endif
  std::exception_ptr error;  // the fault wait() or ready() saw; every later wait() rethrows it
  bool finished = false;
};

Transfer::~Transfer() {
  // No throwing destructors: a fault is the caller's to see through wait(); here we only make
  // sure the copy no longer touches its blocks.
  try {
    wait();
  } catch (...) {
  }
}

Transfer::Transfer(Transfer&& other) noexcept
    : state_(std::move(other.state_)), bytes_(std::exchange(other.bytes_, 0)) {}

Transfer& Transfer::operator=(Transfer&& other) noexcept {
  if (this != &other) {
    try {
      wait();  // the copy being replaced must finish, as if destroyed
    } catch (...) {
    }
    state_ = std::move(other.state_);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void Transfer::wait() {
  if (!state_) return;
  if (state_->error) std::rethrow_exception(state_->error);
  if (state_->finished) return;
#ifdef DEN_HAVE_CUDA
  try {
    state_->done.synchronize();
  } catch (...) {
    state_->error = std::current_exception();
    throw;
  }
#endif
  state_->finished = true;
}

bool Transfer::ready() const {
  if (!state_ || state_->finished || state_->error) return true;
#ifdef DEN_HAVE_CUDA
  const cudaError_t status = cudaEventQuery(state_->done.get());
  if (status == cudaErrorNotReady) {
    (void)cudaGetLastError();  // not a fault: keep it from surfacing at the next launch check
    return false;
  }
  if (status != cudaSuccess) {
    try {
      kernels::check(status);
    } catch (...) {
      state_->error = std::current_exception();  // done, unsuccessfully: wait() will say why
    }
    return true;
  }
#endif
  state_->finished = true;
  return true;
}

// ---------------------------------------------------------------------------------------------
// LayeredTransfer

struct LayeredTransfer::Events {
#ifdef DEN_HAVE_CUDA
  std::vector<kernels::Event> per_layer;
#endif
};

LayeredTransfer::~LayeredTransfer() {
  try {
    wait();
  } catch (...) {
  }
}

LayeredTransfer& LayeredTransfer::operator=(LayeredTransfer&& other) noexcept {
  if (this != &other) {
    try {
      wait();
    } catch (...) {
    }
    events_ = std::move(other.events_);
    all_ = std::move(other.all_);
  }
  return *this;
}

void LayeredTransfer::before_layer(int32_t layer, void* stream) {
  if (!events_) return;
#ifdef DEN_HAVE_CUDA
  if (layer < 0 || static_cast<size_t>(layer) >= events_->per_layer.size()) {
    throw std::out_of_range("LayeredTransfer: no layer " + std::to_string(layer));
  }
  kernels::Event& ready = events_->per_layer[static_cast<size_t>(layer)];
  if (stream != nullptr) {
    kernels::check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), ready.get(), 0));
  } else {
    ready.synchronize();
  }
#else
  (void)layer;
  (void)stream;
#endif
}

void LayeredTransfer::wait() {
  all_.wait();
  events_.reset();
}

// ---------------------------------------------------------------------------------------------
// Paths

TransferPath transfer_path_from_env() {
  const char* value = std::getenv("DEN_TRANSFER_PATH");
  if (value == nullptr) return TransferPath::automatic;
  const std::string_view v(value);
  if (v.empty() || v == "auto") return TransferPath::automatic;
  if (v == "kernel") return TransferPath::kernel;
  if (v == "memcpy-batch") return TransferPath::memcpy_batch;
  if (v == "staged") return TransferPath::staged;
  throw std::invalid_argument("DEN_TRANSFER_PATH='" + std::string(v) +
                              "' is not a transfer path; use auto, kernel, memcpy-batch or staged");
}

const char* transfer_path_name(TransferPath path) {
  switch (path) {
    case TransferPath::automatic: return "auto";
    case TransferPath::kernel: return "kernel";
    case TransferPath::memcpy_batch: return "memcpy-batch";
    case TransferPath::staged: return "staged";
  }
  return "?";
}

namespace {

// Measured on an H200 (the GPU suite's per-path table, scattered blocks, 2026-11-27): the kernel
// path moves 16-64 KiB blocks at 50-52 GB/s (91-95% of a large copy) both ways; memcpy-batch and
// staged reach 14-18 GB/s at 16 KiB and 32-37 GB/s at 32 KiB.
constexpr TransferPath kDefaultPath = TransferPath::kernel;

void check_sizes(const char* op, size_t sources, size_t targets) {
  if (sources != targets) {
    throw std::invalid_argument(std::string("TransferEngine::") + op + ": " + std::to_string(sources) +
                                " source blocks but " + std::to_string(targets) + " targets");
  }
  if (sources > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    throw std::invalid_argument(std::string("TransferEngine::") + op + ": " + std::to_string(sources) +
                                " blocks in one request; split it");
  }
}

void check_ids(const char* op, const char* name, std::span<const int32_t> ids, const BlockPool& pool,
               const char* pool_name) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= pool.capacity()) {
      throw std::invalid_argument(std::string("TransferEngine::") + op + ": " + name + "[" + std::to_string(i) +
                                  "] = " + std::to_string(ids[i]) + " is not a block of the " + pool_name +
                                  " pool (ids 0.." + std::to_string(pool.capacity() - 1) + ")");
    }
  }
}

char* storage(const BlockPool& pool) { return static_cast<char*>(pool.view().blocks); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// The CUDA machinery (a device fast pool)

#ifdef DEN_HAVE_CUDA
namespace {

constexpr int64_t kStagingBytes = int64_t{32} << 20;  // per buffer; two of each kind
constexpr int32_t kIdsPerSlot = 1 << 16;
// Thread blocks of a layer-wise wake's copies: enough outstanding loads to fill PCIe, few
// enough SMs that the engine's kernels run beside them.
constexpr int32_t kLayeredCopyCtas = 64;              // block ids per request chunk and side
constexpr int kIdSlots = 4;
constexpr size_t kBatchEntries = 4096;  // copies per cudaMemcpyBatchAsync call

// A maximal stretch where source and target ids both advance by one.
struct Run {
  int64_t src = 0;
  int64_t dst = 0;
  int64_t blocks = 0;
};

// Runs of (src[i], dst[i]); a null array stands for the positions 0, 1, 2, ... (staging).
std::vector<Run> coalesce(const int32_t* src, const int32_t* dst, size_t n) {
  std::vector<Run> runs;
  for (size_t i = 0; i < n; ++i) {
    const int64_t s = src != nullptr ? src[i] : static_cast<int64_t>(i);
    const int64_t d = dst != nullptr ? dst[i] : static_cast<int64_t>(i);
    if (!runs.empty() && runs.back().src + runs.back().blocks == s && runs.back().dst + runs.back().blocks == d) {
      ++runs.back().blocks;
    } else {
      runs.push_back({s, d, 1});
    }
  }
  return runs;
}

// One DMA per run, as few API calls as the toolkit allows. Pointers are UVA (pinned host or
// device), so the direction is implied.
void copy_runs(const std::vector<Run>& runs, char* dst_base, const char* src_base, int64_t block_bytes,
               cudaStream_t stream) {
#if CUDART_VERSION >= 12080
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // the source may be written by earlier work
  size_t attr_index = 0;
  for (size_t first = 0; first < runs.size(); first += kBatchEntries) {
    const size_t count = std::min(kBatchEntries, runs.size() - first);
    dsts.resize(count);
    srcs.resize(count);
    sizes.resize(count);
    for (size_t i = 0; i < count; ++i) {
      const Run& r = runs[first + i];
      dsts[i] = dst_base + r.dst * block_bytes;
      srcs[i] = src_base + r.src * block_bytes;
      sizes[i] = static_cast<size_t>(r.blocks * block_bytes);
    }
#if CUDART_VERSION >= 13000
    kernels::check(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), count, &attr, &attr_index, 1, stream));
#else
    size_t fail_index = 0;
    kernels::check(cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(), count, &attr,
                                        &attr_index, 1, &fail_index, stream));
#endif
  }
#else
  for (const Run& r : runs) {
    kernels::check(cudaMemcpyAsync(dst_base + r.dst * block_bytes, src_base + r.src * block_bytes,
                                   static_cast<size_t>(r.blocks * block_bytes), cudaMemcpyDefault, stream));
  }
#endif
}

// Id staging: the CPU writes ids into pinned memory, one small DMA puts them where a kernel
// reads them. A slot is reused only after the kernel that read it has finished.
struct IdSlot {
  kernels::PinnedBuffer host{2 * kIdsPerSlot * sizeof(int32_t)};
  kernels::DeviceBuffer device{2 * kIdsPerSlot * sizeof(int32_t)};
  kernels::Event free{cudaEventDisableTiming};  // recorded after the last kernel that read `device`
};

// Device copies of up to kIdsPerSlot ids per side (null for an empty side).
struct DeviceIds {
  IdSlot* slot = nullptr;
  const int32_t* a = nullptr;
  const int32_t* b = nullptr;
};

}  // namespace

struct TransferEngine::Impl {
  Impl(BlockPool& fast, BlockPool& dram)
      : block_bytes(fast.layout().block_bytes()),
        fast_blocks(storage(fast)),
        dram_host(storage(dram)),
        stage_blocks(std::min<int64_t>(std::max<int64_t>(kStagingBytes / block_bytes, 1), kIdsPerSlot)),
        device_stage{kernels::DeviceBuffer(static_cast<size_t>(stage_blocks * block_bytes)),
                     kernels::DeviceBuffer(static_cast<size_t>(stage_blocks * block_bytes))},
        host_stage{kernels::PinnedBuffer(static_cast<size_t>(stage_blocks * block_bytes)),
                   kernels::PinnedBuffer(static_cast<size_t>(stage_blocks * block_bytes))} {
    void* mapped = nullptr;
    kernels::check(cudaHostGetDevicePointer(&mapped, dram_host, 0));
    dram_device = static_cast<char*>(mapped);
  }
  ~Impl() {
    // Nothing may still read staging or id slots when they are freed; errors are moot here.
    (void)cudaStreamSynchronize(aux.get());
    (void)cudaStreamSynchronize(copy.get());
  }

  DeviceIds upload_ids(std::span<const int32_t> a, std::span<const int32_t> b, cudaStream_t stream) {
    IdSlot& slot = slots[next_slot];
    next_slot = (next_slot + 1) % kIdSlots;
    slot.free.synchronize();  // its previous kernel may still read the device copy
    int32_t* host = slot.host.as<int32_t>();
    std::copy(a.begin(), a.end(), host);
    std::copy(b.begin(), b.end(), host + a.size());
    kernels::check(cudaMemcpyAsync(slot.device.get(), host, (a.size() + b.size()) * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream));
    const int32_t* device = slot.device.as<int32_t>();
    return {&slot, a.empty() ? nullptr : device, b.empty() ? nullptr : device + a.size()};
  }

  // A Transfer that completes when everything issued so far on the copy stream has.
  Transfer finish(int64_t blocks) {
    Transfer t;
    t.state_ = std::make_shared<Transfer::State>();
    t.state_->done.record(copy.get());
    t.bytes_ = blocks * block_bytes;
    return t;
  }

  // Lets `aux` start only after everything issued before on the copy stream (request order).
  void fork() {
    forked.record(copy.get());
    kernels::check(cudaStreamWaitEvent(aux.get(), forked.get(), 0));
  }
  void join() {
    joined.record(aux.get());
    kernels::check(cudaStreamWaitEvent(copy.get(), joined.get(), 0));
  }

  // to[to_ids[i]] <- from[from_ids[i]] with the copy kernel, chunked by id-slot size.
  void kernel_copy(const char* from, char* to, std::span<const int32_t> from_ids, std::span<const int32_t> to_ids) {
    for (size_t first = 0; first < from_ids.size(); first += kIdsPerSlot) {
      const size_t n = std::min<size_t>(kIdsPerSlot, from_ids.size() - first);
      const DeviceIds ids = upload_ids(from_ids.subspan(first, n), to_ids.subspan(first, n), copy.get());
      kernels::kv_copy_blocks_cuda(from, to, ids.a, ids.b, static_cast<int32_t>(n), block_bytes, copy.get());
      ids.slot->free.record(copy.get());
    }
  }

  void batch_copy(const char* from, char* to, std::span<const int32_t> from_ids, std::span<const int32_t> to_ids) {
    copy_runs(coalesce(from_ids.data(), to_ids.data(), from_ids.size()), to, from, block_bytes, copy.get());
  }

  // DRAM runs DMA'd into device staging (copy stream), scattered into the pool by a kernel
  // (aux stream); buffer k is refilled only after its previous scatter finished.
  void staged_in(std::span<const int32_t> dram_ids, std::span<const int32_t> fast_ids) {
    fork();
    for (size_t first = 0, c = 0; first < dram_ids.size(); first += stage_blocks, ++c) {
      const size_t n = std::min<size_t>(stage_blocks, dram_ids.size() - first);
      const size_t k = c % 2;
      char* stage = device_stage[k].as<char>();
      kernels::check(cudaStreamWaitEvent(copy.get(), stage_free[k].get(), 0));
      copy_runs(coalesce(dram_ids.data() + first, nullptr, n), stage, dram_host, block_bytes, copy.get());
      stage_filled[k].record(copy.get());
      kernels::check(cudaStreamWaitEvent(aux.get(), stage_filled[k].get(), 0));
      const DeviceIds ids = upload_ids({}, fast_ids.subspan(first, n), aux.get());
      kernels::kv_copy_blocks_cuda(stage, fast_blocks, nullptr, ids.b, static_cast<int32_t>(n), block_bytes, aux.get());
      ids.slot->free.record(aux.get());
      stage_free[k].record(aux.get());
    }
    join();
  }

  // The reverse: a gather kernel into staging (aux), then DMA of the runs out (copy stream).
  void staged_out(std::span<const int32_t> fast_ids, std::span<const int32_t> dram_ids) {
    fork();
    for (size_t first = 0, c = 0; first < fast_ids.size(); first += stage_blocks, ++c) {
      const size_t n = std::min<size_t>(stage_blocks, fast_ids.size() - first);
      const size_t k = c % 2;
      char* stage = device_stage[k].as<char>();
      kernels::check(cudaStreamWaitEvent(aux.get(), stage_free[k].get(), 0));
      const DeviceIds ids = upload_ids(fast_ids.subspan(first, n), {}, aux.get());
      kernels::kv_copy_blocks_cuda(fast_blocks, stage, ids.a, nullptr, static_cast<int32_t>(n), block_bytes, aux.get());
      ids.slot->free.record(aux.get());
      stage_filled[k].record(aux.get());
      kernels::check(cudaStreamWaitEvent(copy.get(), stage_filled[k].get(), 0));
      copy_runs(coalesce(nullptr, dram_ids.data() + first, n), dram_host, stage, block_bytes, copy.get());
      stage_free[k].record(copy.get());
    }
  }

  // Gather into device staging, one DMA into pinned staging, memcpy out; the host copies of
  // chunk c-1 overlap the GPU work of chunk c.
  void to_host(std::span<const int32_t> fast_ids, std::span<void* const> hosts) {
    const auto copy_out = [&](size_t first, size_t n, size_t k) {
      host_done[k].synchronize();
      const char* src = host_stage[k].as<char>();
      for (size_t i = 0; i < n; ++i) {
        std::memcpy(hosts[first + i], src + i * block_bytes, static_cast<size_t>(block_bytes));
      }
    };
    size_t previous = 0, previous_n = 0;
    for (size_t first = 0, c = 0; first < fast_ids.size(); first += stage_blocks, ++c) {
      const size_t n = std::min<size_t>(stage_blocks, fast_ids.size() - first);
      const size_t k = c % 2;
      const DeviceIds ids = upload_ids(fast_ids.subspan(first, n), {}, copy.get());
      kernels::kv_copy_blocks_cuda(fast_blocks, device_stage[k].get(), ids.a, nullptr, static_cast<int32_t>(n),
                                   block_bytes, copy.get());
      ids.slot->free.record(copy.get());
      kernels::check(cudaMemcpyAsync(host_stage[k].get(), device_stage[k].get(), n * block_bytes,
                                     cudaMemcpyDeviceToHost, copy.get()));
      host_done[k].record(copy.get());
      if (c > 0) copy_out(previous, previous_n, (c - 1) % 2);
      previous = first;
      previous_n = n;
    }
    if (!fast_ids.empty()) copy_out(previous, previous_n, ((fast_ids.size() - 1) / stage_blocks) % 2);
  }

  // memcpy into pinned staging, one DMA into device staging, a scatter kernel; pinned buffer k
  // is refilled only after its previous DMA finished.
  void from_host(std::span<const void* const> hosts, std::span<const int32_t> fast_ids) {
    for (size_t first = 0, c = 0; first < fast_ids.size(); first += stage_blocks, ++c) {
      const size_t n = std::min<size_t>(stage_blocks, fast_ids.size() - first);
      const size_t k = c % 2;
      host_done[k].synchronize();
      char* dst = host_stage[k].as<char>();
      for (size_t i = 0; i < n; ++i) {
        std::memcpy(dst + i * block_bytes, hosts[first + i], static_cast<size_t>(block_bytes));
      }
      kernels::check(cudaMemcpyAsync(device_stage[k].get(), host_stage[k].get(), n * block_bytes,
                                     cudaMemcpyHostToDevice, copy.get()));
      host_done[k].record(copy.get());
      const DeviceIds ids = upload_ids({}, fast_ids.subspan(first, n), copy.get());
      kernels::kv_copy_blocks_cuda(device_stage[k].get(), fast_blocks, nullptr, ids.b, static_cast<int32_t>(n),
                                   block_bytes, copy.get());
      ids.slot->free.record(copy.get());
    }
    finished.record(copy.get());
    finished.synchronize();
  }

  LinkBandwidths measure(int64_t bytes) {
    kernels::PinnedBuffer host(static_cast<size_t>(bytes));
    kernels::DeviceBuffer device(static_cast<size_t>(bytes));
    std::memset(host.get(), 1, static_cast<size_t>(bytes));
    kernels::Event start, stop;
    const auto best_of_3 = [&](void* to, const void* from, cudaMemcpyKind kind) {
      float best_ms = std::numeric_limits<float>::max();
      for (int i = 0; i < 4; ++i) {  // the first run warms up and is not counted
        start.record(copy.get());
        kernels::check(cudaMemcpyAsync(to, from, static_cast<size_t>(bytes), kind, copy.get()));
        stop.record(copy.get());
        stop.synchronize();
        if (i > 0) best_ms = std::min(best_ms, stop.elapsed_ms_since(start));
      }
      return static_cast<double>(bytes) / (static_cast<double>(best_ms) * 1e-3);
    };
    LinkBandwidths b;
    b.dram_to_fast = best_of_3(device.get(), host.get(), cudaMemcpyHostToDevice);
    b.fast_to_dram = best_of_3(host.get(), device.get(), cudaMemcpyDeviceToHost);
    return b;
  }

  const int64_t block_bytes;
  char* const fast_blocks;  // device
  char* const dram_host;    // pinned host, as the CPU and DMA address it
  char* dram_device = nullptr;  // the same memory as a kernel addresses it
  const int64_t stage_blocks;   // blocks per staging buffer

  // The streams are declared first so that they outlive the buffers and events (destruction
  // runs in reverse), and ~Impl has drained both before anything is freed.
  kernels::Stream copy;  // every request is issued here; Transfers complete on it
  kernels::Stream aux;   // the kernel half of the staged pipeline, overlapping the DMA half
  std::array<kernels::DeviceBuffer, 2> device_stage;
  std::array<kernels::PinnedBuffer, 2> host_stage;
  std::array<IdSlot, kIdSlots> slots;
  int next_slot = 0;
  std::array<kernels::Event, 2> stage_filled{kernels::Event(cudaEventDisableTiming),
                                             kernels::Event(cudaEventDisableTiming)};
  std::array<kernels::Event, 2> stage_free{kernels::Event(cudaEventDisableTiming),
                                           kernels::Event(cudaEventDisableTiming)};
  std::array<kernels::Event, 2> host_done{kernels::Event(cudaEventDisableTiming),
                                          kernels::Event(cudaEventDisableTiming)};
  kernels::Event forked{cudaEventDisableTiming};
  kernels::Event joined{cudaEventDisableTiming};
  kernels::Event finished{cudaEventDisableTiming};
};
#else
struct TransferEngine::Impl {};
#endif

// ---------------------------------------------------------------------------------------------
// TransferEngine

// ---- Host staging ----

struct HostStaging::Buffer {
  explicit Buffer(int64_t size, bool pinned) : bytes(size) {
#ifdef DEN_HAVE_CUDA
    if (pinned) {
      pinned_memory = kernels::PinnedBuffer(static_cast<size_t>(size));  // page-aligned
      return;
    }
#endif
    (void)pinned;
    aligned = AlignedBuffer(size);
  }
  void* data() const {
#ifdef DEN_HAVE_CUDA
    if (pinned_memory.get() != nullptr) return pinned_memory.get();
#endif
    return aligned.data();
  }
  int64_t bytes;
  AlignedBuffer aligned;
#ifdef DEN_HAVE_CUDA
  kernels::PinnedBuffer pinned_memory;
#endif
};

struct HostStaging::Pool {
  std::mutex mutex;
  std::vector<std::unique_ptr<Buffer>> free;
  bool pinned = false;
};

HostStaging::~HostStaging() {
  if (!buffer_) return;
  std::lock_guard lock(pool_->mutex);
  constexpr size_t kKept = 8;  // a wake's readers' worth
  if (pool_->free.size() < kKept) pool_->free.push_back(std::move(buffer_));
}
HostStaging::HostStaging() = default;
HostStaging::HostStaging(HostStaging&& other) noexcept = default;
HostStaging& HostStaging::operator=(HostStaging&& other) noexcept {
  if (this != &other) {
    HostStaging released(std::move(*this));  // returns the old buffer to its pool
    pool_ = std::move(other.pool_);
    buffer_ = std::move(other.buffer_);
  }
  return *this;
}
void* HostStaging::data() const { return buffer_ ? buffer_->data() : nullptr; }
int64_t HostStaging::bytes() const { return buffer_ ? buffer_->bytes : 0; }

HostStaging TransferEngine::host_staging(int64_t bytes) {
  if (bytes <= 0) throw std::invalid_argument("TransferEngine::host_staging: " + std::to_string(bytes) + " bytes");
  const int64_t size = (bytes + kDirectIoAlignment - 1) / kDirectIoAlignment * kDirectIoAlignment;
  HostStaging staging;
  staging.pool_ = staging_pool_;
  {
    std::lock_guard lock(staging_pool_->mutex);
    auto& free = staging_pool_->free;
    for (auto it = free.begin(); it != free.end(); ++it) {
      if ((*it)->bytes == size) {
        staging.buffer_ = std::move(*it);
        free.erase(it);
        return staging;
      }
    }
  }
  staging.buffer_ = std::make_unique<HostStaging::Buffer>(size, staging_pool_->pinned);
  return staging;
}

Transfer TransferEngine::staging_to_fast(const HostStaging& from, std::span<const int32_t> fast_blocks) {
  check_ids("staging_to_fast", "fast_blocks", fast_blocks, fast_, "fast");
  const int64_t block_bytes = fast_.layout().block_bytes();
  if (static_cast<int64_t>(fast_blocks.size()) * block_bytes > from.bytes()) {
    throw std::invalid_argument("TransferEngine::staging_to_fast: " + std::to_string(fast_blocks.size()) +
                                " blocks of " + std::to_string(block_bytes) + " bytes from a staging buffer of " +
                                std::to_string(from.bytes()));
  }
  const auto* source = static_cast<const char*>(from.data());
  if (!impl_) {
    for (size_t i = 0; i < fast_blocks.size(); ++i) {
      std::memcpy(storage(fast_) + fast_blocks[i] * block_bytes, source + static_cast<int64_t>(i) * block_bytes,
                  static_cast<size_t>(block_bytes));
    }
  } else {
#ifdef DEN_HAVE_CUDA
    // The copy kernel reads the mapped pinned buffer over the link and scatters into the pool.
    void* mapped = nullptr;
    kernels::check(cudaHostGetDevicePointer(&mapped, const_cast<char*>(source), 0));
    for (size_t first = 0; first < fast_blocks.size(); first += kIdsPerSlot) {
      const size_t n = std::min<size_t>(kIdsPerSlot, fast_blocks.size() - first);
      const DeviceIds ids = impl_->upload_ids({}, fast_blocks.subspan(first, n), impl_->copy.get());
      kernels::kv_copy_blocks_cuda(static_cast<const char*>(mapped) + static_cast<int64_t>(first) * block_bytes,
                                   impl_->fast_blocks, nullptr, ids.b, static_cast<int32_t>(n), block_bytes,
                                   impl_->copy.get());
      ids.slot->free.record(impl_->copy.get());
    }
    impl_->finished.record(impl_->copy.get());
    impl_->finished.synchronize();
#endif
  }
  Transfer t;
  t.bytes_ = static_cast<int64_t>(fast_blocks.size()) * block_bytes;
  return t;
}

TransferEngine::TransferEngine(BlockPool& fast, BlockPool& dram, TransferPath path)
    : fast_(fast),
      dram_(dram),
      path_(path == TransferPath::automatic ? kDefaultPath : path),
      staging_pool_(std::make_shared<HostStaging::Pool>()) {
  const kernels::KvLayout& a = fast.layout();
  const kernels::KvLayout& b = dram.layout();
  if (!(a == b)) {
    throw std::invalid_argument("TransferEngine: the fast pool's blocks (" + std::to_string(a.block_bytes()) +
                                " bytes) and the DRAM pool's (" + std::to_string(b.block_bytes()) +
                                " bytes) have different layouts; build both from one KvLayout");
  }
  if (dram.placement() == Placement::device) {
    throw std::invalid_argument("TransferEngine: the DRAM pool must be host memory (Placement::pinned_host)");
  }
  if (fast.placement() != Placement::device) return;  // memcpy between host pools
  if (dram.placement() != Placement::pinned_host || !dram.is_pinned()) {
    throw std::invalid_argument("TransferEngine: a device fast pool needs a pinned DRAM pool "
                                "(Placement::pinned_host, allocated while a CUDA device is present)");
  }
  if (a.block_bytes() % 16 != 0) {
    throw std::invalid_argument("TransferEngine: blocks of " + std::to_string(a.block_bytes()) +
                                " bytes; the copy kernels need a multiple of 16");
  }
#ifdef DEN_HAVE_CUDA
  impl_ = std::make_unique<Impl>(fast, dram);
  staging_pool_->pinned = true;
#endif
}

TransferEngine::~TransferEngine() = default;

Transfer TransferEngine::dram_to_fast(std::span<const int32_t> dram_blocks, std::span<const int32_t> fast_blocks) {
  return between_pools(true, dram_blocks, fast_blocks);
}

Transfer TransferEngine::fast_to_dram(std::span<const int32_t> fast_blocks, std::span<const int32_t> dram_blocks) {
  return between_pools(false, fast_blocks, dram_blocks);
}

Transfer TransferEngine::between_pools(bool to_fast, std::span<const int32_t> from, std::span<const int32_t> to) {
  const char* op = to_fast ? "dram_to_fast" : "fast_to_dram";
  BlockPool& source = to_fast ? dram_ : fast_;
  BlockPool& target = to_fast ? fast_ : dram_;
  check_sizes(op, from.size(), to.size());
  check_ids(op, to_fast ? "dram_blocks" : "fast_blocks", from, source, to_fast ? "DRAM" : "fast");
  check_ids(op, to_fast ? "fast_blocks" : "dram_blocks", to, target, to_fast ? "fast" : "DRAM");
  const auto n = static_cast<int32_t>(from.size());
  if (!impl_) {
    kernels::kv_copy_blocks_ref(storage(source), storage(target), from.data(), to.data(), n,
                                fast_.layout().block_bytes());
    Transfer t;
    t.bytes_ = n * fast_.layout().block_bytes();
    return t;
  }
#ifdef DEN_HAVE_CUDA
  if (n == 0) return {};
  // The DRAM pool is seen through its host address by the copy engines, its device alias by kernels.
  char* dram_for_copies = impl_->dram_host;
  char* dram_for_kernels = impl_->dram_device;
  switch (path_) {
    case TransferPath::memcpy_batch:
      to_fast ? impl_->batch_copy(dram_for_copies, impl_->fast_blocks, from, to)
              : impl_->batch_copy(impl_->fast_blocks, dram_for_copies, from, to);
      break;
    case TransferPath::staged:
      to_fast ? impl_->staged_in(from, to) : impl_->staged_out(from, to);
      break;
    case TransferPath::automatic:
    case TransferPath::kernel:
      to_fast ? impl_->kernel_copy(dram_for_kernels, impl_->fast_blocks, from, to)
              : impl_->kernel_copy(impl_->fast_blocks, dram_for_kernels, from, to);
      break;
  }
  return impl_->finish(n);
#else
  return {};
#endif
}

LayeredTransfer TransferEngine::dram_to_fast_by_layer(std::span<const int32_t> dram_blocks,
                                                      std::span<const int32_t> fast_blocks) {
  LayeredTransfer layered;
#ifdef DEN_HAVE_CUDA
  if (impl_ && !dram_blocks.empty() && dram_blocks.size() <= static_cast<size_t>(kIdsPerSlot) &&
      fast_.layout().layer_slice_bytes() % 16 == 0) {
    check_sizes("dram_to_fast_by_layer", dram_blocks.size(), fast_blocks.size());
    check_ids("dram_to_fast_by_layer", "dram_blocks", dram_blocks, dram_, "DRAM");
    check_ids("dram_to_fast_by_layer", "fast_blocks", fast_blocks, fast_, "fast");
    const kernels::KvLayout& layout = fast_.layout();
    const auto n = static_cast<int32_t>(dram_blocks.size());
    // One id upload for every layer: a slot per layer would make the host wait on early layers.
    const DeviceIds ids = impl_->upload_ids(dram_blocks, fast_blocks, impl_->copy.get());
    layered.events_ = std::make_shared<LayeredTransfer::Events>();
    layered.events_->per_layer.reserve(static_cast<size_t>(layout.n_layers));
    for (int32_t layer = 0; layer < layout.n_layers; ++layer) {
      kernels::kv_copy_block_slices_cuda(impl_->dram_device, impl_->fast_blocks, ids.a, ids.b, n, layout.block_bytes(),
                                         layer * layout.layer_slice_bytes(), layout.layer_slice_bytes(),
                                         impl_->copy.get(), kLayeredCopyCtas);
      layered.events_->per_layer.emplace_back(cudaEventDisableTiming);
      layered.events_->per_layer.back().record(impl_->copy.get());
    }
    ids.slot->free.record(impl_->copy.get());
    layered.all_ = impl_->finish(n);
    return layered;
  }
#endif
  layered.all_ = dram_to_fast(dram_blocks, fast_blocks);
  layered.all_.wait();
  return layered;
}

Transfer TransferEngine::fast_to_host(std::span<const int32_t> fast_blocks, std::span<void* const> hosts) {
  check_sizes("fast_to_host", fast_blocks.size(), hosts.size());
  check_ids("fast_to_host", "fast_blocks", fast_blocks, fast_, "fast");
  for (size_t i = 0; i < hosts.size(); ++i) {
    if (hosts[i] == nullptr) {
      throw std::invalid_argument("TransferEngine::fast_to_host: hosts[" + std::to_string(i) + "] is null");
    }
  }
  const int64_t block_bytes = fast_.layout().block_bytes();
  if (!impl_) {
    for (size_t i = 0; i < hosts.size(); ++i) {
      std::memcpy(hosts[i], storage(fast_) + fast_blocks[i] * block_bytes, static_cast<size_t>(block_bytes));
    }
  } else {
#ifdef DEN_HAVE_CUDA
    impl_->to_host(fast_blocks, hosts);
#endif
  }
  Transfer t;
  t.bytes_ = static_cast<int64_t>(hosts.size()) * block_bytes;
  return t;
}

Transfer TransferEngine::host_to_fast(std::span<const void* const> hosts, std::span<const int32_t> fast_blocks) {
  check_sizes("host_to_fast", hosts.size(), fast_blocks.size());
  check_ids("host_to_fast", "fast_blocks", fast_blocks, fast_, "fast");
  for (size_t i = 0; i < hosts.size(); ++i) {
    if (hosts[i] == nullptr) {
      throw std::invalid_argument("TransferEngine::host_to_fast: hosts[" + std::to_string(i) + "] is null");
    }
  }
  const int64_t block_bytes = fast_.layout().block_bytes();
  if (!impl_) {
    for (size_t i = 0; i < hosts.size(); ++i) {
      std::memcpy(storage(fast_) + fast_blocks[i] * block_bytes, hosts[i], static_cast<size_t>(block_bytes));
    }
  } else {
#ifdef DEN_HAVE_CUDA
    impl_->from_host(hosts, fast_blocks);
#endif
  }
  Transfer t;
  t.bytes_ = static_cast<int64_t>(hosts.size()) * block_bytes;
  return t;
}

Transfer TransferEngine::fast_to_fast(std::span<const int32_t> src_blocks, std::span<const int32_t> dst_blocks) {
  check_sizes("fast_to_fast", src_blocks.size(), dst_blocks.size());
  check_ids("fast_to_fast", "src_blocks", src_blocks, fast_, "fast");
  check_ids("fast_to_fast", "dst_blocks", dst_blocks, fast_, "fast");
  // A target that is also a source would race with its own read on the GPU.
  std::vector<int32_t> sources(src_blocks.begin(), src_blocks.end());
  std::sort(sources.begin(), sources.end());
  for (size_t i = 0; i < dst_blocks.size(); ++i) {
    if (std::binary_search(sources.begin(), sources.end(), dst_blocks[i])) {
      throw std::invalid_argument("TransferEngine::fast_to_fast: dst_blocks[" + std::to_string(i) + "] = " +
                                  std::to_string(dst_blocks[i]) + " is also a source block");
    }
  }
  const auto n = static_cast<int32_t>(src_blocks.size());
  if (!impl_) {
    kernels::kv_copy_blocks_ref(storage(fast_), storage(fast_), src_blocks.data(), dst_blocks.data(), n,
                                fast_.layout().block_bytes());
    Transfer t;
    t.bytes_ = n * fast_.layout().block_bytes();
    return t;
  }
#ifdef DEN_HAVE_CUDA
  if (n == 0) return {};
  impl_->kernel_copy(impl_->fast_blocks, impl_->fast_blocks, src_blocks, dst_blocks);
  return impl_->finish(n);
#else
  return {};
#endif
}

LinkBandwidths TransferEngine::measure(int64_t bytes) {
  if (bytes <= 0) throw std::invalid_argument("TransferEngine::measure: " + std::to_string(bytes) + " bytes");
#ifdef DEN_HAVE_CUDA
  if (impl_) return impl_->measure(bytes);
#endif
  // Host pools: the link is memcpy. Best of three after a warm-up that also faults pages in.
  std::vector<char> a(static_cast<size_t>(bytes), 1), b(static_cast<size_t>(bytes), 2);
  const auto best_of_3 = [&](char* to, const char* from) {
    double best_s = std::numeric_limits<double>::max();
    for (int i = 0; i < 4; ++i) {
      const auto start = std::chrono::steady_clock::now();
      std::memcpy(to, from, a.size());
      const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
      if (i > 0) best_s = std::min(best_s, elapsed.count());
    }
    return static_cast<double>(bytes) / std::max(best_s, 1e-9);
  };
  LinkBandwidths result;
  result.dram_to_fast = best_of_3(b.data(), a.data());
  result.fast_to_dram = best_of_3(a.data(), b.data());
  return result;
}

}  // namespace den::memory
