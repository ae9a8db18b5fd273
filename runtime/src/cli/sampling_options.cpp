// Sampling options shared by generate and chat.
#include <cstdio>
#include <random>

#include "commands.h"

namespace den::runtime::cli {

void add_sampling_options(CLI::App& command, engine::SamplingParams& p, bool& seed_given) {
  command.add_option("--temp", p.temperature, "Sampling temperature; 0 is greedy")->capture_default_str();
  command.add_option("--top-k", p.top_k, "Keep the k most likely tokens (0: off)")->capture_default_str();
  command.add_option("--top-p", p.top_p, "Keep the smallest set with this probability mass (1: off)")
      ->capture_default_str();
  command.add_option("--min-p", p.min_p, "Drop tokens below this fraction of the best one's probability (0: off)")
      ->capture_default_str();
  command.add_option("--repeat-penalty", p.repeat_penalty, "Penalty for tokens in the recent window (1: off)")
      ->capture_default_str();
  command.add_option("--repeat-last-n", p.repeat_last_n, "Window of the penalties in tokens (-1: everything)")
      ->capture_default_str();
  command.add_option("--presence-penalty", p.presence_penalty, "Subtracted once from seen tokens' logits")
      ->capture_default_str();
  command.add_option("--frequency-penalty", p.frequency_penalty, "Subtracted per occurrence from seen tokens' logits")
      ->capture_default_str();
  command.add_option_function<uint64_t>(
      "--seed",
      [&p, &seed_given](const uint64_t& s) {
        p.seed = s;
        seed_given = true;
      },
      "Random seed (default: a random one, printed on stderr)");
}

void finalize_seed(engine::SamplingParams& p, bool seed_given) {
  p.validate();
  if (seed_given || p.temperature <= 0.0f) return;
  std::random_device rd;
  p.seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  std::fprintf(stderr, "seed: %llu\n", static_cast<unsigned long long>(p.seed));
}

}  // namespace den::runtime::cli
