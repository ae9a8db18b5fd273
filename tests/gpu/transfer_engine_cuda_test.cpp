// The transfer engine on a GPU: an HBM fast pool and a pinned DRAM pool. Every op on every
// DRAM <-> fast path (kernel, memcpy-batch, staged) against a byte-exact model of both pools,
// and a throughput table for scattered 16/32/64 KiB blocks next to the measured link speed.
// Read the table from stdout: `den_gpu_tests -tc='*transfer*'` (see the test case's comment).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "den/memory/transfer_engine.h"
#include "gpu_support.h"

using namespace den;
using memory::TransferPath;

namespace {

constexpr TransferPath kPaths[] = {TransferPath::kernel, TransferPath::memcpy_batch, TransferPath::staged};

// f16 blocks of 2 heads x 64 x 8 tokens per K/V slab: 4 KiB per layer, so bytes / 4096 layers.
kernels::KvLayout layout_of(int64_t block_bytes) {
  if (block_bytes < 4096) return {1, 1, static_cast<int32_t>(block_bytes / 4), 1, kernels::DType::f16};
  return {static_cast<int32_t>(block_bytes / 4096), 2, 64, 8, kernels::DType::f16};
}

// splitmix64: fast enough to fill a few GiB of pools with distinct bytes.
void fill_random(char* p, size_t bytes, uint64_t seed) {
  for (size_t i = 0; i + 8 <= bytes; i += 8) {
    uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::memcpy(p + i, &z, 8);
  }
}

size_t pool_bytes(const memory::BlockPool& pool) {
  return static_cast<size_t>(pool.capacity() * pool.layout().block_bytes());
}
char* pool_data(const memory::BlockPool& pool) { return static_cast<char*>(pool.view().blocks); }

std::vector<char> read_pool(const memory::BlockPool& pool) {
  std::vector<char> v(pool_bytes(pool));
  if (pool.placement() == memory::Placement::device) {
    kernels::check(cudaMemcpy(v.data(), pool_data(pool), v.size(), cudaMemcpyDeviceToHost));
  } else {
    std::memcpy(v.data(), pool_data(pool), v.size());
  }
  return v;
}

// `n` distinct ids of [0, capacity): stretches of 1-8 consecutive ids in random order, so that
// requests hold some runs to coalesce and are otherwise scattered.
std::vector<int32_t> chunked_ids(std::mt19937& rng, int64_t capacity, size_t n) {
  std::vector<std::pair<int32_t, int32_t>> stretches;  // [first, end)
  std::uniform_int_distribution<int32_t> length(1, 8);
  for (int64_t first = 0; first < capacity;) {
    const int64_t end = std::min<int64_t>(capacity, first + length(rng));
    stretches.emplace_back(static_cast<int32_t>(first), static_cast<int32_t>(end));
    first = end;
  }
  std::shuffle(stretches.begin(), stretches.end(), rng);
  std::vector<int32_t> ids;
  for (const auto& [first, end] : stretches) {
    for (int32_t id = first; id < end && ids.size() < n; ++id) ids.push_back(id);
  }
  return ids;
}

std::vector<int32_t> permutation(std::mt19937& rng, int64_t n) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  return ids;
}

// The model: to[to_ids[i]] = from[from_ids[i]].
void apply(std::vector<char>& to, const std::vector<char>& from, const std::vector<int32_t>& from_ids,
           const std::vector<int32_t>& to_ids, int64_t block_bytes) {
  for (size_t i = 0; i < from_ids.size(); ++i) {
    std::memcpy(to.data() + to_ids[i] * block_bytes, from.data() + from_ids[i] * block_bytes,
                static_cast<size_t>(block_bytes));
  }
}

std::string size_name(int64_t bytes) {
  if (bytes >= (1 << 20)) return std::to_string(bytes >> 20) + " MiB";
  if (bytes >= (1 << 10)) return std::to_string(bytes >> 10) + " KiB";
  return std::to_string(bytes) + " B";
}

}  // namespace

