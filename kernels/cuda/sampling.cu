// Sampling on the GPU, one block of 1024 threads per row; the host gets only token ids (and
// log-probabilities). Same definition as sample_ref (den/kernels/sampling.h):
//  - greedy: block argmax, lowest id on ties;
//  - top-k up to kMaxSortedCandidates (the usual case): a radix select finds the k-th largest
//    logit, the k candidates go to shared memory, a bitonic sort orders them as the reference
//    does, one thread applies top-p / min-p and walks the kept ones in id order in double
//    precision, exactly as the reference: the same token for the same logits;
//  - otherwise (no top-k, or a larger one): thresholds found by bisection over the ordered
//    float keys, and a block-wide prefix walk in id order. Ties at a top-p threshold are all
//    kept here, where the reference keeps them in id order: the one documented difference.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <stdexcept>

#include "den/kernels/cuda_check.h"
#include "den/kernels/sampling.h"
#include "device_types.cuh"
#include "pdl.cuh"

namespace den::kernels {
namespace {

constexpr int kThreads = 1024;
constexpr int kMaxSavedRaw = 2048;  // raw logits of penalised tokens kept for the log-probability

__device__ __forceinline__ uint32_t ordered_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct BlockScratch {
  float f[32];
  double d[32];
  int i[32];
};

__device__ float block_max(float v, BlockScratch& s) {
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) s.f[threadIdx.x / 32] = v;
  __syncthreads();
  float r = s.f[0];
  for (int w = 1; w < kThreads / 32; ++w) r = fmaxf(r, s.f[w]);
  __syncthreads();
  return r;
}

__device__ double block_sum(double v, BlockScratch& s) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) s.d[threadIdx.x / 32] = v;
  __syncthreads();
  double r = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) r += s.d[w];
  __syncthreads();
  return r;
}

// Keeps (v, i) when it beats (best, index): a larger value, or the same at a lower index.
__device__ __forceinline__ void keep_better(float& best, int& index, float v, int i) {
  if (v > best || (v == best && i < index)) {
    best = v;
    index = i;
  }
}

// (value, index) argmax, lowest index on ties.
__device__ int block_argmax(const float* l, int n, BlockScratch& s) {
  float best = -INFINITY;
  int index = n;
  for (int i = threadIdx.x; i < n; i += kThreads) keep_better(best, index, l[i], i);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    keep_better(best, index, __shfl_xor_sync(0xffffffffu, best, off), __shfl_xor_sync(0xffffffffu, index, off));
  }
  if (threadIdx.x % 32 == 0) {
    s.f[threadIdx.x / 32] = best;
    s.i[threadIdx.x / 32] = index;
  }
  __syncthreads();
  float b = s.f[0];
  int r = s.i[0];
  for (int w = 1; w < kThreads / 32; ++w) keep_better(b, r, s.f[w], s.i[w]);
  __syncthreads();
  return r;
}

struct Candidate {
  float logit;  // penalised and divided by the temperature
  int id;
};

// Sorts list[0, count) (count <= kMaxSortedCandidates) in place: by_logit orders by
// (logit desc, id asc), otherwise by id asc. Unused slots hold sentinels that sort last.
__device__ void bitonic_sort(Candidate* list, int count, bool by_logit) {
  int size = 1;
  while (size < count) size *= 2;
  for (int i = count + threadIdx.x; i < size; i += kThreads) list[i] = {-INFINITY, 0x7fffffff};
  __syncthreads();
  auto before = [by_logit](const Candidate& a, const Candidate& b) {
    if (by_logit) return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
    return a.id < b.id;
  };
  for (int k = 2; k <= size; k *= 2) {
    for (int j = k / 2; j > 0; j /= 2) {
      for (int i = threadIdx.x; i < size; i += kThreads) {
        const int partner = i ^ j;
        if (partner > i) {
          const bool ascending = (i & k) == 0;
          const bool swap = ascending ? before(list[partner], list[i]) : before(list[i], list[partner]);
          if (swap) {
            const Candidate t = list[i];
            list[i] = list[partner];
            list[partner] = t;
          }
        }
      }
      __syncthreads();
    }
  }
}

