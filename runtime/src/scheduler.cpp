// Continuous batching: the engine thread's loop, one step at a time.
#include "den/runtime/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <optional>
#include <stdexcept>

#include "den/engine/stop_strings.h"
#include "den/engine/tokenizer.h"
#include "den/runtime/log.h"

namespace den::runtime {
namespace {

constexpr int kExitDeviceLost = 70;  // EX_SOFTWARE: systemd's Restart=on-failure brings the daemon back

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

std::vector<double> batch_size_buckets() { return {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024}; }

// The KV of several layer-wise leases arriving during one step: the engine waits for each
// before touching a layer.
class ArrivalSet final : public engine::KvArrival {
 public:
  void add(engine::KvArrival* arrival) {
    if (arrival != nullptr) parts_.push_back(arrival);
  }
  bool empty() const { return parts_.empty(); }
  void before_layer(int32_t layer, void* stream) override {
    for (engine::KvArrival* part : parts_) part->before_layer(layer, stream);
  }

 private:
  std::vector<engine::KvArrival*> parts_;
};

}  // namespace

std::string_view finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::length: return "length";
    case FinishReason::end_of_generation: return "end_of_generation";
    case FinishReason::stop_string: return "stop_string";
    case FinishReason::context_full: return "context_full";
    case FinishReason::cancelled: return "cancelled";
    case FinishReason::failed: return "failed";
  }
  return "failed";
}

struct Scheduler::Sequence {
  enum class Phase { starting, waking, running, finished };
  GenerateJob job;
  std::shared_ptr<GenerateHandle> handle = std::make_shared<GenerateHandle>();
  Phase phase = Phase::starting;
  std::shared_ptr<memory::Operation> wake_op;
  std::optional<memory::Lease> lease;
  std::vector<int32_t> history;  // the session's tokens; this request is their only writer while it runs
  std::optional<engine::TokenStreamDecoder> decoder;
  std::optional<engine::StopStringFilter> stops;
  GenerateOutcome out;
  uint64_t sample_step = 0;
  bool waiting_for_memory = false;
  Clock::time_point submitted = Clock::now(), wake_started, first_step, first_token;
  bool stepped = false;
  // This step's piece.
  int32_t piece_start = 0, piece_tokens = 0;
  bool piece_samples = false;
};

Scheduler::Scheduler(const engine::Model& model, engine::Backend& backend, memory::SessionManager& sessions,
                     SchedulerConfig config, bool layerwise_wake)
    : model_(model),
      backend_(backend),
      sessions_(sessions),
      layerwise_wake_(layerwise_wake),
      config_(config),
      ttft_(latency_buckets_seconds()),
      tpot_(latency_buckets_seconds()),
      batch_sizes_(batch_size_buckets()) {
  thread_ = std::thread([this] { run(); });
}

Scheduler::~Scheduler() {
  cancel_all();
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

std::shared_ptr<GenerateHandle> Scheduler::submit(GenerateJob job) {
  auto seq = std::make_unique<Sequence>();
  seq->job = std::move(job);
  auto handle = seq->handle;
  {
    std::lock_guard lock(mutex_);
    incoming_.push_back(std::move(seq));
    ++active_count_;
  }
  wake_.notify_all();
  return handle;
}

void Scheduler::cancel_all() {
  std::lock_guard lock(mutex_);
  for (auto& seq : incoming_) seq->handle->cancel();
  cancel_everything_ = true;
  wake_.notify_all();
}

void Scheduler::wait_idle() {
  std::unique_lock lock(mutex_);
  idle_.wait(lock, [&] { return active_count_ == 0; });
}

void Scheduler::set_config(const SchedulerConfig& config) {
  std::lock_guard lock(mutex_);
  config_ = config;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard lock(mutex_);
  SchedulerStats s = counters_;
  s.active = active_count_;
  s.ttft = ttft_.snapshot();
  s.time_per_output_token = tpot_.snapshot();
  s.batch_size = batch_sizes_.snapshot();
  const double now = seconds_between(started_, Clock::now());
  int64_t recent = 0;
  for (const auto& [t, n] : recent_generated_) {
    if (now - t <= 10.0) recent += n;
  }
  s.generated_per_s_10s = static_cast<double>(recent) / std::min(10.0, std::max(now, 1e-3));
  return s;
}

void Scheduler::run() {
  std::vector<std::unique_ptr<Sequence>> active;
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !incoming_.empty() || !active.empty(); });
      if (stopping_ && incoming_.empty() && active.empty()) return;
      while (!incoming_.empty()) {
        active.push_back(std::move(incoming_.front()));
        incoming_.pop_front();
      }
      if (cancel_everything_) {
        for (auto& seq : active) seq->handle->cancel();
        cancel_everything_ = false;
      }
    }
    const bool progressed = step(active);
    const size_t before = active.size();
    std::erase_if(active, [](const auto& seq) { return seq->phase == Sequence::Phase::finished; });
    {
      std::lock_guard lock(mutex_);
      active_count_ -= static_cast<int32_t>(before - active.size());
      counters_.waiting_for_memory = static_cast<int32_t>(
          std::count_if(active.begin(), active.end(), [](const auto& s) { return s->waiting_for_memory; }));
      if (active_count_ == 0) idle_.notify_all();
    }
    if (!progressed && !active.empty()) {
      // Everyone waits for a wake or for memory: poll again shortly (or on new work).
      std::unique_lock lock(mutex_);
      wake_.wait_for(lock, std::chrono::milliseconds(2), [&] { return stopping_ || !incoming_.empty(); });
    }
  }
}

