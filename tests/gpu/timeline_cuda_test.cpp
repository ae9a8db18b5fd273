// The kernel timeline of a -DDEN_KERNEL_TIMELINE=ON build: one record per block of each chained
// launch, in launch order, with start <= wait <= end. Other builds refuse to attach one.
#include <stdexcept>

#include "den/kernels/gemv.h"
#include "den/kernels/sampling.h"
#include "den/kernels/timeline.h"
#include "gpu_support.h"

using namespace den;

TEST_CASE("kernel timeline: a record per block of each chained launch, in launch order") {
  DEN_SKIP_WITHOUT_GPU();
  constexpr uint64_t kCapacity = 4096;
  kernels::DeviceBuffer buffer(kernels::kernel_timeline_bytes(kCapacity));
  if (!kernels::kernel_timeline_built()) {
    CHECK_THROWS_AS(kernels::kernel_timeline_attach(buffer.get(), kCapacity), std::logic_error);
    MESSAGE("skipped: this build has no kernel timeline (configure with -DDEN_KERNEL_TIMELINE=ON)");
    return;
  }
  std::mt19937 rng(67);
  const int64_t n_in = 2048, n_out = 3000;
  const auto w = test::to_device(test::random_floats(rng, static_cast<size_t>(n_in * n_out), 0.05f));
  const auto x = test::to_device(test::random_floats(rng, static_cast<size_t>(n_in), 1.0f));
  kernels::DeviceBuffer y(static_cast<size_t>(n_out) * 4), token(4), workspace(kernels::argmax_workspace_bytes(1));
  kernels::check(cudaMemset(workspace.get(), 0, workspace.bytes()));

  kernels::kernel_timeline_attach(buffer.get(), kCapacity);
  kernels::kernel_timeline_launches().clear();
  kernels::kernel_timeline_reset(buffer.get(), nullptr);
  for (int i = 0; i < 2; ++i) {
    kernels::gemv_cuda(w.get(), kernels::DType::f32, n_in, n_out, {x.get()}, 1, kernels::GemvEpilogue::store, y.get(),
                       nullptr, nullptr);
  }
  kernels::argmax_cuda(y.as<float>(), 1, static_cast<int32_t>(n_out), token.as<int32_t>(), workspace.get(), nullptr);
  kernels::check(cudaDeviceSynchronize());
  const auto entries = kernels::kernel_timeline_read(buffer.get());
  const std::vector<uint32_t> launches = kernels::kernel_timeline_launches();
  kernels::kernel_timeline_attach(nullptr, 0);  // the other tests run without stamps

  REQUIRE(launches.size() == 3);
  size_t total = 0;
  for (uint32_t n : launches) total += n;
  REQUIRE(entries.size() == total);
  size_t at = 0;
  uint64_t previous_latest_start = 0;
  for (uint32_t n : launches) {
    uint64_t earliest = UINT64_MAX, latest = 0;
    std::vector<bool> seen(n, false);
    for (size_t i = at; i < at + n; ++i) {
      const auto& e = entries[i];
      CHECK((e.grid_and_block >> 32) == n);
      const uint32_t block = static_cast<uint32_t>(e.grid_and_block);
      REQUIRE(block < n);
      CHECK_FALSE(seen[block]);
      seen[block] = true;
      CHECK(e.wait_ns >= e.start_ns);
      CHECK(e.end_ns >= e.wait_ns);
      earliest = std::min(earliest, e.start_ns);
      latest = std::max(latest, e.start_ns);
    }
    CHECK(earliest >= previous_latest_start);  // a launch's blocks all start before the next one's
    previous_latest_start = latest;
    at += n;
  }
}
