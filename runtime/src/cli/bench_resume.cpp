// `den bench resume`: how fast a session comes back. For each length, one session is prefilled
// (the recompute time), then its first new token is timed with its KV in the fast pool, after a
// hibernate to DRAM, and after a checkpoint + hibernate to SSD. Floors are measured in the same
// run: KV bytes over the pinned DRAM -> fast pool copy rate, and over the O_DIRECT read rate of
// a file of the same size in the state directory (the segment reads use O_DIRECT too, so the
// page cache helps neither). Also: scattered 16-64 KiB block transfers against the copy floor,
// and what the restore-vs-recompute cost model picks next to what was measured.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "commands.h"
#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/engine/sampler.h"
#include "den/memory/file_io.h"
#include "den/memory/session_manager.h"
#include "den/memory/transfer_engine.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct ResumeOptions {
  std::string model;
  std::string backend = "cpu";
  int threads = 0;
  int device = 0;
  int block_tokens = 16;
  std::vector<int> tokens = {4096};
  int chunk = 4096;
  std::string state_dir;
  bool scattered = true;
};

// The disk's floor for checkpoints and wakes: an O_DIRECT write of a file in 64 MiB requests,
// then reads of its first `bytes` both ways the disk may like best (one stream of 64 MiB
// requests; four threads of 16 MiB requests), keeping the faster. The file stays for the run so
// that each SSD wake can be timed next to a floor read of its own size.
class DiskFloor {
 public:
  DiskFloor(const std::filesystem::path& dir, int64_t bytes) : path_(dir / "disk-floor.tmp") {
    bytes_ = std::max<int64_t>(kChunk, (bytes + kChunk - 1) / kChunk * kChunk);
    memory::AlignedBuffer buffer(kChunk);
    std::fill_n(static_cast<char*>(buffer.data()), kChunk, 'k');
    memory::remove_file(path_);
    memory::File file(path_, memory::File::Mode::create_exclusive, true);
    const auto t0 = Clock::now();
    for (int64_t off = 0; off < bytes_; off += kChunk) file.write_at(buffer.data(), kChunk, off);
    file.sync();
    write_rate_ = static_cast<double>(bytes_) / seconds_since(t0);
    direct_ = file.is_direct();
  }
  ~DiskFloor() {
    try {
      memory::remove_file(path_);
    } catch (const std::exception&) {
    }
  }
  DiskFloor(const DiskFloor&) = delete;
  DiskFloor& operator=(const DiskFloor&) = delete;

  double write_rate() const { return write_rate_; }
  bool direct() const { return direct_; }

  // Read bytes per second over the first `bytes` of the file (whole 64 MiB pieces, at least one).
  double read_rate(int64_t bytes) const {
    bytes = std::clamp<int64_t>((bytes + kChunk - 1) / kChunk * kChunk, kChunk, bytes_);
    memory::File file(path_, memory::File::Mode::read, true);
    memory::AlignedBuffer buffer(kChunk);
    const auto t0 = Clock::now();
    for (int64_t off = 0; off < bytes; off += kChunk) file.read_at(buffer.data(), kChunk, off);
    double rate = static_cast<double>(bytes) / seconds_since(t0);

    constexpr int kThreads = 4;
    constexpr int64_t kPiece = 16 << 20;
    std::vector<std::thread> readers;
    const auto t1 = Clock::now();
    for (int t = 0; t < kThreads; ++t) {
      readers.emplace_back([&, t] {
        memory::AlignedBuffer piece(kPiece);
        for (int64_t off = t * kPiece; off < bytes; off += kThreads * kPiece) file.read_at(piece.data(), kPiece, off);
      });
    }
    for (auto& r : readers) r.join();
    return std::max(rate, static_cast<double>(bytes) / seconds_since(t1));
  }

 private:
  static constexpr int64_t kChunk = 64 << 20;
  std::filesystem::path path_;
  int64_t bytes_ = 0;
  double write_rate_ = 0;
  bool direct_ = false;
};

