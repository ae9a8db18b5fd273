// The daemon's scheduler: continuous batching over the sessions that are generating. One
// engine thread runs steps; each step holds a decode token of every decoding sequence and
// prefill chunks of the others, within a token budget, each sequence through the block table of
// its Lease. Sequences are visited round-robin from a rotating start, so none waits more than
// a step or two while others decode. A session whose KV is on SSD is woken by the memory
// manager's worker before it joins; one that cannot get room in the fast pool waits (queued,
// never failed) until a lease ends or the policy evicts something.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/memory/session_manager.h"
#include "den/runtime/config.h"
#include "den/runtime/local_generator.h"
#include "den/runtime/metrics.h"

namespace den::runtime {

enum class FinishReason { length, end_of_generation, stop_string, context_full, cancelled, failed };
std::string_view finish_reason_name(FinishReason reason);

struct GenerateOutcome {
  std::vector<GeneratedToken> tokens;
  std::string text;
  FinishReason reason = FinishReason::length;
  std::string error;            // when reason == failed
  int32_t prompt_tokens = 0;    // history length when the request started
  int32_t reused_tokens = 0;    // of which had KV somewhere (fast pool, DRAM or SSD)
  double queue_s = 0;           // submitted -> first step (includes a wake)
  double wake_s = 0;            // waiting for the memory manager to bring KV back
  double ttft_s = 0;            // submitted -> first token sampled
  double prefill_s = 0;         // first step -> first token sampled
  double decode_s = 0;          // first token -> end
};

struct GenerateJob {
  memory::SessionId session = 0;
  GenerationOptions options;
  int32_t max_context = 0;                 // the history may not grow past this
  std::vector<int32_t> closing_tokens;     // appended to the history at the end (a chat turn's end)
  int32_t priority = 0;                    // higher goes first when a step cannot take everyone
  std::function<void(std::string_view text)> on_text;       // engine thread; text is final
  std::function<void(GenerateOutcome outcome)> on_done;     // engine thread; exactly once
};

class GenerateHandle {
 public:
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

 private:
  std::atomic<bool> cancelled_{false};
};

struct SchedulerStats {
  int64_t steps = 0;
  int64_t batched_steps = 0;        // steps that ran more than one sequence
  int64_t max_batch = 0;
  int64_t sequences_stepped = 0;    // sum of batch sizes (mean = / steps)
  int64_t tokens_generated = 0;
  int64_t tokens_prefilled = 0;     // tokens fed in prefill chunks
  int64_t requests_completed = 0;
  int64_t requests_cancelled = 0;
  int64_t requests_failed = 0;
  int32_t active = 0;               // requests admitted and not finished
  int32_t waiting_for_memory = 0;   // of which could not get a lease last step
  double busy_s = 0;                // time spent in engine steps
  double generated_per_s_10s = 0;   // tokens generated over the last ~10 s
  Histogram::Snapshot ttft;
  Histogram::Snapshot time_per_output_token;
  Histogram::Snapshot batch_size;
};

class Scheduler {
 public:
  Scheduler(const engine::Model& model, engine::Backend& backend, memory::SessionManager& sessions,
            SchedulerConfig config, bool layerwise_wake);
  ~Scheduler();  // cancels what runs and joins the engine thread
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  std::shared_ptr<GenerateHandle> submit(GenerateJob job);
  void cancel_all();
  // Waits until no request is active (after cancel_all, for shutdown).
  void wait_idle();
  void set_config(const SchedulerConfig& config);  // SIGHUP
  SchedulerStats stats() const;

 private:
  struct Sequence;
  void run();
  bool step(std::vector<std::unique_ptr<Sequence>>& active);
  void admit(std::vector<std::unique_ptr<Sequence>>& active, const SchedulerConfig& config);
  void finish(Sequence& seq, FinishReason reason, std::string error = {});
  void handle_sample(Sequence& seq, const engine::SampledToken& sampled, std::span<const float> logits_row);

  const engine::Model& model_;
  engine::Backend& backend_;
  memory::SessionManager& sessions_;
  bool layerwise_wake_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable idle_;
  SchedulerConfig config_;
  std::deque<std::unique_ptr<Sequence>> incoming_;
  bool stopping_ = false;
  bool cancel_everything_ = false;  // cancel_all(): the engine thread cancels what it holds
  int32_t active_count_ = 0;
  size_t round_robin_ = 0;

  // Statistics (mutex_).
  SchedulerStats counters_;
  std::deque<std::pair<double, int64_t>> recent_generated_;  // (time, tokens) for the 10 s rate
  Histogram ttft_, tpot_, batch_sizes_;
  double prefill_rate_ = 0;  // learned tokens/s of prefill-heavy steps, fed to the cost model
  int64_t prefill_samples_ = 0;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();

  engine::StepOutput step_out_;
  std::thread thread_;
};

}  // namespace den::runtime
