// Single-sequence generation in this process: keeps one sequence's KV in a host block pool,
// reuses the longest common prefix between calls (so a chat only prefills the new turn),
// samples, decodes incrementally and applies stop conditions. Used by `den generate`,
// `den chat` and `den bench`; the daemon's scheduler batches many sequences instead.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/engine/sampler.h"
#include "den/memory/block_pool.h"

namespace den::runtime {

enum class StopReason { length, end_of_generation, stop_string, context_full };
std::string_view stop_reason_name(StopReason reason);

struct GenerationOptions {
  int32_t max_new_tokens = 128;
  engine::SamplingParams sampling;
  std::vector<std::string> stop;
  int32_t top_logprobs = -1;  // -1: none; 0: the chosen token's; n: and the n most likely
};

struct GeneratedToken {
  int32_t id;
  float logprob;
  std::vector<engine::TokenLogprob> top;
};

struct GenerationResult {
  std::vector<GeneratedToken> tokens;
  std::string text;
  StopReason reason = StopReason::length;
  int32_t prompt_tokens = 0;    // tokens of the context
  int32_t reused_tokens = 0;    // of which already in the KV cache
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

class LocalGenerator {
 public:
  LocalGenerator(const engine::Model& model, engine::Backend& backend, int32_t block_tokens, int32_t max_context);

  // Makes the KV hold exactly `context` (keeping its longest common prefix with what is there),
  // then generates. on_text receives text as soon as it is final (whole UTF-8 characters, never
  // part of a stop string).
  GenerationResult generate(std::span<const int32_t> context, const GenerationOptions& options,
                            const std::function<void(std::string_view)>& on_text = {});

  // Tokens whose K/V are in the cache, in order.
  const std::vector<int32_t>& history() const { return history_; }
  int32_t max_context() const { return max_context_; }

 private:
  // Appends tokens to the KV and returns the token sampled after the last one (draw `step`).
  // With top_logprobs > 0 the logits come to the host and are sampled there (same rule).
  GeneratedToken feed_and_sample(std::span<const int32_t> tokens, const GenerationOptions& options,
                                 std::span<const int32_t> history, uint64_t step);

  const engine::Model& model_;
  engine::Backend& backend_;
  int32_t max_context_;
  memory::BlockPool pool_;
  memory::SequenceBlocks blocks_;
  std::vector<int32_t> history_;
  engine::StepOutput step_;
};

}  // namespace den::runtime
