// `den bench agents`: the seeded workload. Each agent's turns are drawn from its own
// mt19937_64 with a fixed number of draws per turn, and token ids come from a counter-based
// hash of (seed, stream, agent, item, position), so every policy sees the very same agents,
// turns and tokens whatever the timing (a turn that ends early at EOS changes nothing drawn).
#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>

#include "bench_agents.h"
#include "den/engine/gguf.h"
#include "den/engine/tokenizer.h"

namespace den::runtime::cli::bench_agents {
namespace {

// How far each quantity spreads around its median (sigma of its logarithm).
constexpr double kFirstTokensSigma = 0.8;
constexpr double kUserTokensSigma = 1.0;
constexpr double kResponseTokensSigma = 0.6;
constexpr double kToolResultSigma = 1.0;
constexpr double kThinkSigma = 1.0;
constexpr double kToolWaitSigma = 1.2;
constexpr double kTimerSigma = 0.8;
constexpr double kClip = 8.0;  // draws stay within [median / 8, median x 8]

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Our own uniform and normal draws: the standard distributions differ between libraries, and
// the workload must be the same wherever the bench is built.
class Draws {
 public:
  explicit Draws(uint64_t seed) : rng_(seed) {}
  double uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }  // [0, 1)
  // Box-Muller; always two uniforms, so every call advances the stream equally.
  double normal() {
    const double u1 = 1.0 - uniform();  // (0, 1]: log is finite
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }
  double log_normal(double median, double sigma) {
    const double x = median * std::exp(sigma * normal());
    return std::clamp(x, median / kClip, median * kClip);
  }
  int32_t tokens(int32_t median, double sigma) {
    if (median <= 0) {
      normal();  // keep the stream's position
      return 0;
    }
    return std::max<int32_t>(1, static_cast<int32_t>(std::lround(log_normal(median, sigma))));
  }

 private:
  std::mt19937_64 rng_;
};

}  // namespace

std::string_view after_turn_name(AfterTurn after) {
  switch (after) {
    case AfterTurn::think: return "think";
    case AfterTurn::tool: return "tool";
    case AfterTurn::timer: return "timer";
  }
  return "think";
}

std::vector<AgentPlan> make_plans(const WorkloadOptions& o) {
  std::vector<AgentPlan> plans;
  plans.reserve(static_cast<size_t>(o.agents));
  for (int32_t a = 0; a < o.agents; ++a) {
    Draws draws(splitmix64(o.seed ^ splitmix64(static_cast<uint64_t>(a) + 1)));
    AgentPlan plan;
    plan.index = a;
    plan.shared_system_prompt = draws.uniform() < o.shared_fraction;
    // The population arrives over one median think time, not all at once.
    plan.start_s = draws.uniform() * o.think_seconds;
    for (int32_t t = 0; t < o.turns; ++t) {
      TurnPlan turn;
      turn.first_tokens = draws.tokens(o.first_tokens, kFirstTokensSigma);
      turn.user_tokens = draws.tokens(o.user_tokens, kUserTokensSigma);
      turn.tool_result_tokens = draws.tokens(o.tool_result_tokens, kToolResultSigma);
      turn.max_tokens = draws.tokens(o.response_tokens, kResponseTokensSigma);
      const double kind = draws.uniform();
      const double think = draws.log_normal(o.think_seconds, kThinkSigma);
      const double tool = draws.log_normal(o.tool_seconds, kToolWaitSigma);
      const double timer = draws.log_normal(o.timer_seconds, kTimerSigma);
      if (kind < o.tool_probability) {
        turn.after = AfterTurn::tool;
        turn.wait_s = tool;
      } else if (kind < o.tool_probability + o.timer_probability) {
        turn.after = AfterTurn::timer;
        turn.wait_s = timer;
      } else {
        turn.after = AfterTurn::think;
        turn.wait_s = think;
      }
      plan.turns.push_back(turn);
    }
    plans.push_back(std::move(plan));
  }
  return plans;
}

