// The restore-vs-recompute cost model (restore_cost.h).
#include "den/memory/restore_cost.h"

#include <algorithm>

namespace den::memory {

std::string_view tier_name(Tier tier) {
  switch (tier) {
    case Tier::fast: return "fast";
    case Tier::dram: return "dram";
    case Tier::ssd: return "ssd";
    case Tier::none: return "none";
  }
  return "?";
}

RestorePlan plan_restore(const RestoreCosts& costs, Tier from, int32_t tokens, int64_t bytes_per_token) {
  RestorePlan plan;
  if (tokens <= 0 || from == Tier::fast) return plan;
  const double bandwidth = from == Tier::dram ? costs.dram_to_fast_bytes_per_s : costs.ssd_read_bytes_per_s;
  const auto load_s = [&](int32_t n) {
    return n == 0 ? 0.0 : costs.fixed_wake_s + static_cast<double>(n) * static_cast<double>(bytes_per_token) / bandwidth;
  };
  const auto recompute_s = [&](int32_t n) { return static_cast<double>(n) / costs.prefill_tokens_per_s; };
  plan.all_load_s = from == Tier::none ? 1e300 : load_s(tokens);
  plan.all_recompute_s = recompute_s(tokens);

  if (from == Tier::none) {
    plan.recompute_tokens = tokens;
  } else if (!costs.layerwise) {
    // One after the other: time is linear in the split, so an end point wins.
    if (plan.all_load_s <= plan.all_recompute_s) plan.load_tokens = tokens; else plan.recompute_tokens = tokens;
  } else {
    // Overlapped: the tail's prefill runs while the front arrives; balance the two
    // (load(x) = recompute(n - x)), ignoring the fixed cost, then compare with the pure plans.
    const double per_token_load = static_cast<double>(bytes_per_token) / bandwidth;
    const double per_token_compute = 1.0 / costs.prefill_tokens_per_s;
    const auto balanced = static_cast<int32_t>(static_cast<double>(tokens) * per_token_compute /
                                               (per_token_load + per_token_compute));
    const int32_t front = std::clamp(balanced, 0, tokens);
    const double split_s = std::max(load_s(front), recompute_s(tokens - front));
    if (split_s < std::min(plan.all_load_s, plan.all_recompute_s)) {
      plan.load_tokens = front;
      plan.recompute_tokens = tokens - front;
    } else if (plan.all_load_s <= plan.all_recompute_s) {
      plan.load_tokens = tokens;
    } else {
      plan.recompute_tokens = tokens;
    }
  }
  plan.load_s = load_s(plan.load_tokens);
  plan.recompute_s = recompute_s(plan.recompute_tokens);
  plan.total_s = costs.layerwise ? std::max(plan.load_s, plan.recompute_s) : plan.load_s + plan.recompute_s;
  return plan;
}

}  // namespace den::memory
