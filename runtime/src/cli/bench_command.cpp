// `den bench decode|prefill`: throughput against floors measured in the same run.
//   decode:  a step reads every weight once (the batch shares the read) plus each sequence's
//            KV, so (weight bytes + KV bytes) / bandwidth is the fastest a step can be. The
//            bandwidth is the HBM copy rate on the GPU, the memory read rate on the CPU.
//   prefill: model FLOPs = 2 x non-embedding parameters x tokens + the attention score and
//            value products, over the measured cuBLAS bf16 GEMM rate (GPU only).
// Definitions: weight bytes = every weight read per token, output head included, embedding
// table excluded. KV contents in decode cells are pseudo-random (never zeros).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "commands.h"
#include "den/engine/backend.h"
#include "den/engine/cuda_device.h"
#include "den/engine/model.h"
#include "den/engine/sampler.h"
#include "den/engine/thread_pool.h"
#include "den/kernels/fill.h"
#include "den/memory/block_pool.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GiB", bytes / double(1u << 30));
  return buf;
}

// Best-of-5 read bandwidth of a buffer far larger than the caches, each thread reading its own
// contiguous share (what the CPU matrix products do with weight rows).
double measure_read_bandwidth(engine::ThreadPool& pool, size_t bytes) {
  std::vector<float> buffer(bytes / sizeof(float));
  pool.parallel_for(static_cast<int64_t>(buffer.size()), [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) buffer[static_cast<size_t>(i)] = static_cast<float>(i & 1023);
  });
  std::vector<float> sums(static_cast<size_t>(pool.size()));
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    pool.parallel_for(static_cast<int64_t>(buffer.size()), [&](int64_t b, int64_t e, int t) {
      float acc[16] = {};
      for (int64_t i = b; i + 16 <= e; i += 16) {
        for (int l = 0; l < 16; ++l) acc[l] += buffer[static_cast<size_t>(i + l)];
      }
      sums[static_cast<size_t>(t)] = std::accumulate(acc, acc + 16, 0.0f);
    });
    best = std::max(best, static_cast<double>(bytes) / seconds_since(t0));
  }
  volatile float sink = std::accumulate(sums.begin(), sums.end(), 0.0f);
  (void)sink;
  return best;
}

struct BenchOptions {
  std::string model;
  std::string backend = "cpu";
  int threads = 0;
  int device = 0;
  int block_tokens = 16;
  // decode
  std::vector<int> batches = {1};
  std::vector<int> contexts = {128};
  int steps = 32;
  // prefill
  std::vector<int> prefill_tokens = {4096};
  int chunk = 4096;
};

struct Setup {
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<engine::Backend> backend;
  bool gpu = false;
  double bandwidth = 0;   // bytes/s
  double gemm_rate = 0;   // FLOP/s (GPU)
};

Setup open(const BenchOptions& o, bool need_gemm_rate) {
  Setup s;
  s.gpu = o.backend == "cuda";
  s.model = engine::Model::load(resolve_model_path(o.model));
  const engine::ModelConfig& c = s.model->config();
  s.backend = engine::make_backend(o.backend, *s.model, o.threads, o.device);
  std::printf("model     %s (%s): %.1f M non-embedding parameters, %.2f GiB of weights read per step, %d layers, "
              "%d/%d heads of %d\n",
              c.name.c_str(), s.model->path().c_str(), static_cast<double>(s.model->non_embedding_parameters()) / 1e6,
              static_cast<double>(s.model->weight_bytes_per_token()) / double(1u << 30), c.n_layers, c.n_heads,
              c.n_kv_heads, c.head_dim);
  if (s.gpu) {
    const engine::CudaDeviceInfo info = engine::cuda_device_info(o.device);
    const engine::CudaFloors floors = engine::measure_cuda_floors(o.device);
    s.bandwidth = floors.copy_bytes_per_second;
    s.gemm_rate = floors.gemm_flops_per_second;
    std::printf("device    %s, %d SMs; floors measured now: HBM copy %.0f GB/s (read+write), cuBLAS bf16 GEMM "
                "8192^3 %.0f TFLOP/s; KV and weights in %s\n",
                info.name.c_str(), info.sm_count, s.bandwidth / 1e9, s.gemm_rate / 1e12,
                std::string(kernels::dtype_name(s.backend->kv_dtype())).c_str());
  } else {
    engine::ThreadPool pool(o.threads);
    s.bandwidth = measure_read_bandwidth(pool, size_t{1} << 30);
    std::printf("backend   cpu, %d threads; floor: memory read bandwidth %.2f GB/s (measured now, 1 GiB, best of 5)\n",
                pool.size(), s.bandwidth / 1e9);
    if (need_gemm_rate) std::printf("(prefill ratios need the GPU's GEMM floor; the CPU prints tokens/s only)\n");
  }
  return s;
}

