// Host side of the kernel timeline (den/kernels/timeline.h).
#include "den/kernels/timeline.h"

#include <algorithm>
#include <stdexcept>

#include "den/kernels/cuda_check.h"
#include "timeline.cuh"

namespace den::kernels {
namespace {
std::vector<void (*)(unsigned long long*)>& attachers() {
  static std::vector<void (*)(unsigned long long*)> all;
  return all;
}
}  // namespace

#ifdef DEN_KERNEL_TIMELINE
void timeline_register(void (*attach)(unsigned long long* buffer)) { attachers().push_back(attach); }
void timeline_note_launch(unsigned blocks) { kernel_timeline_launches().push_back(blocks); }
#endif

bool kernel_timeline_built() {
#ifdef DEN_KERNEL_TIMELINE
  return true;
#else
  return false;
#endif
}

size_t kernel_timeline_bytes(uint64_t capacity) { return 16 + capacity * sizeof(KernelTimelineEntry); }

void kernel_timeline_attach(void* buffer, uint64_t capacity) {
  if (!kernel_timeline_built()) {
    throw std::logic_error("this build has no kernel timeline (configure with -DDEN_KERNEL_TIMELINE=ON)");
  }
  if (buffer != nullptr) {
    const uint64_t header[2] = {0, capacity};
    check(cudaMemcpy(buffer, header, sizeof header, cudaMemcpyHostToDevice));
  }
  for (auto* attach : attachers()) attach(static_cast<unsigned long long*>(buffer));
  check(cudaDeviceSynchronize());
}

void kernel_timeline_reset(void* buffer, CudaStream stream) {
  check(cudaMemsetAsync(buffer, 0, sizeof(uint64_t), stream));
}

std::vector<KernelTimelineEntry> kernel_timeline_read(const void* buffer) {
  uint64_t header[2] = {0, 0};
  check(cudaMemcpy(header, buffer, sizeof header, cudaMemcpyDeviceToHost));
  const uint64_t count = std::min<uint64_t>(header[0] & 0xffffffffu, header[1]);
  std::vector<KernelTimelineEntry> entries(count);
  if (count > 0) {
    check(cudaMemcpy(entries.data(), static_cast<const uint64_t*>(buffer) + 2, count * sizeof(KernelTimelineEntry),
                     cudaMemcpyDeviceToHost));
  }
  return entries;
}

std::vector<uint32_t>& kernel_timeline_launches() {
  static thread_local std::vector<uint32_t> launches;
  return launches;
}

}  // namespace den::kernels
