// Helpers of the GPU suite: device copies of host vectors, and the error measures the issue
// asks for (normalised MSE and max-abs), printed for every comparison.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "den/kernels/cuda_check.h"
#include "den/kernels/cuda_resources.h"
#include "den/kernels/half.h"
#include "test_support.h"

namespace den::test {

template <typename T>
kernels::DeviceBuffer to_device(const std::vector<T>& v) {
  kernels::DeviceBuffer b(std::max<size_t>(v.size() * sizeof(T), 16));
  if (!v.empty()) kernels::check(cudaMemcpy(b.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return b;
}

template <typename T>
std::vector<T> to_host(const kernels::DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  kernels::check(cudaDeviceSynchronize());
  if (n > 0) kernels::check(cudaMemcpy(v.data(), b.get(), n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

struct ErrorStats {
  double nmse = 0.0;
  double max_abs = 0.0;
  bool finite = true;
};

// sum (got - ref)^2 / sum ref^2, and max |got - ref|.
template <typename A, typename B>
ErrorStats compare(const A& got, const B& ref) {
  ErrorStats s;
  double err = 0.0, norm = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = got[i], r = ref[i];
    if (!std::isfinite(g)) s.finite = false;
    err += (g - r) * (g - r);
    norm += r * r;
    s.max_abs = std::max(s.max_abs, std::abs(g - r));
  }
  s.nmse = norm > 0.0 ? err / norm : err;
  return s;
}

inline std::vector<float> bf16_to_floats(const std::vector<uint16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = kernels::bf16_to_f32(v[i]);
  return f;
}
inline std::vector<float> fp16_to_floats(const std::vector<uint16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = kernels::fp16_to_f32(v[i]);
  return f;
}

// Checks the error bound and reports both measures in the log.
inline void check_close(const ErrorStats& stats, double bound, const std::string& what) {
  MESSAGE(what << ": nmse " << stats.nmse << ", max-abs " << stats.max_abs);
  CHECK(stats.finite);
  CHECK(stats.nmse <= bound);
}

}  // namespace den::test

// Without a device the whole test process ends with exit code 77, which CTest reports as
// "Skipped" (SKIP_RETURN_CODE): a CI run without a GPU shows every GPU test as not run.
inline void skip_without_gpu() {
  if (den::kernels::cuda_device_available()) return;
  std::fprintf(stderr, "skipped: no CUDA device\n");
  std::fflush(stderr);
  std::_Exit(77);
}
#define DEN_SKIP_WITHOUT_GPU() skip_without_gpu()