// The k-th largest key and how many elements equal to it belong to the top k.
__device__ void radix_select(const float* l, int n, int k, uint32_t& kth, int& need_equal) {
  __shared__ int hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  if (threadIdx.x == 0) {
    s_prefix = 0;
    s_remaining = k;
  }
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const uint32_t key = ordered_key(l[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0;
      for (int b = 255; b >= 0; --b) {
        if (above + hist[b] >= s_remaining) {
          s_remaining -= above;
          s_prefix = prefix | (static_cast<uint32_t>(b) << shift);
          break;
        }
        above += hist[b];
      }
    }
    mask |= 255u << shift;
    __syncthreads();
  }
  kth = s_prefix;
  need_equal = s_remaining;
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(float* __restrict__ logits, int32_t n_vocab, const SamplingConfig* __restrict__ configs,
                  const TokenCount* __restrict__ seen, const int32_t* __restrict__ seen_offsets,
                  const uint64_t* __restrict__ steps, int32_t* __restrict__ tokens, float* __restrict__ logprobs) {
  pdl_allow_next();
  pdl_wait();  // the logits come from the kernel before
  __shared__ BlockScratch scratch;
  __shared__ Candidate list[kMaxSortedCandidates];
  __shared__ float saved_raw[kMaxSavedRaw];
  __shared__ int s_token;
  const int row = blockIdx.x;
  float* l = logits + static_cast<int64_t>(row) * n_vocab;
  const SamplingConfig c = configs[row];
  const int seen_begin = seen_offsets[row], n_seen = seen_offsets[row + 1] - seen_begin;

  // Raw log-sum-exp for the chosen token's log-probability, before anything changes the row.
  float raw_max = 0.0f;
  double raw_sum = 0.0;
  if (logprobs != nullptr) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n_vocab; i += kThreads) m = fmaxf(m, l[i]);
    raw_max = block_max(m, scratch);
    double sum = 0.0;
    for (int i = threadIdx.x; i < n_vocab; i += kThreads) sum += exp(static_cast<double>(l[i] - raw_max));
    raw_sum = block_sum(sum, scratch);
  }
  for (int j = threadIdx.x; j < n_seen; j += kThreads) {
    const TokenCount tc = seen[seen_begin + j];
    if (tc.token < 0 || tc.token >= n_vocab || tc.count <= 0) continue;
    if (j < kMaxSavedRaw) saved_raw[j] = l[tc.token];
    l[tc.token] = penalized(l[tc.token], tc.count, c);
  }
  __syncthreads();

  if (c.temperature <= 0.0f) {
    const int best = block_argmax(l, n_vocab, scratch);
    if (threadIdx.x == 0) s_token = best;
  } else {
    const float temperature = c.temperature;
    const uint64_t step = steps[row];
    const bool small_top_k = c.top_k > 0 && c.top_k < n_vocab && c.top_k <= kMaxSortedCandidates;
    if (small_top_k) {
      uint32_t kth;
      int need_equal;
      radix_select(l, n_vocab, c.top_k, kth, need_equal);
      // Gather the k candidates in id order: a contiguous chunk of ids per thread, then an
      // exclusive scan of the chunks' counts gives each thread its place in the list.
      const int chunk = (n_vocab + kThreads - 1) / kThreads;
      const int lo = threadIdx.x * chunk, hi = min(n_vocab, lo + chunk);
      int greater = 0, equal = 0;
      for (int i = lo; i < hi; ++i) {
        const uint32_t key = ordered_key(l[i]);
        greater += key > kth;
        equal += key == kth;
      }
      __shared__ int s_greater[kThreads], s_equal[kThreads];
      s_greater[threadIdx.x] = greater;
      s_equal[threadIdx.x] = equal;
      __syncthreads();
      if (threadIdx.x == 0) {
        int g = 0, e = 0;
        for (int t = 0; t < kThreads; ++t) {
          const int tg = s_greater[t], te = s_equal[t];
          s_greater[t] = g;
          s_equal[t] = e;
          g += tg;
          e += te;
        }
      }
      __syncthreads();
      int pos = s_greater[threadIdx.x] + min(s_equal[threadIdx.x], need_equal);
      int equal_seen = s_equal[threadIdx.x];
      for (int i = lo; i < hi; ++i) {
        const uint32_t key = ordered_key(l[i]);
        if (key > kth || (key == kth && equal_seen++ < need_equal)) list[pos++] = {l[i] / temperature, i};
      }
      __syncthreads();
      const int k = c.top_k;
      bitonic_sort(list, k, true);
      __shared__ int s_kept;
      if (threadIdx.x == 0) {
        const float best = list[0].logit;
        int kept = k;
        if (c.top_p < 1.0f) {
          double total = 0.0;
          for (int i = 0; i < k; ++i) total += exp(static_cast<double>(list[i].logit - best));
          double mass = 0.0;
          int n = 0;
          while (n < k) {
            mass += exp(static_cast<double>(list[n++].logit - best));
            if (mass >= static_cast<double>(c.top_p) * total) break;
          }
          kept = n;
        }
        int w = 0;
        for (int i = 0; i < kept; ++i) {
          if (c.min_p > 0.0f && exp(static_cast<double>(list[i].logit - best)) < static_cast<double>(c.min_p)) continue;
          list[w++] = {list[i].logit - best, list[i].id};  // keep the logit relative to the best
        }
        s_kept = w;
      }
      __syncthreads();
      bitonic_sort(list, s_kept, false);
      if (threadIdx.x == 0) {
        double total = 0.0;
        for (int i = 0; i < s_kept; ++i) total += exp(static_cast<double>(list[i].logit));
        const double target = sampling_uniform(c.seed, step) * total;
        double acc = 0.0;
        int token = list[s_kept - 1].id;
        for (int i = 0; i < s_kept; ++i) {
          acc += exp(static_cast<double>(list[i].logit));
          if (target < acc) {
            token = list[i].id;
            break;
          }
        }
        s_token = token;
      }
    } else {
      // Threshold regime: keys of the penalised logits (dividing by a positive temperature
      // keeps the order).
      float m = -INFINITY;
      for (int i = threadIdx.x; i < n_vocab; i += kThreads) m = fmaxf(m, l[i]);
      const float best = block_max(m, scratch) / temperature;
      uint32_t k_threshold = 0;  // keys >= this are in the top-k set
      if (c.top_k > 0 && c.top_k < n_vocab) {
        int need;
        radix_select(l, n_vocab, c.top_k, k_threshold, need);
      }
      auto weight = [&](int i) -> double {
        const float v = l[i] / temperature;
        return ordered_key(l[i]) >= k_threshold ? exp(static_cast<double>(v - best)) : 0.0;
      };
      uint32_t p_threshold = 0;
      if (c.top_p < 1.0f) {
        double t = 0.0;
        for (int i = threadIdx.x; i < n_vocab; i += kThreads) t += weight(i);
        const double goal = block_sum(t, scratch) * static_cast<double>(c.top_p);
        // The largest key whose tail (keys >= it) still holds the goal mass.
        uint64_t lo = 0, hi = 0xffffffffu;  // 64-bit: hi - lo + 1 must not wrap
        while (lo < hi) {
          const uint64_t mid = lo + (hi - lo + 1) / 2;
          double part = 0.0;
          for (int i = threadIdx.x; i < n_vocab; i += kThreads) {
            if (ordered_key(l[i]) >= mid) part += weight(i);
          }
          if (block_sum(part, scratch) >= goal) {
            lo = mid;
          } else {
            hi = mid - 1;
          }
        }
        p_threshold = static_cast<uint32_t>(lo);
      }
      const double min_weight = c.min_p > 0.0f ? static_cast<double>(c.min_p) : 0.0;
      auto kept_weight = [&](int i) -> double {
        if (ordered_key(l[i]) < p_threshold) return 0.0;
        const double w = weight(i);
        return w >= min_weight ? w : 0.0;
      };
      const int chunk = (n_vocab + kThreads - 1) / kThreads;
      const int lo = threadIdx.x * chunk, hi = min(n_vocab, lo + chunk);
      double mine = 0.0;
      for (int i = lo; i < hi; ++i) mine += kept_weight(i);
      __shared__ double s_prefix[kThreads];
      s_prefix[threadIdx.x] = mine;
      __syncthreads();
      if (threadIdx.x == 0) {
        double run = 0.0;
        for (int t = 0; t < kThreads; ++t) {
          const double v = s_prefix[t];
          s_prefix[t] = run;
          run += v;
        }
        scratch.d[0] = run;
        s_token = -1;
      }
      __syncthreads();
      const double target = sampling_uniform(c.seed, step) * scratch.d[0];
      const double start = s_prefix[threadIdx.x];
      if (mine > 0.0 && target >= start && target < start + mine) {
        double acc = start;
        for (int i = lo; i < hi; ++i) {
          acc += kept_weight(i);
          if (target < acc) {
            s_token = i;
            break;
          }
        }
      }
      __syncthreads();
      if (threadIdx.x == 0 && s_token < 0) {  // rounding put the target past the end: the last kept
        for (int i = n_vocab - 1; i >= 0; --i) {
          if (kept_weight(i) > 0.0) {
            s_token = i;
            break;
          }
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int token = s_token;
    tokens[row] = token;
    if (logprobs != nullptr) {
      float raw = l[token];
      for (int j = 0; j < n_seen && j < kMaxSavedRaw; ++j) {
        if (seen[seen_begin + j].token == token && seen[seen_begin + j].count > 0) raw = saved_raw[j];
      }
      logprobs[row] = static_cast<float>(static_cast<double>(raw - raw_max) - log(raw_sum));
    }
  }
  timeline_end();
}

// Argmax over a slice of a row per block (see argmax_cuda).
constexpr int kArgmaxThreads = 256;
constexpr int kArgmaxMaxChunks = 64;
constexpr int kArgmaxUnroll = 8;

struct ArgmaxCandidate {
  float value;
  int32_t index;
};

// The block's best (value, index) in thread 0.
__device__ ArgmaxCandidate block_best(float best, int index) {
  __shared__ ArgmaxCandidate warp_best[kArgmaxThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    keep_better(best, index, __shfl_xor_sync(0xffffffffu, best, off), __shfl_xor_sync(0xffffffffu, index, off));
  }
  if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = {best, index};
  __syncthreads();
  ArgmaxCandidate r = warp_best[0];
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / 32; ++w) keep_better(r.value, r.index, warp_best[w].value, warp_best[w].index);
  }
  return r;
}