// Leases fast-pool room to running sequences that hold none, first come first served (higher
// priorities first), with room for the turn's output as well, up to lease_ahead tokens: a
// sequence that got its KV in keeps it to the end instead of giving it back at the next block
// boundary. The first one that does not fit stops the admissions: letting every later one try
// would load their KV and evict each other's (the churn that kept a full pool's GPU half idle).
void Scheduler::admit(std::vector<std::unique_ptr<Sequence>>& active, const SchedulerConfig& config) {
  std::vector<Sequence*> queue;
  int32_t leased = 0;
  for (auto& seq : active) {
    if (seq->lease) ++leased;
    if (seq->phase == Sequence::Phase::running && !seq->lease) queue.push_back(seq.get());
  }
  std::stable_sort(queue.begin(), queue.end(),
                   [](const Sequence* a, const Sequence* b) { return a->job.priority > b->job.priority; });
  bool blocked = false;
  for (Sequence* seq : queue) {
    if (blocked || leased >= config.max_batch) {
      seq->waiting_for_memory = blocked;
      continue;
    }
    const auto history = static_cast<int32_t>(seq->history.size());
    const int32_t left = std::max(0, seq->job.options.max_new_tokens - static_cast<int32_t>(seq->out.tokens.size()));
    const int32_t wanted = std::max(history, std::min({history + std::min(left, config.lease_ahead), seq->job.max_context}));
    try {
      seq->lease = sessions_.lease(seq->job.session, wanted, layerwise_wake_);
      if (!seq->lease && wanted > history && leased == 0) {
        // Nothing else holds the pool: run with the room the history needs and grow block by block.
        seq->lease = sessions_.lease(seq->job.session, history, layerwise_wake_);
      }
    } catch (const std::exception& e) {
      finish(*seq, FinishReason::failed, e.what());
      continue;
    }
    if (!seq->lease) {
      seq->waiting_for_memory = blocked = true;
      continue;
    }
    seq->waiting_for_memory = false;
    ++leased;
  }
}