// Scattered whole-block copies between pinned DRAM and the fast pool, blocks of 16, 32 and 64
// KiB in random order on both sides, against one large copy.
void run_scattered(bool gpu, const memory::LinkBandwidths& floor) {
  std::printf("\nscattered blocks (random ids on both sides, 1 GiB per direction):\n");
  std::printf("%10s %14s %10s %14s %10s\n", "block", "dram->fast", "of floor", "fast->dram", "of floor");
  for (int kib : {16, 32, 64}) {
    // One layer, one KV head of 128 bf16: 512 bytes per token-slab pair; block_tokens sets the size.
    const kernels::KvLayout layout{1, 1, 128, kib * 1024 / 512, kernels::DType::bf16};
    const int64_t n = (int64_t{1} << 30) / layout.block_bytes();
    memory::BlockPool fast(layout, n, gpu ? memory::Placement::device : memory::Placement::host, false);
    memory::BlockPool dram(layout, n, gpu ? memory::Placement::pinned_host : memory::Placement::host, false);
    memory::TransferEngine engine(fast, dram);
    std::vector<int32_t> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
    std::iota(a.begin(), a.end(), 0);
    std::iota(b.begin(), b.end(), 0);
    std::mt19937 rng(7);
    std::shuffle(a.begin(), a.end(), rng);
    std::shuffle(b.begin(), b.end(), rng);
    auto best = [&](auto&& copy) {
      double rate = 0;
      for (int rep = 0; rep < 3; ++rep) {
        const auto t0 = Clock::now();
        copy().wait();
        rate = std::max(rate, static_cast<double>(n * layout.block_bytes()) / seconds_since(t0));
      }
      return rate;
    };
    const double up = best([&] { return engine.dram_to_fast(a, b); });
    const double down = best([&] { return engine.fast_to_dram(b, a); });
    std::printf("%7d KiB %11.1f GB/s %9.0f%% %11.1f GB/s %9.0f%%\n", kib, up / 1e9, 100 * up / floor.dram_to_fast,
                down / 1e9, 100 * down / floor.fast_to_dram);
  }
}

