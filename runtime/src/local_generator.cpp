// LocalGenerator: prefill in chunks, then sample / decode / feed one token at a time.
#include "den/runtime/local_generator.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "den/engine/stop_strings.h"
#include "den/engine/tokenizer.h"

namespace den::runtime {
namespace {

constexpr int32_t kPrefillChunkTokens = 256;

#ifdef NDEBUG
constexpr bool kPoisonBlocks = false;
#else
constexpr bool kPoisonBlocks = true;
#endif

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int64_t blocks_for(int32_t tokens, int32_t block_tokens) { return (tokens + block_tokens - 1) / block_tokens; }

}  // namespace

std::string_view stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::length:
      return "length";
    case StopReason::end_of_generation:
      return "end_of_generation";
    case StopReason::stop_string:
      return "stop_string";
    case StopReason::context_full:
      return "context_full";
  }
  return "length";
}

LocalGenerator::LocalGenerator(const engine::Model& model, engine::Backend& backend, int32_t block_tokens,
                               int32_t max_context)
    : model_(model),
      backend_(backend),
      max_context_(max_context),
      pool_(model.kv_layout(block_tokens, backend.kv_dtype()), blocks_for(max_context, block_tokens),
            backend.kv_on_device() ? memory::Placement::device : memory::Placement::host, kPoisonBlocks),
      blocks_(pool_) {}

GeneratedToken LocalGenerator::feed_and_sample(std::span<const int32_t> tokens, const GenerationOptions& options,
                                               std::span<const int32_t> history, uint64_t step) {
  GeneratedToken result{-1, 0.0f, {}};
  const bool host_sampling = options.top_logprobs > 0;
  for (size_t done = 0; done < tokens.size();) {
    const size_t n = std::min(tokens.size() - done, static_cast<size_t>(kPrefillChunkTokens));
    const auto start = static_cast<int32_t>(history_.size());
    if (!blocks_.reserve(start + static_cast<int64_t>(n))) {
      throw std::logic_error("LocalGenerator: KV pool exhausted below max_context");
    }
    const bool last_chunk = done + n == tokens.size();
    engine::SequenceInput input{tokens.subspan(done, n), start, blocks_.table(), engine::LogitsWanted::none};
    if (last_chunk) {
      input.logits = host_sampling ? engine::LogitsWanted::last : engine::LogitsWanted::sample;
      input.sampling = &options.sampling;
      input.history = history;
      input.sample_step = step;
      input.want_logprob = options.top_logprobs >= 0;
    }
    backend_.forward({&input, 1}, pool_.view(), step_);
    history_.insert(history_.end(), tokens.begin() + static_cast<ptrdiff_t>(done),
                    tokens.begin() + static_cast<ptrdiff_t>(done + n));
    done += n;
  }
  if (host_sampling) {
    std::vector<float> logits(step_.row(0).begin(), step_.row(0).end());
    result.top = engine::top_logprobs(logits, options.top_logprobs);
    const std::vector<float> raw = logits;
    result.id = engine::sample_token(logits, options.sampling, history, step);
    result.logprob = engine::token_logprob(raw, result.id);
  } else {
    result.id = step_.sampled[0].id;
    result.logprob = step_.sampled[0].logprob;
  }
  return result;
}

GenerationResult LocalGenerator::generate(std::span<const int32_t> context, const GenerationOptions& options,
                                          const std::function<void(std::string_view)>& on_text) {
  if (context.empty()) throw std::invalid_argument("cannot generate from an empty context (no prompt and no BOS)");
  options.sampling.validate();
  if (static_cast<int32_t>(context.size()) > max_context_) {
    throw std::invalid_argument("the prompt has " + std::to_string(context.size()) +
                                " tokens, more than the context of " + std::to_string(max_context_));
  }
  const engine::Tokenizer& tokenizer = model_.tokenizer();
  GenerationResult result;
  result.prompt_tokens = static_cast<int32_t>(context.size());

  // Keep the common prefix, but always re-feed at least the last context token: its logits
  // are what the first sample needs.
  size_t common = 0;
  while (common < history_.size() && common < context.size() && history_[common] == context[common]) ++common;
  common = std::min(common, context.size() - 1);
  history_.resize(common);
  blocks_.shrink_to(static_cast<int64_t>(common));
  result.reused_tokens = static_cast<int32_t>(common);

  std::vector<int32_t> sampled_history(context.begin(), context.end());
  const auto t_prefill = std::chrono::steady_clock::now();
  GeneratedToken next = feed_and_sample(context.subspan(common), options, sampled_history, 0);
  result.prefill_seconds = seconds_since(t_prefill);

  engine::TokenStreamDecoder decoder(tokenizer, context.back());
  engine::StopStringFilter stops(options.stop);
  auto emit = [&](const std::string& text) {
    if (text.empty()) return;
    result.text += text;
    if (on_text) on_text(text);
  };

  const auto t_decode = std::chrono::steady_clock::now();
  for (int32_t i = 0; i < options.max_new_tokens; ++i) {
    const int32_t id = next.id;
    // A sampled BOS starts a new document: as llama2.c does, treat it as the end.
    if (tokenizer.is_end_of_generation(id) || (tokenizer.bos() && id == *tokenizer.bos())) {
      result.reason = StopReason::end_of_generation;
      break;
    }
    if (options.top_logprobs < 0) next.logprob = 0.0f;
    result.tokens.push_back(next);
    sampled_history.push_back(id);
    emit(stops.push(decoder.push(id)));
    if (stops.stopped()) {
      result.reason = StopReason::stop_string;
      break;
    }
    if (i + 1 == options.max_new_tokens) break;
    if (static_cast<int32_t>(history_.size()) + 1 > max_context_) {
      result.reason = StopReason::context_full;
      break;
    }
    const int32_t token[1] = {id};
    next = feed_and_sample(token, options, sampled_history, static_cast<uint64_t>(i) + 1);
  }
  if (!stops.stopped()) emit(stops.push(decoder.flush()) + stops.flush());
  result.decode_seconds = seconds_since(t_decode);
  return result;
}

}  // namespace den::runtime
