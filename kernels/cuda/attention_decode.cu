// Decode attention over paged KV (f16/bf16, head_dim 64 or 128), one query token per sequence.
// A block of 4 warps handles (KV head, split, sequence) and walks its split in chunks of 128
// positions, one position per thread, in three phases per chunk:
//   A. scores: each thread reads its K row whole (all 16-byte pieces issued before use) and
//      takes its dot products with the G query heads sharing the KV head (q in shared memory,
//      read by broadcast): no cross-lane reductions at all;
//   B. softmax bookkeeping: warp g takes head g's chunk max and rescales its running sum;
//   C. values: each warp takes a quarter of the chunk's rows, each lane a few columns of every
//      head, so V rows are read coalesced and weights come from shared memory by broadcast.
// Splits of a sequence write partial (max, sum, accumulator) states; the last block to finish
// a (sequence, KV head) merges them (a counter per pair, reset by that block), loading every
// split's state in parallel, so no second kernel is launched. Scores are in the log2 domain
// (q pre-scaled by scale * log2 e).
#include <cmath>
#include <type_traits>

#include "attention_common.cuh"
#include "den/kernels/attention.h"
#include "den/kernels/cuda_check.h"
#include "pdl.cuh"

namespace den::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = kThreads;  // one position per thread in phase A
constexpr int kRowsInFlight = 8;  // phase C: V rows each lane has loads out for
constexpr int kMaxSplits = 128;

template <typename T, int HD, int G>
__global__ void __launch_bounds__(kThreads)
    decode_attention_kernel(const T* __restrict__ q, T* __restrict__ out, PagedKvView kv, PagedBatch batch,
                            const DecodeEntry* __restrict__ decode, int32_t layer, int32_t n_heads,
                            float scale_log2, int32_t split_tokens, int32_t n_splits, float* __restrict__ partial,
                            int32_t* __restrict__ counters) {
  constexpr int VEC = kVec<T>;        // elements per 16-byte piece
  constexpr int PIECES = HD / VEC;    // pieces per row
  constexpr int COLS = HD / 32;       // phase C: columns per lane
  pdl_allow_next();
  const int kv_head = blockIdx.x, split = blockIdx.y, d = blockIdx.z;
  const DecodeEntry entry = decode[d];  // the step's plan: no kernel writes it
  const int token = entry.token;
  const int len = entry.kv_length;
  const int begin = split * split_tokens;
  const int end = min(len, begin + split_tokens);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  __shared__ __align__(16) float q_s[G][HD];
  __shared__ float scores[G][kChunk];
  __shared__ float run_max[G], run_sum[G], rescale[G];
  __shared__ float reduce_buf[kWarps][G][HD];

  const int32_t* table = batch.block_tables + entry.table_offset;
  const T* pool = static_cast<const T*>(kv.blocks);
  const int bt = kv.layout.block_tokens;
  const int64_t v_offset = kv.layout.slab_elements();
  auto row_offset = [&](int p) {
    return kv.offset(table[p / bt], layer, 0, p % bt) + static_cast<int64_t>(kv_head) * HD;
  };

  // Everything above came from the plan; q and this token's K/V come from the previous kernel.
  pdl_wait();
  for (int i = threadIdx.x; i < G * HD; i += kThreads) {
    const int g = i / HD, col = i % HD;
    q_s[g][col] = to_float<T>(q[(static_cast<int64_t>(token) * n_heads + kv_head * G + g) * HD + col]) * scale_log2;
  }
  if (threadIdx.x < G) {
    run_max[threadIdx.x] = -INFINITY;
    run_sum[threadIdx.x] = 0.0f;
  }
  float acc[G][COLS];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[g][c] = 0.0f;
  __syncthreads();

  for (int c0 = begin; c0 < end; c0 += kChunk) {
    const int c_end = min(end, c0 + kChunk);
    // A: this thread's row, every piece in flight, then G dot products.
    {
      const int p = c0 + threadIdx.x;
      float s[G];
#pragma unroll
      for (int g = 0; g < G; ++g) s[g] = -INFINITY;
      if (p < c_end) {
        const T* row = pool + row_offset(p);
        uint4 raw[PIECES];
#pragma unroll
        for (int i = 0; i < PIECES; ++i) raw[i] = *reinterpret_cast<const uint4*>(row + i * VEC);
#pragma unroll
        for (int g = 0; g < G; ++g) s[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < PIECES; ++i) {
          const T* e = reinterpret_cast<const T*>(&raw[i]);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float k = to_float<T>(e[j]);
#pragma unroll
            for (int g = 0; g < G; ++g) s[g] = fmaf(q_s[g][i * VEC + j], k, s[g]);
          }
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) scores[g][threadIdx.x] = s[g];
    }
    __syncthreads();
    // B: warp g turns head g's scores into weights and updates its running max and sum.
    if (warp < G) {
      const int g = warp;
      float m = -INFINITY;
      for (int i = lane; i < kChunk; i += 32) m = fmaxf(m, scores[g][i]);
      m = warp_max(m);
      const float m_new = fmaxf(run_max[g], m);
      float l = 0.0f;
      for (int i = lane; i < kChunk; i += 32) {
        const float w = m_new == -INFINITY ? 0.0f : exp2f(scores[g][i] - m_new);
        scores[g][i] = w;
        l += w;
      }
      l = warp_sum(l);
      if (lane == 0) {
        const float r = run_max[g] == -INFINITY ? 0.0f : exp2f(run_max[g] - m_new);
        rescale[g] = r;
        run_sum[g] = run_sum[g] * r + l;
        run_max[g] = m_new;
      }
    }
    __syncthreads();
    // C: warp w takes rows w, w + 4, ...; lane takes columns lane * COLS ...
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int c = 0; c < COLS; ++c) acc[g][c] *= rescale[g];
    for (int r0 = warp; r0 < c_end - c0; r0 += kWarps * kRowsInFlight) {
      float vf[kRowsInFlight][COLS];
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        const int r = r0 + u * kWarps;
        if (r < c_end - c0) {
          const T* row = pool + row_offset(c0 + r) + v_offset + lane * COLS;
          // COLS elements in one load (8 bytes at head_dim 128, 4 at 64).
          using Packed = std::conditional_t<COLS * sizeof(T) == 8, uint2, uint32_t>;
          const Packed raw = *reinterpret_cast<const Packed*>(row);
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int c = 0; c < COLS; ++c) vf[u][c] = to_float<T>(e[c]);
        }
      }
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        const int r = r0 + u * kWarps;
        if (r >= c_end - c0) break;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float w = scores[g][r];