__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_kernel(const float* __restrict__ logits, int32_t n_vocab, int32_t* __restrict__ tokens,
                  ArgmaxCandidate* __restrict__ candidates, int32_t* __restrict__ counters) {
  pdl_allow_next();
  pdl_wait();  // the logits come from the kernel before
  const int row = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
  const float* l = logits + static_cast<int64_t>(row) * n_vocab;
  const int lo = static_cast<int>(static_cast<int64_t>(chunk) * n_vocab / chunks);
  const int hi = static_cast<int>(static_cast<int64_t>(chunk + 1) * n_vocab / chunks);
  // Each thread's indices increase, so a strict comparison keeps its lowest id on ties; the
  // loads of a round are independent, all in flight at once. Through L2 (pdl.cuh: the logits
  // are the chained predecessor's output).
  float best = -INFINITY;
  int index = n_vocab;
  int i = lo + static_cast<int>(threadIdx.x);
  for (; i + (kArgmaxUnroll - 1) * kArgmaxThreads < hi; i += kArgmaxUnroll * kArgmaxThreads) {
    float v[kArgmaxUnroll];
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u) v[u] = __ldcg(l + i + u * kArgmaxThreads);
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u) keep_better(best, index, v[u], i + u * kArgmaxThreads);
  }
  for (; i < hi; i += kArgmaxThreads) keep_better(best, index, __ldcg(l + i), i);
  const ArgmaxCandidate mine = block_best(best, index);

  // The last block of the row to finish picks among the blocks' candidates (release by each
  // block's thread 0 after its own write, acquire by the last one: as in decode attention).
  __shared__ bool last;
  if (threadIdx.x == 0) {
    candidates[row * chunks + chunk] = mine;
    last = arrive_last(counters + row, chunks);
  }
  __syncthreads();
  if (!last) {
    timeline_end();
    return;
  }
  best = -INFINITY;
  index = n_vocab;
  if (threadIdx.x < chunks) {
    const ArgmaxCandidate c = candidates[row * chunks + threadIdx.x];
    keep_better(best, index, c.value, c.index);
  }
  const ArgmaxCandidate winner = block_best(best, index);
  if (threadIdx.x == 0) tokens[row] = winner.index;
  timeline_end();
}

}  // namespace

