// RMSNorm on the GPU against the CPU reference; skips cleanly without a device.
#include <cuda_runtime.h>

#include <cmath>

#include "den/kernels/cuda_check.h"
#include "den/kernels/rmsnorm.h"
#include "test_support.h"

using namespace den::kernels;

TEST_CASE("rmsnorm_cuda matches rmsnorm_ref") {
  DEN_SKIP_UNLESS(cuda_device_available(), "no CUDA device");
  std::mt19937 rng(31);
  for (int64_t n : {37, 576, 1002, 4096}) {
    const int64_t rows = 733;
    const auto x = den::test::random_floats(rng, static_cast<size_t>(rows * n), 2.0f);
    const auto w = den::test::random_floats(rng, static_cast<size_t>(n));
    std::vector<float> ref(x.size());
    rmsnorm_ref(x.data(), w.data(), ref.data(), rows, n, 1e-5f);
    float *dx = nullptr, *dw = nullptr, *dy = nullptr;
    check(cudaMalloc(&dx, x.size() * 4));
    check(cudaMalloc(&dw, w.size() * 4));
    check(cudaMalloc(&dy, x.size() * 4));
    check(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    check(cudaMemcpy(dw, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
    check(cudaMemset(dy, 0xff, x.size() * 4));  // NaN everywhere: every element must be written
    rmsnorm_cuda(dx, dw, dy, rows, n, 1e-5f, nullptr);
    std::vector<float> got(x.size());
    check(cudaMemcpy(got.data(), dy, x.size() * 4, cudaMemcpyDeviceToHost));
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dy);
    double err = 0.0, norm = 0.0;
    for (size_t i = 0; i < got.size(); ++i) {
      REQUIRE(std::isfinite(got[i]));
      err += (got[i] - ref[i]) * static_cast<double>(got[i] - ref[i]);
      norm += ref[i] * static_cast<double>(ref[i]);
    }
    CHECK(std::sqrt(err / norm) < 1e-6);
  }
}