#pragma unroll
          for (int c = 0; c < COLS; ++c) acc[g][c] = fmaf(w, vf[u][c], acc[g][c]);
        }
      }
    }
    __syncthreads();  // scores are rewritten by the next chunk
  }

  // Sum the warps' accumulators.
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int c = 0; c < COLS; ++c) reduce_buf[warp][g][lane * COLS + c] = acc[g][c];
  __syncthreads();
  const bool single = n_splits == 1;
  for (int e = threadIdx.x; e < G * HD; e += kThreads) {
    const int g = e / HD, col = e % HD;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += reduce_buf[w][g][col];
    const int head = kv_head * G + g;
    if (single) {
      out[(static_cast<int64_t>(token) * n_heads + head) * HD + col] =
          from_float<T>(run_sum[g] > 0.0f ? total / run_sum[g] : 0.0f);
    } else {
      float* dst = partial + ((static_cast<int64_t>(d) * n_heads + head) * n_splits + split) * (HD + 2);
      if (col == 0) {
        dst[0] = run_max[g];
        dst[1] = run_sum[g];
      }
      dst[2 + col] = total;
    }
  }
  if (single) return;

  // The last split to finish merges all of them.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* counter = counters + static_cast<int64_t>(d) * kv.layout.n_kv_heads + kv_head;
    last = atomicAdd(counter, 1) == n_splits - 1;
    if (last) *counter = 0;  // ready for the next launch
  }
  __syncthreads();
  if (!last) return;
  // Merge: every split's (max, sum) into shared memory in one parallel load, the scale of each
  // split per head, then each output element as independent L2 loads (__ldcg: other blocks
  // wrote them; L1 may hold nothing stale).
  __threadfence();
  __shared__ float split_max[kMaxSplits][G], split_scale[kMaxSplits][G], inv_total[G];
  const float* head_base = partial + (static_cast<int64_t>(d) * n_heads + kv_head * G) * n_splits * (HD + 2);
  for (int i = threadIdx.x; i < n_splits * G; i += kThreads) {
    const int sp = i / G, g = i % G;
    const float* state = head_base + (static_cast<int64_t>(g) * n_splits + sp) * (HD + 2);
    split_max[sp][g] = __ldcg(state);
    split_scale[sp][g] = __ldcg(state + 1);  // the sum for now
  }
  __syncthreads();
  if (threadIdx.x < G) {
    const int g = threadIdx.x;
    float m = -INFINITY;
    for (int sp = 0; sp < n_splits; ++sp) m = fmaxf(m, split_max[sp][g]);
    float l = 0.0f;
    for (int sp = 0; sp < n_splits; ++sp) {
      const float f = m == -INFINITY || split_max[sp][g] == -INFINITY ? 0.0f : exp2f(split_max[sp][g] - m);
      l += split_scale[sp][g] * f;
      split_scale[sp][g] = f;
    }
    inv_total[g] = l > 0.0f ? 1.0f / l : 0.0f;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * HD; e += kThreads) {
    const int g = e / HD, col = e % HD;
    const float* acc_base = head_base + static_cast<int64_t>(g) * n_splits * (HD + 2) + 2 + col;
    float a = 0.0f;
#pragma unroll 8
    for (int sp = 0; sp < n_splits; ++sp) {
      a = fmaf(split_scale[sp][g], __ldcg(acc_base + static_cast<int64_t>(sp) * (HD + 2)), a);
    }
    out[(static_cast<int64_t>(token) * n_heads + kv_head * G + g) * HD + col] = from_float<T>(a * inv_total[g]);
  }
}

