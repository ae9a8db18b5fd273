// `den bench decode`: decode throughput against the memory-bandwidth floor measured in the
// same run. A decode step must read every weight once (the step's batch shares the read) plus
// each sequence's KV, so bytes per step / bandwidth is the fastest a step can be.
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
#include "den/engine/model.h"
#include "den/engine/sampler.h"
#include "den/engine/thread_pool.h"
#include "den/memory/host_block_pool.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Best-of-5 read bandwidth of a buffer far larger than the caches, with every thread reading
// its own contiguous share (what the matrix products do with weight rows).
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

struct DecodeOptions {
  std::string model;
  std::string backend = "cpu";
  int threads = 0;
  std::vector<int> batches = {1};
  std::vector<int> contexts = {128};
  int tokens = 32;
  int block_tokens = 16;
  uint64_t seed = 1;
};

void run_decode(const DecodeOptions& o) {
  const auto model = engine::Model::load(resolve_model_path(o.model));
  const engine::ModelConfig& c = model->config();
  const auto backend = engine::make_cpu_backend(*model, o.threads);
  engine::ThreadPool pool(o.threads);
  const double bandwidth = measure_read_bandwidth(pool, size_t{1} << 30);
  const int64_t weight_bytes = model->weight_bytes_per_token();
  const int64_t kv_bytes_per_token = model->kv_layout(1, backend->kv_dtype()).block_bytes();

  std::printf("model     %s (%s): %.1f M non-embedding parameters, %.1f MiB of weights read per step\n",
              c.name.c_str(), model->path().c_str(), static_cast<double>(model->non_embedding_parameters()) / 1e6,
              static_cast<double>(weight_bytes) / (1 << 20));
  std::printf("backend   cpu, %d threads; floor: memory read bandwidth %.2f GB/s (measured now, 1 GiB, best of 5)\n",
              pool.size(), bandwidth / 1e9);
  std::printf("%6s %8s %8s %12s %12s %14s %10s\n", "batch", "context", "tokens", "tok/s", "ms/step", "floor tok/s",
              "time/floor");

  std::mt19937 rng(static_cast<uint32_t>(o.seed));
  // Prompt tokens: ordinary vocabulary entries, never control tokens.
  std::uniform_int_distribution<int32_t> pick(0, c.n_vocab - 1);
  auto random_token = [&] {
    for (;;) {
      const int32_t id = pick(rng);
      if (model->tokenizer().kind(id) == engine::TokenKind::normal) return id;
    }
  };

  for (int batch : o.batches) {
    for (int context : o.contexts) {
      const int total = context + o.tokens;
      const int64_t blocks_per_seq = (total + o.block_tokens - 1) / o.block_tokens;
      memory::HostBlockPool kv_pool(model->kv_layout(o.block_tokens, backend->kv_dtype()), blocks_per_seq * batch,
                                    false);
      std::vector<memory::SequenceBlocks> seqs;
      std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(batch));
      for (int s = 0; s < batch; ++s) {
        seqs.emplace_back(kv_pool);
        seqs.back().reserve(total);
        for (int i = 0; i < std::max(context, 1); ++i) prompts[static_cast<size_t>(s)].push_back(random_token());
      }
      engine::StepOutput out;
      std::vector<int32_t> next(static_cast<size_t>(batch));
      for (int s = 0; s < batch; ++s) {  // prefill, one sequence at a time
        engine::SequenceInput in{prompts[static_cast<size_t>(s)], 0, seqs[static_cast<size_t>(s)].table(),
                                 engine::LogitsWanted::last};
        backend->forward({&in, 1}, kv_pool.view(), out);
        next[static_cast<size_t>(s)] = engine::argmax(out.row(0));
      }
      const int start = std::max(context, 1);
      std::vector<engine::SequenceInput> inputs(static_cast<size_t>(batch));
      const auto t0 = Clock::now();
      for (int step = 0; step < o.tokens; ++step) {
        for (int s = 0; s < batch; ++s) {
          inputs[static_cast<size_t>(s)] = {std::span<const int32_t>(&next[static_cast<size_t>(s)], 1), start + step,
                                            seqs[static_cast<size_t>(s)].table(), engine::LogitsWanted::last};
        }
        backend->forward(inputs, kv_pool.view(), out);
        for (int s = 0; s < batch; ++s) {
          next[static_cast<size_t>(s)] = engine::argmax(out.row(static_cast<size_t>(out.first_row[static_cast<size_t>(s)])));
        }
      }
      const double elapsed = seconds_since(t0);
      const double step_seconds = elapsed / o.tokens;
      // Average KV read per step: each sequence reads its whole context, growing by one per step.
      const double kv_read = static_cast<double>(batch) * kv_bytes_per_token * (start + o.tokens / 2.0);
      const double floor_step = (static_cast<double>(weight_bytes) + kv_read) / bandwidth;
      std::printf("%6d %8d %8d %12.1f %12.2f %14.1f %10.2f\n", batch, context, o.tokens,
                  batch * o.tokens / elapsed, step_seconds * 1e3, batch / floor_step, step_seconds / floor_step);
    }
  }
}

}  // namespace

void add_bench_commands(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks, printed with their ratio to a floor measured in the same run");
  bench->require_subcommand(1);
  auto o = std::make_shared<DecodeOptions>();
  CLI::App* decode = bench->add_subcommand("decode", "Decode throughput against the memory-bandwidth floor");
  decode->add_option("-m,--model", o->model, "GGUF model (default: the fetched default model)");
  decode->add_option("--backend", o->backend, "Backend")->check(CLI::IsMember({"cpu"}))->capture_default_str();
  decode->add_option("-t,--threads", o->threads, "CPU threads (default: one per hardware thread)");
  decode->add_option("--batch", o->batches, "Batch sizes (sequences decoding together)")->capture_default_str();
  decode->add_option("--context", o->contexts, "Context lengths before decoding starts")->capture_default_str();
  decode->add_option("--tokens", o->tokens, "Decode steps to time")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  decode->add_option("--block-tokens", o->block_tokens, "Tokens per KV block")->check(CLI::Range(1, 4096))
      ->capture_default_str();
  decode->callback([o] { run_decode(*o); });
}

}  // namespace den::runtime::cli
