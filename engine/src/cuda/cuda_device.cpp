// Device information and measured floors (HBM copy bandwidth, cuBLAS bf16 GEMM rate).
#include "den/engine/cuda_device.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cublas_handle.h"
#include "den/kernels/attention.h"
#include "den/kernels/cuda_resources.h"
#include "den/kernels/fill.h"
#include "step_plan.h"

namespace den::engine {

CudaDeviceInfo cuda_device_info(int device) {
  kernels::check(cudaSetDevice(device));
  cudaDeviceProp prop{};
  kernels::check(cudaGetDeviceProperties(&prop, device));
  CudaDeviceInfo info;
  info.name = prop.name;
  info.sm_count = prop.multiProcessorCount;
  kernels::check(cudaMemGetInfo(&info.free_bytes, &info.total_bytes));
  return info;
}

CudaFloors measure_cuda_floors(int device) {
  kernels::check(cudaSetDevice(device));
  kernels::Stream stream;
  kernels::Event start, stop;
  CudaFloors floors;
  {
    const size_t bytes = size_t{2} << 30;
    kernels::DeviceBuffer a(bytes), b(bytes);
    kernels::fill_random_cuda(a.get(), kernels::DType::bf16, static_cast<int64_t>(bytes / 2), 1, 1.0f, stream.get());
    float best = 1e30f;
    for (int rep = 0; rep < 8; ++rep) {
      start.record(stream.get());
      kernels::check(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, stream.get()));
      stop.record(stream.get());
      stop.synchronize();
      if (rep >= 2) best = std::min(best, stop.elapsed_ms_since(start));
    }
    floors.copy_bytes_per_second = 2.0 * static_cast<double>(bytes) / (best * 1e-3);
  }
  {
    const int64_t n = 8192;
    kernels::DeviceBuffer a(n * n * 2), b(n * n * 2), c(n * n * 4);
    kernels::fill_random_cuda(a.get(), kernels::DType::bf16, n * n, 2, 1.0f, stream.get());
    kernels::fill_random_cuda(b.get(), kernels::DType::bf16, n * n, 3, 1.0f, stream.get());
    cuda::CublasHandle cublas(stream.get(), size_t{32} << 20);
    float best = 1e30f;
    for (int rep = 0; rep < 10; ++rep) {
      start.record(stream.get());
      cublas.matmul(a.get(), kernels::DType::bf16, b.get(), n, n, n, c.as<float>(), 0.0f);
      stop.record(stream.get());
      stop.synchronize();
      if (rep >= 3) best = std::min(best, stop.elapsed_ms_since(start));
    }
    floors.gemm_flops_per_second = 2.0 * static_cast<double>(n) * n * n / (best * 1e-3);
  }
  return floors;
}

double time_decode_attention(const kernels::PagedKvView& kv, int32_t n_heads, std::span<const SequenceInput> batch,
                             int device) {
  kernels::check(cudaSetDevice(device));
  kernels::Stream stream;
  cuda::StepPlan plan;
  const bool fast = kernels::attention_fast_path(kv.layout.dtype, kv.layout.head_dim);
  plan.build(batch, n_heads, fast,
             kernels::decode_attention_resident_blocks(kv.layout.dtype, kv.layout.head_dim, n_heads / kv.layout.n_kv_heads),
             kv.layout.n_kv_heads);
  plan.upload(stream.get());
  const int64_t q_elements = int64_t{plan.n_tokens()} * n_heads * kv.layout.head_dim;
  kernels::DeviceBuffer q(static_cast<size_t>(q_elements * kernels::dtype_bytes(kv.layout.dtype)));
  kernels::DeviceBuffer out(q.bytes());
  kernels::DeviceBuffer workspace(plan.attention_workspace_bytes(n_heads, kv.layout.head_dim));
  kernels::check(cudaMemsetAsync(workspace.get(), 0, workspace.bytes(), stream.get()));
  kernels::fill_random_cuda(q.get(), kv.layout.dtype, q_elements, 9, 1.0f, stream.get());
  const float scale = 1.0f / std::sqrt(static_cast<float>(kv.layout.head_dim));
  const kernels::PagedBatch paged = plan.paged_batch();
  const kernels::AttentionPlan attention = plan.attention(workspace.as<float>());
  std::vector<float> times;
  kernels::Event start, stop;
  for (int rep = 0; rep < 12; ++rep) {
    start.record(stream.get());
    kernels::paged_attention_cuda(q.get(), out.get(), kv, paged, attention, 0, n_heads, scale, stream.get());
    stop.record(stream.get());
    stop.synchronize();
    if (rep >= 2) times.push_back(stop.elapsed_ms_since(start));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2] * 1e-3;
}

}  // namespace den::engine