template <typename F>
void dispatch_group(int32_t group, F&& f) {
  switch (group) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: throw std::invalid_argument("decode attention: 1 to 8 query heads per KV head are supported");
  }
}

}  // namespace

void decode_attention_launch(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch,
                             const AttentionPlan& plan, int32_t layer, int32_t n_heads, float scale,
                             CudaStream stream) {
  if (plan.n_decode == 0) return;
  if (plan.n_splits > kMaxSplits) throw std::invalid_argument("decode attention: at most 128 KV splits");
  const int32_t n_kv = kv.layout.n_kv_heads;
  const int32_t group = n_heads / n_kv;
  const float scale_log2 = scale * 1.4426950408889634f;
  const dim3 grid(static_cast<unsigned>(n_kv), static_cast<unsigned>(plan.n_splits), static_cast<unsigned>(plan.n_decode));
  if (static_cast<size_t>(plan.n_decode) * n_kv * sizeof(int32_t) > kAttentionCounterBytes) {
    throw std::invalid_argument("decode attention: too many sequences in one step for the merge counters");
  }
  // The workspace: merge counters, then the partial states.
  int32_t* counters = reinterpret_cast<int32_t*>(plan.partial);
  float* partial = reinterpret_cast<float*>(reinterpret_cast<char*>(plan.partial) + kAttentionCounterBytes);
  dispatch_half_types(kv.layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(kv.layout.head_dim, [&](auto hd_tag) {
      constexpr int HD = decltype(hd_tag)::value;
      dispatch_group(group, [&](auto g_tag) {
        constexpr int G = decltype(g_tag)::value;
        launch_chained(decode_attention_kernel<T, HD, G>, grid, dim3(kThreads), 0, stream, static_cast<const T*>(q),
                       static_cast<T*>(out), kv, batch, plan.decode, layer, n_heads, scale_log2, plan.split_tokens,
                       plan.n_splits, partial, counters);
      });
      check_launch();
    });
  });
}

}  // namespace den::kernels