TEST_CASE("transfer engine (GPU): every op on every path moves exactly the expected bytes") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(81);
  // 256 B: > 65536 blocks in one request (id chunks, batch chunks, two staging chunks);
  // 20 KiB: blocks that end in a partial tile of the copy kernel.
  for (int64_t bb : {int64_t{256}, int64_t{16} << 10, int64_t{20} << 10, int64_t{32} << 10, int64_t{64} << 10,
                     int64_t{2} << 20}) {
    const auto layout = layout_of(bb);
    REQUIRE(layout.block_bytes() == bb);
    // At least three 32 MiB staging chunks per host request, at least 300 blocks.
    const int64_t fast_cap = bb == 256 ? 100000 : std::max<int64_t>(300, (int64_t{96} << 20) / bb);
    const int64_t dram_cap = fast_cap * 4 / 3;
    memory::BlockPool fast(layout, fast_cap, memory::Placement::device, false);
    memory::BlockPool dram(layout, dram_cap, memory::Placement::pinned_host, false);
    REQUIRE(dram.is_pinned());
    {
      std::vector<char> init(pool_bytes(fast));
      fill_random(init.data(), init.size(), static_cast<uint64_t>(bb));
      kernels::check(cudaMemcpy(pool_data(fast), init.data(), init.size(), cudaMemcpyHostToDevice));
      fill_random(pool_data(dram), pool_bytes(dram), static_cast<uint64_t>(bb) + 1);
    }
    auto fast_model = read_pool(fast), dram_model = read_pool(dram);
    const auto n = static_cast<size_t>(fast_cap * 3 / 4);

    for (TransferPath path : kPaths) {
      memory::TransferEngine engine(fast, dram, path);
      const std::string what = size_name(bb) + " blocks, " + memory::transfer_path_name(path) + ", " +
                               std::to_string(n) + " per request";
      CAPTURE(what);
      {
        const auto from = chunked_ids(rng, dram_cap, n), to = chunked_ids(rng, fast_cap, n);
        auto t = engine.dram_to_fast(from, to);
        t.wait();
        t.wait();
        CHECK(t.ready());
        apply(fast_model, dram_model, from, to, bb);
        CHECK(read_pool(fast) == fast_model);
      }
      {
        const auto from = chunked_ids(rng, fast_cap, n), to = chunked_ids(rng, dram_cap, n);
        engine.fast_to_dram(from, to).wait();
        apply(dram_model, fast_model, from, to, bb);
        CHECK(read_pool(dram) == dram_model);
      }
      {  // out and back in without waiting in between: requests run in issue order
        const auto out = chunked_ids(rng, fast_cap, n), parked = chunked_ids(rng, dram_cap, n);
        const auto back = chunked_ids(rng, fast_cap, n);
        auto first = engine.fast_to_dram(out, parked);
        auto second = engine.dram_to_fast(parked, back);
        second.wait();
        first.wait();
        apply(dram_model, fast_model, out, parked, bb);
        apply(fast_model, dram_model, parked, back, bb);
        CHECK(read_pool(fast) == fast_model);
        CHECK(read_pool(dram) == dram_model);
      }
      {  // copy-on-write: disjoint sources and targets
        const auto ids = chunked_ids(rng, fast_cap, 2 * (n / 2));
        const std::vector<int32_t> from(ids.begin(), ids.begin() + static_cast<long>(n / 2));
        const std::vector<int32_t> to(ids.begin() + static_cast<long>(n / 2), ids.end());
        engine.fast_to_fast(from, to).wait();
        apply(fast_model, fast_model, from, to, bb);
        CHECK(read_pool(fast) == fast_model);
      }
      {  // pageable host buffers in shuffled order, through pinned staging
        std::vector<char> buffer(n * static_cast<size_t>(bb));
        const auto slots = permutation(rng, static_cast<int64_t>(n));
        std::vector<void*> hosts(n);
        for (size_t i = 0; i < n; ++i) hosts[i] = buffer.data() + slots[i] * bb;
        const auto from = chunked_ids(rng, fast_cap, n);
        auto out = engine.fast_to_host(from, hosts);
        CHECK(out.ready());  // synchronous by contract
        bool same = true;
        for (size_t i = 0; i < n; ++i) {
          same = same && std::memcmp(hosts[i], fast_model.data() + from[i] * bb, static_cast<size_t>(bb)) == 0;
        }
        CHECK(same);
        fill_random(buffer.data(), buffer.size(), rng());
        const auto to = chunked_ids(rng, fast_cap, n);
        const std::vector<const void*> sources(hosts.begin(), hosts.end());
        CHECK(engine.host_to_fast(sources, to).ready());
        for (size_t i = 0; i < n; ++i) std::memcpy(fast_model.data() + to[i] * bb, hosts[i], static_cast<size_t>(bb));
        CHECK(read_pool(fast) == fast_model);
      }
      {  // pinned staging read in place by the copy kernel, the buffer reused from the pool
        for (int round = 0; round < 2; ++round) {
          memory::HostStaging staging = engine.host_staging(static_cast<int64_t>(n) * bb);
          REQUIRE(staging.bytes() >= static_cast<int64_t>(n) * bb);
          fill_random(static_cast<char*>(staging.data()), n * static_cast<size_t>(bb), rng());
          const auto to = chunked_ids(rng, fast_cap, n);
          CHECK(engine.staging_to_fast(staging, to).ready());
          const auto* p = static_cast<const char*>(staging.data());
          for (size_t i = 0; i < n; ++i) std::memcpy(fast_model.data() + to[i] * bb, p + i * bb, static_cast<size_t>(bb));
          CHECK(read_pool(fast) == fast_model);
        }
      }
    }
  }
}