// Returns whether an engine step ran (or a request finished).
bool Scheduler::step(std::vector<std::unique_ptr<Sequence>>& active) {
  SchedulerConfig config;
  {
    std::lock_guard lock(mutex_);
    config = config_;
  }
  bool progressed = false;
  const engine::Tokenizer& tokenizer = model_.tokenizer();

  // Admission: read the history, decide how its KV comes back.
  for (auto& seq : active) {
    if (seq->phase != Sequence::Phase::starting) continue;
    progressed = true;
    const memory::SessionId id = seq->job.session;
    try {
      seq->history = sessions_.tokens(id);
      if (seq->history.empty()) {
        finish(*seq, FinishReason::failed, "the session is empty: append text or messages before generating");
        continue;
      }
      const memory::SessionInfo info = sessions_.info(id);
      seq->out.prompt_tokens = static_cast<int32_t>(seq->history.size());
      seq->out.reused_tokens = std::min(info.kv_tokens, seq->out.prompt_tokens);
      if (seq->job.options.max_new_tokens == 0) {
        finish(*seq, FinishReason::length);
        continue;
      }
      if (static_cast<int32_t>(seq->history.size()) >= seq->job.max_context) {
        finish(*seq, FinishReason::context_full);
        continue;
      }
      if (info.kv_tokens >= static_cast<int32_t>(seq->history.size())) {
        // Every token has KV, but sampling needs the last one's logits: compute it again.
        const int32_t last = seq->history.back();
        sessions_.truncate(id, static_cast<int32_t>(seq->history.size()) - 1);
        sessions_.append(id, {&last, 1});
      }
      seq->decoder.emplace(tokenizer, seq->history.back());
      seq->stops.emplace(seq->job.options.stop);
      seq->phase = Sequence::Phase::running;
      if (info.tier == memory::Tier::ssd && sessions_.restore_plan(id).load_tokens > 0) {
        // SSD reads run on the manager's worker, not in the engine's steps.
        seq->wake_started = Clock::now();
        seq->wake_op = sessions_.wake(id);
        seq->phase = Sequence::Phase::waking;
      }
    } catch (const std::exception& e) {
      finish(*seq, FinishReason::failed, e.what());
    }
  }

  // Cancellations and finished wakes.
  for (auto& seq : active) {
    if (seq->phase == Sequence::Phase::finished) continue;
    if (seq->handle->cancelled()) {
      finish(*seq, FinishReason::cancelled);
      progressed = true;
      continue;
    }
    if (seq->phase == Sequence::Phase::waking) {
      const auto state = seq->wake_op->state();
      if (state == memory::Operation::State::queued || state == memory::Operation::State::running) continue;
      if (state == memory::Operation::State::failed) {
        log_warn("wake failed; the KV will be recomputed", {{"session", std::to_string(seq->job.session)},
                                                             {"error", seq->wake_op->error()}});
      }
      seq->out.wake_s = seconds_between(seq->wake_started, Clock::now());
      seq->wake_op.reset();
      seq->phase = Sequence::Phase::running;
    }
  }

  // Build the batch: decode tokens first (every decoding sequence, round-robin up to
  // max_batch), then prefill chunks within the token budget.
  std::vector<Sequence*> batch;
  int32_t budget = config.step_tokens;
  const size_t n = active.size();
  const size_t first = n == 0 ? 0 : round_robin_ % n;
  ++round_robin_;
  // Round-robin from a rotating start; higher priorities ahead of it.
  std::vector<Sequence*> order;
  order.reserve(n);
  for (size_t k = 0; k < n; ++k) order.push_back(active[(first + k) % n].get());
  std::stable_sort(order.begin(), order.end(),
                   [](const Sequence* a, const Sequence* b) { return a->job.priority > b->job.priority; });
  admit(active, config);
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t k = 0; k < n && static_cast<int32_t>(batch.size()) < config.max_batch; ++k) {
      Sequence& seq = *order[k];
      if (seq.phase != Sequence::Phase::running || seq.piece_tokens > 0 || !seq.lease) continue;
      const memory::SessionId id = seq.job.session;
      try {
        const int32_t kv = seq.lease->kv_tokens();
        const int32_t pending = static_cast<int32_t>(seq.history.size()) - kv;
        if (pending <= 0) {
          // Another session's blocks covered the whole history (a block-aligned shared
          // prefix), but sampling needs the last token's logits: compute that token again.
          seq.lease.reset();
          const int32_t last = seq.history.back();
          sessions_.truncate(id, static_cast<int32_t>(seq.history.size()) - 1);
          sessions_.append(id, {&last, 1});
          progressed = true;
          continue;
        }
        const bool decoding = pending == 1;
        if ((pass == 0) != decoding) continue;
        int32_t piece = decoding ? 1 : std::min({pending, config.prefill_chunk, budget});
        if (piece <= 0) continue;
        if (!seq.lease->reserve(kv + piece)) {
          // No room now: give the blocks back so the policy may move them, and wait.
          seq.lease.reset();
          seq.waiting_for_memory = true;
          continue;
        }
        seq.waiting_for_memory = false;
        seq.piece_start = kv;
        seq.piece_tokens = piece;
        seq.piece_samples = kv + piece == static_cast<int32_t>(seq.history.size());
        budget -= piece;
        batch.push_back(&seq);
      } catch (const std::exception& e) {
        finish(seq, FinishReason::failed, e.what());
        progressed = true;
      }
    }
  }
  if (batch.empty()) return progressed;

  std::vector<engine::SequenceInput> inputs;
  inputs.reserve(batch.size());
  ArrivalSet arrivals;
  int32_t prefill_tokens = 0;
  for (Sequence* seq : batch) {
    engine::SequenceInput in;
    in.tokens = std::span<const int32_t>(seq->history).subspan(static_cast<size_t>(seq->piece_start),
                                                                static_cast<size_t>(seq->piece_tokens));
    in.start_position = seq->piece_start;
    in.block_table = seq->lease->block_table();
    in.logits = engine::LogitsWanted::none;
    if (seq->piece_samples) {
      in.logits = seq->job.options.top_logprobs > 0 ? engine::LogitsWanted::last : engine::LogitsWanted::sample;
      in.sampling = &seq->job.options.sampling;
      in.history = seq->history;
      in.sample_step = seq->sample_step;
      in.want_logprob = seq->job.options.top_logprobs >= 0;
    }
    if (seq->piece_tokens > 1) prefill_tokens += seq->piece_tokens;
    arrivals.add(seq->lease->arrival());
    if (!seq->stepped) {
      seq->stepped = true;
      seq->first_step = Clock::now();
    }
    inputs.push_back(in);
  }

  const auto t0 = Clock::now();
  try {
    backend_.forward(inputs, sessions_.fast_view(), step_out_, arrivals.empty() ? nullptr : &arrivals);
  } catch (const engine::DeviceLost& e) {
    // Nothing on the device can be trusted or saved, and a shutdown would try to checkpoint KV
    // from it. What is durable is on disk already: exit now, non-zero, so that the service
    // manager restarts the daemon and it resumes from the last checkpoints.
    log_error("the GPU is lost: exiting with status 70 so that a restart resumes from what is durable",
              {{"error", e.what()}});
    std::_Exit(kExitDeviceLost);
  } catch (const std::exception& e) {
    log_error("engine step failed", {{"batch", std::to_string(batch.size())}, {"error", e.what()}});
    for (Sequence* seq : batch) {
      seq->piece_tokens = 0;
      finish(*seq, FinishReason::failed, std::string("engine step failed: ") + e.what());
    }
    return true;
  }
  const double step_s = seconds_between(t0, Clock::now());

  int32_t sampled_count = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence& seq = *batch[i];
    const int32_t computed_to = seq.piece_start + seq.piece_tokens;
    seq.piece_tokens = 0;
    try {
      seq.lease->computed(computed_to);
      if (!seq.piece_samples) continue;
      ++sampled_count;
      std::span<const float> row;
      if (step_out_.first_row[i] >= 0) row = step_out_.row(static_cast<size_t>(step_out_.first_row[i]));
      handle_sample(seq, step_out_.sampled[i], row);
    } catch (const std::exception& e) {
      finish(seq, FinishReason::failed, e.what());
    }
  }

  std::lock_guard lock(mutex_);
  ++counters_.steps;
  counters_.sequences_stepped += static_cast<int64_t>(batch.size());
  counters_.max_batch = std::max(counters_.max_batch, static_cast<int64_t>(batch.size()));
  if (batch.size() > 1) ++counters_.batched_steps;
  counters_.tokens_prefilled += prefill_tokens;
  counters_.busy_s += step_s;
  batch_sizes_.observe(static_cast<double>(batch.size()));
  if (sampled_count > 0) {
    const double now = seconds_between(started_, Clock::now());
    recent_generated_.emplace_back(now, sampled_count);
    while (!recent_generated_.empty() && now - recent_generated_.front().first > 10.0) recent_generated_.pop_front();
  }
  if (prefill_tokens >= 128 && step_s > 0) {
    // Long prefill steps teach the cost model how fast recomputing is.
    const double rate = prefill_tokens / step_s;
    prefill_rate_ = prefill_rate_ == 0 ? rate : 0.8 * prefill_rate_ + 0.2 * rate;
    if (++prefill_samples_ % 16 == 1) sessions_.set_prefill_rate(prefill_rate_);
  }
  return true;
}