// A pool for `n_seqs` sequences of `tokens` positions each, its contents pseudo-random.
std::unique_ptr<memory::BlockPool> make_pool(const Setup& s, int block_tokens, int n_seqs, int tokens) {
  const kernels::KvLayout layout = s.model->kv_layout(block_tokens, s.backend->kv_dtype());
  const int64_t per_seq = (tokens + block_tokens - 1) / block_tokens;
  auto pool = std::make_unique<memory::BlockPool>(layout, per_seq * n_seqs,
                                                  s.gpu ? memory::Placement::device : memory::Placement::host, false);
  const kernels::PagedKvView view = pool->view();
  const int64_t elements = view.n_blocks * layout.block_elements();
#ifdef DEN_HAVE_CUDA
  if (s.gpu) {
    kernels::fill_random_cuda(view.blocks, layout.dtype, elements, 11, 1.0f, nullptr);
    return pool;
  }
#endif
  kernels::fill_random_ref(view.blocks, layout.dtype, elements, 11, 1.0f);
  return pool;
}

void run_decode(const BenchOptions& o) {
  Setup s = open(o, false);
  const engine::ModelConfig& c = s.model->config();
  const int64_t weight_bytes = s.model->weight_bytes_per_token();
  const int64_t kv_token_bytes = s.model->kv_layout(1, s.backend->kv_dtype()).block_bytes();
  std::printf("%6s %8s %7s %12s %10s %12s %9s %s\n", "batch", "context", "steps", "tok/s", "ms/step", "floor tok/s",
              "of floor", s.gpu ? "  attention kernel alone" : "");
  engine::SamplingParams greedy;
  greedy.temperature = 0.0f;
  for (int batch : o.batches) {
    for (int context : o.contexts) {
      const int total = context + o.steps + 4;
      const int64_t blocks = int64_t{(total + o.block_tokens - 1) / o.block_tokens} * batch;
      const double kv_bytes = static_cast<double>(blocks) * s.model->kv_layout(o.block_tokens, s.backend->kv_dtype()).block_bytes();
      if (s.gpu) {
        const engine::CudaDeviceInfo info = engine::cuda_device_info(o.device);
        const double workspace = double(batch) * (c.n_vocab + 16.0 * c.n_ff) * 8 + (1u << 30);
        if (kv_bytes + workspace > static_cast<double>(info.free_bytes)) {
          std::printf("%6d %8d   does not fit: its KV needs %s, %s of device memory is free\n", batch, context,
                      gib(kv_bytes).c_str(), gib(static_cast<double>(info.free_bytes)).c_str());
          continue;
        }
      }
      auto pool = make_pool(s, o.block_tokens, batch, total);
      const int per_seq = (total + o.block_tokens - 1) / o.block_tokens;
      std::vector<std::vector<int32_t>> tables(static_cast<size_t>(batch));
      for (int b = 0; b < batch; ++b) {
        for (int k = 0; k < per_seq; ++k) tables[static_cast<size_t>(b)].push_back(b * per_seq + k);
      }
      std::vector<int32_t> next(static_cast<size_t>(batch), std::min(1000, c.n_vocab - 1));
      std::vector<engine::SequenceInput> inputs(static_cast<size_t>(batch));
      engine::StepOutput out;
      auto step = [&](int i) {
        for (int b = 0; b < batch; ++b) {
          inputs[static_cast<size_t>(b)] = {std::span<const int32_t>(&next[static_cast<size_t>(b)], 1), context + i,
                                            tables[static_cast<size_t>(b)], engine::LogitsWanted::sample, &greedy};
        }
        s.backend->forward(inputs, pool->view(), out);
        for (int b = 0; b < batch; ++b) next[static_cast<size_t>(b)] = out.sampled[static_cast<size_t>(b)].id;
      };
      for (int i = 0; i < 3; ++i) step(i);  // warm-up: first-use costs stay out of the timing
      const auto t0 = Clock::now();
      for (int i = 3; i < 3 + o.steps; ++i) step(i);
      const double elapsed = seconds_since(t0);
      const double step_seconds = elapsed / o.steps;
      const double kv_read = double(batch) * kv_token_bytes * (context + 3 + o.steps / 2.0);
      const double floor_step = (static_cast<double>(weight_bytes) + kv_read) / s.bandwidth;
      std::string attention;
      if (s.gpu) {
        // The attention kernel on its own over this cell's KV, one layer.
        const double seconds = engine::time_decode_attention(pool->view(), c.n_heads, inputs, o.device);
        const double bytes = double(batch) * (context + 3 + o.steps) * kv_token_bytes / c.n_layers;
        char buf[96];
        std::snprintf(buf, sizeof buf, "  %.0f GB/s = %.0f%% of copy bandwidth", bytes / seconds / 1e9,
                      100.0 * bytes / seconds / s.bandwidth);
        attention = buf;
      }
      std::printf("%6d %8d %7d %12.1f %10.3f %12.1f %8.1f%%%s\n", batch, context, o.steps, batch * o.steps / elapsed,
                  step_seconds * 1e3, batch / floor_step, 100.0 * floor_step / step_seconds, attention.c_str());
      std::fflush(stdout);
    }
  }
}