Vocabulary workload_vocabulary(const std::string& model_path, int32_t vocab_size) {
  Vocabulary v;
  try {
    const engine::GgufFile file(model_path);
    const engine::Tokenizer tokenizer(file);
    for (int32_t id = 0; id < tokenizer.n_vocab() && id < vocab_size; ++id) {
      const engine::TokenKind kind = tokenizer.kind(id);
      if (kind != engine::TokenKind::normal && kind != engine::TokenKind::byte) continue;
      if (tokenizer.is_end_of_generation(id) || id == tokenizer.bos()) continue;
      v.ordinary.push_back(id);
    }
    if (tokenizer.add_bos_by_default()) v.bos = tokenizer.bos();
    v.source = "the model's ordinary and byte tokens (" + std::to_string(v.ordinary.size()) + " of " +
               std::to_string(tokenizer.n_vocab()) + ")";
  } catch (const std::exception& e) {
    v.ordinary.clear();
    v.source = std::string("ids in the middle of the vocabulary (the model file could not be read: ") + e.what() + ")";
  }
  if (v.ordinary.empty()) {
    for (int32_t id = vocab_size / 8; id < vocab_size - vocab_size / 8; ++id) v.ordinary.push_back(id);
  }
  if (v.ordinary.empty()) throw std::runtime_error("bench agents: the model's vocabulary has no ordinary tokens");
  return v;
}

std::vector<int32_t> synthetic_tokens(uint64_t seed, TokenStream kind, int32_t agent, int32_t item, int32_t n,
                                      const Vocabulary& vocabulary) {
  uint64_t stream = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(kind)));
  stream = splitmix64(stream ^ static_cast<uint64_t>(static_cast<uint32_t>(agent)));
  stream = splitmix64(stream ^ (static_cast<uint64_t>(static_cast<uint32_t>(item)) << 32));
  std::vector<int32_t> ids(static_cast<size_t>(std::max(0, n)));
  for (size_t i = 0; i < ids.size(); ++i) {
    ids[i] = vocabulary.ordinary[splitmix64(stream + i) % vocabulary.ordinary.size()];
  }
  return ids;
}

std::vector<int32_t> conversation_start(const WorkloadOptions& o, const AgentPlan& agent, int32_t turn,
                                        int32_t first_tokens, const Vocabulary& vocabulary) {
  std::vector<int32_t> ids;
  if (vocabulary.bos) ids.push_back(*vocabulary.bos);
  // Shared: one prompt for every such agent, so its blocks are prefix hits; own: distinct.
  const std::vector<int32_t> system =
      agent.shared_system_prompt
          ? synthetic_tokens(o.seed, TokenStream::shared_system, 0, 0, o.system_tokens, vocabulary)
          : synthetic_tokens(o.seed, TokenStream::own_system, agent.index, 0, o.system_tokens, vocabulary);
  ids.insert(ids.end(), system.begin(), system.end());
  const std::vector<int32_t> first =
      synthetic_tokens(o.seed, TokenStream::first_turn, agent.index, turn, first_tokens, vocabulary);
  ids.insert(ids.end(), first.begin(), first.end());
  return ids;
}

int64_t planned_final_tokens(const WorkloadOptions& o, const AgentPlan& agent, int32_t context) {
  int64_t length = 0;
  bool started = false, after_tool = false;
  const int64_t opening = o.system_tokens + 1;  // + BOS
  for (const TurnPlan& t : agent.turns) {
    const int64_t append = after_tool ? t.tool_result_tokens : t.user_tokens;
    const int64_t max_tokens = std::min(t.max_tokens, std::max(1, context / 4));  // as the agents cap it
    if (!started || length + append + max_tokens > context) {
      length = std::min<int64_t>(opening + t.first_tokens, std::max<int64_t>(1, context - max_tokens));
      started = true;
    } else {
      length += append;
    }
    length += max_tokens;
    after_tool = t.after == AfterTurn::tool;
  }
  return length;
}

}  // namespace den::runtime::cli::bench_agents