void Scheduler::handle_sample(Sequence& seq, const engine::SampledToken& sampled, std::span<const float> logits_row) {
  const engine::Tokenizer& tokenizer = model_.tokenizer();
  const GenerationOptions& options = seq.job.options;
  GeneratedToken token{sampled.id, sampled.logprob, {}};
  if (options.top_logprobs > 0) {
    // Sampled on the host from the logits row, by the same rule as the device.
    std::vector<float> logits(logits_row.begin(), logits_row.end());
    token.top = engine::top_logprobs(logits, options.top_logprobs);
    const std::vector<float> raw = logits;
    token.id = engine::sample_token(logits, options.sampling, seq.history, seq.sample_step);
    token.logprob = engine::token_logprob(raw, token.id);
  }
  if (options.top_logprobs < 0) token.logprob = 0.0f;
  const auto now = Clock::now();
  if (seq.sample_step == 0) {
    seq.first_token = now;
    seq.out.ttft_s = seconds_between(seq.submitted, now);
    seq.out.prefill_s = seconds_between(seq.first_step, now);
  }
  ++seq.sample_step;
  // A sampled BOS starts a new document: as llama2.c does, treat it as the end.
  if (tokenizer.is_end_of_generation(token.id) || (tokenizer.bos() && token.id == *tokenizer.bos())) {
    finish(seq, FinishReason::end_of_generation);
    return;
  }
  seq.out.tokens.push_back(token);
  seq.history.push_back(token.id);
  sessions_.append(seq.job.session, {&token.id, 1});
  {
    std::lock_guard lock(mutex_);
    ++counters_.tokens_generated;
  }
  const std::string text = seq.stops->push(seq.decoder->push(token.id));
  if (!text.empty()) {
    seq.out.text += text;
    if (seq.job.on_text) seq.job.on_text(text);
  }
  if (seq.stops->stopped()) {
    finish(seq, FinishReason::stop_string);
  } else if (static_cast<int32_t>(seq.out.tokens.size()) >= options.max_new_tokens) {
    finish(seq, FinishReason::length);
  } else if (static_cast<int32_t>(seq.history.size()) >= seq.job.max_context) {
    finish(seq, FinishReason::context_full);
  }
}