void run_prefill(const BenchOptions& o) {
  Setup s = open(o, true);
  const engine::ModelConfig& c = s.model->config();
  std::printf("%8s %7s %12s %10s %12s %9s\n", "tokens", "chunk", "tok/s", "seconds", "TFLOP/s", "of GEMM");
  engine::SamplingParams greedy;
  greedy.temperature = 0.0f;
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> pick(300, c.n_vocab - 1);
  for (int tokens : o.prefill_tokens) {
    auto pool = make_pool(s, o.block_tokens, 1, tokens + 1);
    std::vector<int32_t> table(pool->capacity());
    std::iota(table.begin(), table.end(), 0);
    std::vector<int32_t> ids(static_cast<size_t>(tokens));
    for (auto& id : ids) id = pick(rng);
    engine::StepOutput out;
    auto prefill = [&] {
      for (int done = 0; done < tokens; done += o.chunk) {
        const int n = std::min(o.chunk, tokens - done);
        const bool last = done + n == tokens;
        engine::SequenceInput in{std::span(ids).subspan(static_cast<size_t>(done), static_cast<size_t>(n)), done,
                                 table, last ? engine::LogitsWanted::sample : engine::LogitsWanted::none, &greedy};
        s.backend->forward({&in, 1}, pool->view(), out);
      }
    };
    prefill();  // warm-up
    const auto t0 = Clock::now();
    prefill();
    const double elapsed = seconds_since(t0);
    const double t = tokens;
    const double flops = 2.0 * static_cast<double>(s.model->non_embedding_parameters()) * t +
                         4.0 * c.n_layers * c.n_heads * c.head_dim * t * (t + 1) / 2.0;
    if (s.gpu) {
      std::printf("%8d %7d %12.0f %10.3f %12.1f %8.1f%%\n", tokens, o.chunk, t / elapsed, elapsed, flops / elapsed / 1e12,
                  100.0 * flops / elapsed / s.gemm_rate);
    } else {
      std::printf("%8d %7d %12.1f %10.3f %12.3f %9s\n", tokens, o.chunk, t / elapsed, elapsed, flops / elapsed / 1e12,
                  "-");
    }
    std::fflush(stdout);
  }
}

void add_common(CLI::App& cmd, BenchOptions& o) {
  cmd.add_option("-m,--model", o.model, "GGUF model (default: the fetched default model)");
  cmd.add_option("--backend", o.backend, "Backend")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  cmd.add_option("-t,--threads", o.threads, "CPU threads (default: one per hardware thread)");
  cmd.add_option("--device", o.device, "CUDA device")->capture_default_str();
  cmd.add_option("--block-tokens", o.block_tokens, "Tokens per KV block")->check(CLI::Range(1, 4096))
      ->capture_default_str();
}

}  // namespace

void add_bench_commands(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks, printed with their ratio to a floor measured in the same run");
  bench->require_subcommand(1);

  auto d = std::make_shared<BenchOptions>();
  CLI::App* decode = bench->add_subcommand("decode", "Decode throughput against the memory-bandwidth floor");
  add_common(*decode, *d);
  decode->add_option("--batch", d->batches, "Batch sizes (sequences decoding together)")->capture_default_str();
  decode->add_option("--context", d->contexts, "Context lengths before decoding starts")->capture_default_str();
  decode->add_option("--tokens,--steps", d->steps, "Decode steps to time")->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  decode->callback([d] { run_decode(*d); });

  auto p = std::make_shared<BenchOptions>();
  CLI::App* prefill = bench->add_subcommand("prefill", "Prefill throughput against the GEMM floor");
  add_common(*prefill, *p);
  prefill->add_option("--tokens", p->prefill_tokens, "Prompt lengths")->capture_default_str();
  prefill->add_option("--chunk", p->chunk, "Tokens per engine step")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  prefill->callback([p] { run_prefill(*p); });

  add_bench_resume_command(*bench);
  add_bench_abuse_command(*bench);
  add_bench_agents_command(*bench);
}

}  // namespace den::runtime::cli