TEST_CASE("transfer engine (GPU): a dropped Transfer waits, and pools that cannot work together are refused") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(82);
  const auto layout = layout_of(int64_t{64} << 10);
  memory::BlockPool fast(layout, 2048, memory::Placement::device, false);
  memory::BlockPool dram(layout, 2048, memory::Placement::pinned_host, false);
  fill_random(pool_data(dram), pool_bytes(dram), 5);
  const auto ids = permutation(rng, 2048);
  for (TransferPath path : kPaths) {
    memory::TransferEngine engine(fast, dram, path);
    kernels::check(cudaMemset(pool_data(fast), 0, pool_bytes(fast)));
    kernels::check(cudaDeviceSynchronize());
    std::vector<char> model(pool_bytes(fast)), got(pool_bytes(fast));
    apply(model, read_pool(dram), ids, ids, layout.block_bytes());
    { auto dropped = engine.dram_to_fast(ids, ids); }  // 128 MiB in flight when dropped
    // The legacy stream does not order against the engine's non-blocking stream: only the
    // destructor's wait makes this read see the whole copy.
    kernels::check(cudaMemcpy(got.data(), pool_data(fast), got.size(), cudaMemcpyDeviceToHost));
    CHECK(got == model);
  }
  memory::BlockPool plain(layout, 4, memory::Placement::host, false);
  CHECK_THROWS_WITH_AS(memory::TransferEngine(fast, plain), doctest::Contains("pinned DRAM pool"), std::invalid_argument);
  memory::BlockPool other(layout_of(int64_t{32} << 10), 4, memory::Placement::pinned_host, false);
  CHECK_THROWS_WITH_AS(memory::TransferEngine(fast, other), doctest::Contains("different layouts"), std::invalid_argument);
}

