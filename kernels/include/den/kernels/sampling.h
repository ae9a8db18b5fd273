// Token sampling over a row of logits, CPU reference and GPU kernel with one definition:
//   1. penalties for tokens already seen: repetition (divide positive logits, multiply
//      negative ones), presence (subtract once), frequency (subtract per occurrence);
//   2. temperature 0: argmax, the lowest id winning ties; otherwise divide by the temperature;
//   3. top-k: the k best by (logit desc, id asc); top-p: the shortest prefix of that order whose
//      probability reaches p; min-p: drop tokens below min_p times the best probability;
//   4. one uniform draw u from a counter-based generator (seed, step), walking the kept tokens
//      in id order until the cumulative mass passes u times their total.
// Walking in id order means the GPU never sorts a vocabulary: it only finds the kept set.
// Used by the engine's backends; the GPU kernel never copies a row of logits to the host.
#pragma once

#include <cstdint>
#include <span>

#include "den/kernels/cuda_stream.h"
#include "den/kernels/host_device.h"

namespace den::kernels {

struct SamplingConfig {
  float temperature = 0.8f;
  int32_t top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  float repeat_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 0;
};

struct TokenCount {
  int32_t token;
  int32_t count;
};

DEN_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) for draw `step` of stream `seed` (splitmix64 finaliser over a counter).
DEN_HOST_DEVICE inline double sampling_uniform(uint64_t seed, uint64_t step) {
  const uint64_t z = mix64(seed + 0x9e3779b97f4a7c15ull * (step + 1));
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

// Repetition, presence and frequency penalty of one logit seen `count` times.
DEN_HOST_DEVICE inline float penalized(float logit, int32_t count, const SamplingConfig& c) {
  float l = logit > 0.0f ? logit / c.repeat_penalty : logit * c.repeat_penalty;
  return l - (c.presence_penalty + c.frequency_penalty * static_cast<float>(count));
}

// The GPU sorts at most this many candidates in shared memory (top-k larger than this, or
// top-p without top-k over a flat distribution, falls back to a threshold search).
inline constexpr int32_t kMaxSortedCandidates = 1024;

// CPU reference. logits: [n_vocab], modified in place (penalties, temperature).
// seen: distinct tokens of the penalty window with their counts.
int32_t sample_ref(float* logits, int32_t n_vocab, const SamplingConfig& config, std::span<const TokenCount> seen,
                   uint64_t step);

// log softmax of the raw logits at `token`.
float token_logprob_ref(const float* logits, int32_t n_vocab, int32_t token);

// GPU: one row per sequence.
// logits: [n_rows, n_vocab] device, modified in place
// configs: [n_rows] device; seen: [seen_offsets[n_rows]] device pairs, seen_offsets: [n_rows + 1]
// steps: [n_rows] device; tokens: [n_rows] out; logprobs: [n_rows] out (raw-logit log softmax
// of the chosen token), or null
void sample_cuda(float* logits, int32_t n_rows, int32_t n_vocab, const SamplingConfig* configs,
                 const TokenCount* seen, const int32_t* seen_offsets, const uint64_t* steps, int32_t* tokens,
                 float* logprobs, CudaStream stream);

// Plain greedy rows (temperature 0, no penalty that changes a logit, no log-probability): the
// argmax of each row, lowest id on ties, as sample_cuda picks it, but spread over many blocks
// per row (sample_cuda reads a row with one block: 9 us for 128,256 logits on an H200, a
// thousandth of a 1B-shape step). The blocks' winners meet through the workspace; the last
// block of a row picks among them. CPU twin: sample_ref with temperature 0.
// logits: [n_rows, n_vocab] device; tokens: [n_rows] out; workspace: argmax_workspace_bytes(),
// zeroed once before first use (its counters return to zero after every launch).
size_t argmax_workspace_bytes(int32_t n_rows);
void argmax_cuda(const float* logits, int32_t n_rows, int32_t n_vocab, int32_t* tokens, void* workspace,
                 CudaStream stream);

}  // namespace den::kernels
