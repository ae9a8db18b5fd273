// The in-graph kernel timeline: a development build's view of where a decode step's time goes
// (configure with -DDEN_KERNEL_TIMELINE=ON). Every kernel launched with PDL chaining has its
// blocks stamp the GPU's global nanosecond timer when they start, when pdl_wait() returns (the
// predecessor has completed) and when they end, into a device buffer; the host counts the
// chained launches as they are enqueued or captured, so block records can be cut per kernel.
// Nsight Systems is not on every GPU machine, and Nsight Compute serializes kernels, hiding the
// overlap that chaining buys. Without the option the kernels carry no stamps.
#pragma once

#include <cstdint>
#include <vector>

#include "den/kernels/cuda_stream.h"

namespace den::kernels {

// One block of one chained launch. Blocks take entries in the order they start, and every block
// of a launch starts before any block of the next one (a launch starts its successor only once
// all of its blocks have run pdl_allow_next()).
struct KernelTimelineEntry {
  uint64_t start_ns;       // the block's first instruction
  uint64_t wait_ns;        // pdl_wait() returned; 0 when the block exited before waiting
  uint64_t grid_and_block; // launch's block count << 32 | the block's linear index
  uint64_t end_ns;         // the block's end; 0 when it returned early
};

// Whether this build has the stamps.
bool kernel_timeline_built();

// Device buffer layout: [count, capacity, entries...] (two uint64 words, then capacity entries).
size_t kernel_timeline_bytes(uint64_t capacity);
// Points every chained kernel at `buffer` (kernel_timeline_bytes(capacity), device) and sets its
// header; nullptr detaches. Throws std::logic_error when the build has no stamps.
void kernel_timeline_attach(void* buffer, uint64_t capacity);
// Zeroes the entry count (asynchronously on `stream`) before the launches to record.
void kernel_timeline_reset(void* buffer, CudaStream stream);
// The entries recorded since the last reset (synchronous; at most the capacity).
std::vector<KernelTimelineEntry> kernel_timeline_read(const void* buffer);
// Block counts of the chained launches enqueued or captured on this thread since the last
// clear, in order.
std::vector<uint32_t>& kernel_timeline_launches();

}  // namespace den::kernels