// The throughput table (stdout). 1 GiB per request, block ids a random permutation on both
// sides (nothing coalesces), wall time from issuing the request to wait() returning, best of
// three after a warm-up. "% link" is against measure(256 MiB): one large pinned <-> HBM copy.
// "host (pageable)" rows are fast_to_host / host_to_fast into shuffled malloc'd blocks.
TEST_CASE("transfer engine (GPU): throughput of scattered blocks per path") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(83);
  const int64_t total = int64_t{1} << 30;
  cudaDeviceProp prop{};
  kernels::check(cudaGetDeviceProperties(&prop, 0));

  memory::LinkBandwidths link;
  TransferPath default_path = TransferPath::automatic;
  {
    const auto layout = layout_of(int64_t{64} << 10);
    memory::BlockPool fast(layout, 1, memory::Placement::device, false);
    memory::BlockPool dram(layout, 1, memory::Placement::pinned_host, false);
    memory::TransferEngine engine(fast, dram, memory::transfer_path_from_env());
    link = engine.measure(int64_t{256} << 20);
    default_path = engine.path();
  }
  std::printf("\ntransfer engine throughput on %s: 1 GiB per request, random permutation of ids on both sides\n",
              prop.name);
  std::printf("link, measure(256 MiB): pinned->HBM %.1f GB/s, HBM->pinned %.1f GB/s\n", link.dram_to_fast / 1e9,
              link.fast_to_dram / 1e9);
  std::printf("engine path from DEN_TRANSFER_PATH (unset = auto): %s\n", memory::transfer_path_name(default_path));
  std::printf("%-8s %-16s %12s %7s %12s %7s\n", "block", "path", "dram->fast", "% link", "fast->dram", "% link");

  const auto best_gbps = [](int64_t bytes, const auto& run) {
    run();  // warm-up
    double best_s = 1e30;
    for (int i = 0; i < 3; ++i) {
      const auto start = std::chrono::steady_clock::now();
      run();
      best_s = std::min(best_s, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return static_cast<double>(bytes) / best_s / 1e9;
  };

  for (int64_t bb : {int64_t{16} << 10, int64_t{32} << 10, int64_t{64} << 10}) {
    const auto layout = layout_of(bb);
    const int64_t blocks = total / bb;
    memory::BlockPool fast(layout, blocks, memory::Placement::device, false);
    memory::BlockPool dram(layout, blocks, memory::Placement::pinned_host, false);
    fill_random(pool_data(dram), pool_bytes(dram), 9);
    const auto fast_ids = permutation(rng, blocks), dram_ids = permutation(rng, blocks);
    for (TransferPath path : kPaths) {
      memory::TransferEngine engine(fast, dram, path);
      const double in = best_gbps(total, [&] { engine.dram_to_fast(dram_ids, fast_ids).wait(); });
      const double out = best_gbps(total, [&] { engine.fast_to_dram(fast_ids, dram_ids).wait(); });
      std::printf("%-8s %-16s %7.1f GB/s %6.0f%% %7.1f GB/s %6.0f%%\n", size_name(bb).c_str(),
                  memory::transfer_path_name(path), in, 100 * in * 1e9 / link.dram_to_fast, out,
                  100 * out * 1e9 / link.fast_to_dram);
      std::fflush(stdout);
      // The round trips must not have changed a byte of what came in from DRAM.
      const auto model = read_pool(dram);
      engine.dram_to_fast(dram_ids, fast_ids).wait();
      const auto got = read_pool(fast);
      bool same = true;
      for (int i = 0; i < 64; ++i) {
        const size_t k = static_cast<size_t>(rng() % static_cast<uint32_t>(blocks));
        same = same && std::memcmp(got.data() + fast_ids[k] * bb, model.data() + dram_ids[k] * bb,
                                   static_cast<size_t>(bb)) == 0;
      }
      CHECK(same);
    }
    {
      memory::TransferEngine engine(fast, dram);
      std::vector<char> buffer(static_cast<size_t>(total));
      std::memset(buffer.data(), 3, buffer.size());  // fault the pages in before timing
      const auto slots = permutation(rng, blocks);
      std::vector<void*> hosts(static_cast<size_t>(blocks));
      for (size_t i = 0; i < hosts.size(); ++i) hosts[i] = buffer.data() + slots[i] * bb;
      const std::vector<const void*> sources(hosts.begin(), hosts.end());
      const double in = best_gbps(total, [&] { engine.host_to_fast(sources, fast_ids).wait(); });
      const double out = best_gbps(total, [&] { engine.fast_to_host(fast_ids, hosts).wait(); });
      std::printf("%-8s %-16s %7.1f GB/s %6.0f%% %7.1f GB/s %6.0f%%\n", size_name(bb).c_str(), "host (pageable)", in,
                  100 * in * 1e9 / link.dram_to_fast, out, 100 * out * 1e9 / link.fast_to_dram);
      std::fflush(stdout);
    }
  }
  std::printf("(\"host (pageable)\": host_to_fast in the dram->fast column, fast_to_host in fast->dram)\n\n");
}