void Scheduler::finish(Sequence& seq, FinishReason reason, std::string error) {
  if (seq.phase == Sequence::Phase::finished) return;
  const auto now = Clock::now();
  if (seq.decoder && seq.stops && !seq.stops->stopped()) {
    const std::string rest = seq.stops->push(seq.decoder->flush()) + seq.stops->flush();
    if (!rest.empty()) {
      seq.out.text += rest;
      if (seq.job.on_text) seq.job.on_text(rest);
    }
  }
  seq.lease.reset();
  if (seq.wake_op) {
    seq.wake_op->wait();  // cancelled while its KV was on the way: let the manager finish first
    seq.wake_op.reset();
  }
  if (reason != FinishReason::failed && !seq.job.closing_tokens.empty() && seq.phase != Sequence::Phase::starting) {
    try {
      sessions_.append(seq.job.session, seq.job.closing_tokens);
    } catch (const std::exception& e) {
      reason = FinishReason::failed;
      error = e.what();
    }
  }
  seq.phase = Sequence::Phase::finished;
  seq.out.reason = reason;
  seq.out.error = std::move(error);
  if (seq.stepped) {
    seq.out.queue_s = seconds_between(seq.submitted, seq.first_step);
    if (seq.sample_step > 0) seq.out.decode_s = seconds_between(seq.first_token, now);
  } else {
    seq.out.queue_s = seconds_between(seq.submitted, now);
  }
  {
    std::lock_guard lock(mutex_);
    if (reason == FinishReason::failed) {
      ++counters_.requests_failed;
    } else if (reason == FinishReason::cancelled) {
      ++counters_.requests_cancelled;
    } else {
      ++counters_.requests_completed;
    }
    if (seq.sample_step > 0) ttft_.observe(seq.out.ttft_s);
    if (seq.out.tokens.size() > 1) tpot_.observe(seq.out.decode_s / static_cast<double>(seq.out.tokens.size() - 1));
  }
  if (seq.job.on_done) seq.job.on_done(std::move(seq.out));
}

}  // namespace den::runtime