void run_resume(const ResumeOptions& o) {
  const bool gpu = o.backend == "cuda";
  auto model = engine::Model::load(resolve_model_path(o.model));
  auto backend = engine::make_backend(o.backend, *model, o.threads, o.device);
  const engine::ModelConfig& c = model->config();
  const kernels::KvLayout layout = model->kv_layout(o.block_tokens, backend->kv_dtype());
  const int64_t bytes_per_token = layout.block_bytes() / layout.block_tokens;
  const int max_tokens = *std::max_element(o.tokens.begin(), o.tokens.end());
  // Room for the longest session, the four new turns appended to it, and the next tokens.
  const int64_t blocks = (max_tokens + 4 * 1024 + 64 + o.block_tokens - 1) / o.block_tokens;

  std::filesystem::path state = o.state_dir.empty()
                                    ? std::filesystem::temp_directory_path() / ("den-bench-resume-" + std::to_string(getpid()))
                                    : std::filesystem::path(o.state_dir);
  std::filesystem::remove_all(state);
  std::filesystem::create_directories(state);

  memory::MemoryConfig mc;
  mc.layout = layout;
  mc.model_fingerprint = model->fingerprint();
  mc.fast_blocks = blocks;
  mc.fast_placement = gpu ? memory::Placement::device : memory::Placement::host;
  mc.dram_blocks = blocks;
  mc.state_dir = state;
  mc.cost_model = false;  // each tier is timed as it is; the model's choice is printed after
  memory::SessionManager m(mc);

  std::printf("model     %s (%s): %d layers, %d KV heads of %d, KV %s: %.0f KiB per token, blocks of %d tokens "
              "(%.0f KiB)\n",
              c.name.c_str(), model->path().c_str(), c.n_layers, c.n_kv_heads, c.head_dim,
              std::string(kernels::dtype_name(layout.dtype)).c_str(), static_cast<double>(bytes_per_token) / 1024,
              o.block_tokens, static_cast<double>(layout.block_bytes()) / 1024);
  const int64_t floor_bytes = std::min<int64_t>(int64_t{1} << 30, blocks * layout.block_bytes());
  const memory::LinkBandwidths links = m.measure_links(floor_bytes);
  const DiskFloor disk(state, static_cast<int64_t>(max_tokens) * bytes_per_token);
  if (!disk.direct()) std::printf("(the state directory refuses O_DIRECT: disk figures include the page cache)\n");
  const double disk_write = disk.write_rate();
  const double disk_read = disk.read_rate(static_cast<int64_t>(max_tokens) * bytes_per_token);
  std::printf("floors    dram->fast %.1f GB/s, fast->dram %.1f GB/s (pinned, %.0f MiB copies); disk %.2f GB/s read, "
              "%.2f GB/s write (O_DIRECT, best of 1 and 4 streams, %s)\n",
              links.dram_to_fast / 1e9, links.fast_to_dram / 1e9, static_cast<double>(floor_bytes) / (1 << 20),
              disk_read / 1e9, disk_write / 1e9, state.c_str());
  m.set_link_bandwidths(links.dram_to_fast, disk_read);

  engine::SamplingParams greedy;
  greedy.temperature = 0.0f;
  std::mt19937 rng(3);
  std::uniform_int_distribution<int32_t> pick(std::min(300, c.n_vocab - 1), c.n_vocab - 1);
  engine::StepOutput out;

  // Feeds what the lease lacks (in chunks) and samples the next token: the time to first token.
  auto next_token = [&](memory::SessionId id, double* wake_seconds, bool layerwise = false) {
    const auto t0 = Clock::now();
    const std::vector<int32_t> tokens = m.tokens(id);
    auto lease = m.lease(id, static_cast<int32_t>(tokens.size()), layerwise);
    if (!lease) throw std::runtime_error("bench resume: the fast pool has no room for the session");
    if (wake_seconds) *wake_seconds = seconds_since(t0);
    for (int done = lease->kv_tokens(); done < static_cast<int>(tokens.size()); done += o.chunk) {
      const int n = std::min(o.chunk, static_cast<int>(tokens.size()) - done);
      const bool last = done + n == static_cast<int>(tokens.size());
      engine::SequenceInput in{std::span(tokens).subspan(static_cast<size_t>(done), static_cast<size_t>(n)), done,
                               lease->block_table(), last ? engine::LogitsWanted::sample : engine::LogitsWanted::none,
                               &greedy};
      backend->forward({&in, 1}, m.fast_view(), out, lease->arrival());
    }
    lease->computed(static_cast<int32_t>(tokens.size()));
    const int32_t id_next = out.sampled[0].id;
    m.append(id, std::span(&id_next, 1));
    return seconds_since(t0);
  };

  std::printf("\n(dram/layers: wake layer by layer; its 'of floor' is TTFT over the floor, the wake itself returns at once)\n");
  std::printf("%8s %9s %10s %10s %10s %9s %10s %13s\n", "tokens", "KV", "from", "wake ms", "floor ms", "of floor",
              "TTFT ms", "vs recompute");
  for (int n : o.tokens) {
    // Warm-up: the engine's first steps at this length (graphs, workspaces) stay out of the timing.
    {
      const auto warm = m.create();
      std::vector<int32_t> t(static_cast<size_t>(std::min(n, o.chunk)));
      for (auto& x : t) x = pick(rng);
      m.append(warm, t);
      next_token(warm, nullptr);
      next_token(warm, nullptr);
      m.drop(warm);
    }
    const auto id = m.create();
    std::vector<int32_t> tokens(static_cast<size_t>(n));
    for (auto& x : tokens) x = pick(rng);
    m.append(id, tokens);
    const double recompute = next_token(id, nullptr);
    m.set_prefill_rate(n / recompute);
    const double kv_bytes = static_cast<double>(n) * static_cast<double>(bytes_per_token);
    char kv[32];
    std::snprintf(kv, sizeof kv, "%.2f GiB", kv_bytes / double(1u << 30));
    double wake = 0;
    const double hot = next_token(id, &wake);
    std::printf("%8d %9s %10s %10.2f %10s %9s %10.2f %12.1fx\n", n, kv, "fast", wake * 1e3, "-", "-", hot * 1e3,
                recompute / hot);

    m.hibernate(id, memory::Tier::dram)->wait_or_throw();
    const memory::RestorePlan dram_plan = m.restore_plan(id);
    const double dram_ttft = next_token(id, &wake);
    const double dram_floor = kv_bytes / links.dram_to_fast;
    std::printf("%8d %9s %10s %10.2f %10.2f %8.2fx %10.2f %12.1fx\n", n, kv, "dram", wake * 1e3, dram_floor * 1e3,
                wake / dram_floor, dram_ttft * 1e3, recompute / dram_ttft);

    // Layer-wise: the step starts on layer 0 while later layers are still crossing the link.
    m.hibernate(id, memory::Tier::dram)->wait_or_throw();
    const double layered_ttft = next_token(id, &wake, true);
    std::printf("%8d %9s %10s %10.2f %10.2f %8.2fx %10.2f %12.1fx\n", n, kv, "dram/layers", wake * 1e3,
                dram_floor * 1e3, layered_ttft / dram_floor, layered_ttft * 1e3, recompute / layered_ttft);
    const auto t_ckpt = Clock::now();
    m.hibernate(id, memory::Tier::ssd)->wait_or_throw();
    const double checkpoint_s = seconds_since(t_ckpt);
    const memory::RestorePlan ssd_plan = m.restore_plan(id);
    // A VM disk's rate drifts by a fifth or more within a minute (it may still be writing the
    // checkpoint back): each wake is followed by a floor read of as many bytes as it read, three
    // times (hibernating again writes at most the last block), and each side is taken at its best.
    double ssd_ttft = 1e30, ssd_wake = 1e30, ssd_floor = 1e30;
    std::string ssd_reps;
    for (int rep = 0; rep < 3; ++rep) {
      if (rep > 0) m.hibernate(id, memory::Tier::ssd)->wait_or_throw();
      // The floor for the bytes this wake reads (the session is a token or two longer each time).
      const int64_t read_before = m.stats().bytes_ssd_read;
      const double ttft = next_token(id, &wake);
      const int64_t read = m.stats().bytes_ssd_read - read_before;
      if (read <= 0) throw std::runtime_error("bench resume: the wake after hibernate(ssd) read nothing from SSD");
      const double floor_s = static_cast<double>(read) / disk.read_rate(read);
      char rep_text[64];
      std::snprintf(rep_text, sizeof rep_text, "%s%.1f/%.1f", rep > 0 ? ", " : "", wake * 1e3, floor_s * 1e3);
      ssd_reps += rep_text;
      ssd_ttft = std::min(ssd_ttft, ttft);
      ssd_wake = std::min(ssd_wake, wake);
      ssd_floor = std::min(ssd_floor, floor_s);
    }
    std::printf("%8d %9s %10s %10.2f %10.2f %8.2fx %10.2f %12.1fx\n", n, kv, "ssd", ssd_wake * 1e3, ssd_floor * 1e3,
                ssd_wake / ssd_floor, ssd_ttft * 1e3, recompute / ssd_ttft);
    std::printf("         ssd wake / floor read, ms, in turn: %s\n", ssd_reps.c_str());
    std::printf("%8d %9s %10s %10s %10s %9s %10.2f %13s\n", n, kv, "recompute", "-", "-", "-", recompute * 1e3, "1.0x");
    std::printf("         checkpoint + hibernate to SSD took %.2f s (%.2f GB/s; disk write floor %.2f GB/s)\n",
                checkpoint_s, kv_bytes / checkpoint_s / 1e9, disk_write / 1e9);
    // And with a new turn of `chunk` tokens to prefill after the wake, where the overlap pays most.
    auto new_turn = [&](bool layerwise) {
      m.hibernate(id, memory::Tier::dram)->wait_or_throw();
      std::vector<int32_t> turn(static_cast<size_t>(std::min(o.chunk, 1024)));
      for (auto& x : turn) x = pick(rng);
      m.append(id, turn);
      return next_token(id, nullptr, layerwise);
    };
    // Alternated and each taken at its best, so that neither side carries first-use costs.
    double turn_plain = 1e30, turn_layered = 1e30;
    for (int rep = 0; rep < 2; ++rep) {
      turn_plain = std::min(turn_plain, new_turn(false));
      turn_layered = std::min(turn_layered, new_turn(true));
    }
    std::printf("         wake from DRAM + a %d-token turn: %.2f ms, layer-wise %.2f ms (%.2fx)\n", std::min(o.chunk, 1024),
                turn_plain * 1e3, turn_layered * 1e3, turn_plain / turn_layered);

    auto verdict = [&](const char* from, const memory::RestorePlan& plan, double load_measured) {
      const bool picks_load = plan.recompute_tokens == 0;
      const bool load_faster = load_measured <= recompute;
      // Within 10% either way the disk's own drift between wakes (20% and more on a VM) decides.
      const bool near_tie = std::abs(load_measured - recompute) < 0.1 * std::min(load_measured, recompute);
      std::printf("         cost model, %s: load %.1f ms vs recompute %.1f ms estimated -> %s; measured load %.1f ms, "
                  "recompute %.1f ms: %s\n",
                  from, plan.all_load_s * 1e3, plan.all_recompute_s * 1e3,
                  picks_load ? "load" : (plan.load_tokens > 0 ? "split" : "recompute"), load_measured * 1e3,
                  recompute * 1e3,
                  picks_load == load_faster ? "right choice"
                  : near_tie                ? "near tie (within 10%), either will do"
                                            : "WRONG choice");
    };
    verdict("from dram", dram_plan, dram_ttft);
    verdict("from ssd ", ssd_plan, ssd_ttft);
    m.drop(id);
    std::fflush(stdout);
  }
  const memory::MemoryStats st = m.stats();
  std::printf("\nmoved: %.2f GB dram->fast, %.2f GB fast->dram, %.2f GB read from SSD, %.2f GB written; "
              "%lld tokens loaded, %lld recomputed\n",
              st.bytes_dram_to_fast / 1e9, st.bytes_fast_to_dram / 1e9, st.bytes_ssd_read / 1e9,
              st.bytes_ssd_written / 1e9, static_cast<long long>(st.tokens_loaded),
              static_cast<long long>(st.tokens_recomputed));
  if (o.scattered) run_scattered(gpu, links);
  if (o.state_dir.empty()) std::filesystem::remove_all(state);
}

}  // namespace

void add_bench_resume_command(CLI::App& bench) {
  auto o = std::make_shared<ResumeOptions>();
  CLI::App* cmd = bench.add_subcommand("resume", "Time to first token after wake from HBM, DRAM, SSD, or by recompute");
  cmd->add_option("-m,--model", o->model, "GGUF model (default: the fetched default model)");
  cmd->add_option("--backend", o->backend, "Backend")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  cmd->add_option("-t,--threads", o->threads, "CPU threads (default: one per hardware thread)");
  cmd->add_option("--device", o->device, "CUDA device")->capture_default_str();
  cmd->add_option("--block-tokens", o->block_tokens, "Tokens per KV block")->check(CLI::Range(1, 4096))
      ->capture_default_str();
  cmd->add_option("--tokens", o->tokens, "Session lengths")->check(CLI::Range(1, 1 << 22))->capture_default_str();
  cmd->add_option("--chunk", o->chunk, "Prefill tokens per engine step")->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--state-dir", o->state_dir, "Where segments and the disk floor file go (default: a temp dir)");
  cmd->add_flag("!--no-scattered", o->scattered, "Skip the scattered-block transfer table");
  cmd->callback([o] { run_resume(*o); });
}

}  // namespace den::runtime::cli
