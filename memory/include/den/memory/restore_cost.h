// The restore-vs-recompute cost model: given how many tokens of KV a session would need to bring
// back, from which tier, the measured link bandwidths and the engine's prefill rate, decide
// whether to load the KV, recompute it from the token history, or load the front and recompute
// the tail. Used by the session manager before every wake and printed by `den bench resume`.
#pragma once

#include <cstdint>
#include <string_view>

namespace den::memory {

enum class Tier : uint8_t { fast, dram, ssd, none };
std::string_view tier_name(Tier tier);

struct RestoreCosts {
  double dram_to_fast_bytes_per_s = 20e9;  // pinned host -> fast pool (PCIe, or memcpy on CPU)
  double ssd_read_bytes_per_s = 1e9;       // segment reads
  double prefill_tokens_per_s = 2000;      // the engine's prefill rate (long prompts)
  double fixed_wake_s = 0;                 // per-wake overhead (file open, launch)
  bool layerwise = false;                  // loading layer l overlaps computing layer l-1
};

struct RestorePlan {
  int32_t load_tokens = 0;       // the front, loaded
  int32_t recompute_tokens = 0;  // the tail, recomputed
  double load_s = 0;
  double recompute_s = 0;
  double total_s = 0;            // the estimate for the chosen plan
  double all_load_s = 0;         // the two pure plans, for reports
  double all_recompute_s = 0;
};

// `tokens` tokens of KV, `bytes_per_token` each, now in `from` (dram or ssd). Without layer-wise
// overlap the two parts run one after the other, so the cheaper pure plan always wins; with it
// they overlap and the split balances load time against recompute time.
RestorePlan plan_restore(const RestoreCosts& costs, Tier from, int32_t tokens, int64_t bytes_per_token);

}  // namespace den::memory