size_t argmax_workspace_bytes(int32_t n_rows) {
  // Counters first, then the candidates (16-byte aligned).
  return (static_cast<size_t>(n_rows) * sizeof(int32_t) + 15) / 16 * 16 +
         static_cast<size_t>(n_rows) * kArgmaxMaxChunks * sizeof(ArgmaxCandidate);
}

void argmax_cuda(const float* logits, int32_t n_rows, int32_t n_vocab, int32_t* tokens, void* workspace,
                 CudaStream stream) {
  if (n_rows == 0) return;
  if (n_vocab < 1) throw std::invalid_argument("argmax_cuda: n_vocab must be positive");
  // About 2,048 logits a block (a round of 8 loads a thread), at most kArgmaxMaxChunks a row.
  const int chunks = static_cast<int>(std::clamp<int64_t>((n_vocab + 2047) / 2048, 1, kArgmaxMaxChunks));
  auto* counters = static_cast<int32_t*>(workspace);
  auto* candidates = reinterpret_cast<ArgmaxCandidate*>(
      static_cast<char*>(workspace) + (static_cast<size_t>(n_rows) * sizeof(int32_t) + 15) / 16 * 16);
  launch_chained(argmax_kernel, dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(n_rows)),
                 dim3(kArgmaxThreads), 0, stream, logits, n_vocab, tokens, candidates, counters);
  check_launch();
}

void sample_cuda(float* logits, int32_t n_rows, int32_t n_vocab, const SamplingConfig* configs,
                 const TokenCount* seen, const int32_t* seen_offsets, const uint64_t* steps, int32_t* tokens,
                 float* logprobs, CudaStream stream) {
  if (n_rows == 0) return;
  launch_chained(sample_kernel, dim3(static_cast<unsigned>(n_rows)), dim3(kThreads), 0, stream, logits, n_vocab,
                 configs, seen, seen_offsets, steps, tokens, logprobs);
  check_launch();
}

}  // namespace den::kernels
