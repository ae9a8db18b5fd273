// Decode attention over paged KV (f16/bf16, head_dim 64 or 128), one query token per sequence.
// A block of 4 warps handles (KV head, split, sequence) and walks its split in chunks of up to
// kChunk positions, in three phases per chunk:
//   A. scores: lanes grouped LANES_PER_ROW to a K row (16-byte loads, each row read once for
//      all G query heads sharing the KV head), kUnroll rows per group in flight; scores go to
//      shared memory;
//   B. softmax bookkeeping: warp g takes head g's chunk max, rescales its running sum;
//   C. values: the same lane groups accumulate p * V rows in registers, kUnroll rows in flight.
// No per-row dependency chain (unlike a per-row online softmax), modest registers, many bytes
// in flight. Splits of a sequence write partial (max, sum, accumulator) states; the last block
// to finish a (sequence, KV head) merges them (a counter per pair, reset by that block), so no
// second kernel is launched; the merge loads every split's state in parallel. Scores are in the log2 domain (q pre-scaled by scale * log2 e).
#include <cmath>

#include "attention_common.cuh"
#include "den/kernels/attention.h"
#include "den/kernels/cuda_check.h"

namespace den::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 256;   // positions per chunk (scores in shared memory)
constexpr int kUnroll = 8;    // rows per lane group in flight
constexpr int kMaxSplits = 128;

template <typename T, int HD, int G>
__global__ void __launch_bounds__(kThreads)
    decode_attention_kernel(const T* __restrict__ q, T* __restrict__ out, PagedKvView kv, PagedBatch batch,
                            const int32_t* __restrict__ decode_tokens, int32_t layer, int32_t n_heads,
                            float scale_log2, int32_t split_tokens, int32_t n_splits, float* __restrict__ partial,
                            int32_t* __restrict__ counters) {
  constexpr int VEC = kVec<T>;
  constexpr int LPR = HD / VEC;  // lanes per row
  constexpr int RPW = 32 / LPR;  // rows per warp per load
  constexpr int ROWS_PER_PASS = kWarps * RPW * kUnroll;
  const int kv_head = blockIdx.x, split = blockIdx.y, d = blockIdx.z;
  const int token = decode_tokens[d];
  const int seq = batch.token_seq[token];
  const int len = batch.kv_lengths[seq];
  const int begin = split * split_tokens;
  const int end = min(len, begin + split_tokens);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / LPR, part = lane % LPR;

  __shared__ float scores[G][kChunk];
  __shared__ float run_max[G], run_sum[G], rescale[G];
  __shared__ float reduce_buf[kWarps][G][HD];

  float qv[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load_vec(q + (static_cast<int64_t>(token) * n_heads + kv_head * G + g) * HD + part * VEC, qv[g]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) qv[g][i] *= scale_log2;
  }
  float acc[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[g][i] = 0.0f;
  if (threadIdx.x < G) {
    run_max[threadIdx.x] = -INFINITY;
    run_sum[threadIdx.x] = 0.0f;
  }

  const int32_t* table = batch.block_tables + batch.table_offsets[seq];
  const T* pool = static_cast<const T*>(kv.blocks);
  const int bt = kv.layout.block_tokens;
  const int64_t v_offset = kv.layout.slab_elements();
  auto row_offset = [&](int p) {
    return kv.offset(table[p / bt], layer, 0, p % bt) + static_cast<int64_t>(kv_head) * HD + part * VEC;
  };

  for (int c0 = begin; c0 < end; c0 += kChunk) {
    const int c_end = min(end, c0 + kChunk);
    // A: scores of this chunk.
    for (int base = c0 + warp * RPW; base < c0 + kChunk; base += ROWS_PER_PASS) {
      float kf[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = base + u * kWarps * RPW + slot;
        if (p < c_end) {
          load_vec(pool + row_offset(p), kf[u]);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) kf[u][i] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = base + u * kWarps * RPW + slot;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          float s = 0.0f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) s = fmaf(qv[g][i], kf[u][i], s);
#pragma unroll
          for (int off = LPR / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
          if (part == 0 && p < c0 + kChunk) scores[g][p - c0] = p < c_end ? s : -INFINITY;
        }
      }
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
        const float w = exp2f(scores[g][i] - m_new);  // -inf -> 0
        scores[g][i] = w;
        l += w;
      }
      l = warp_sum(l);
      if (lane == 0) {
        const float r = exp2f(run_max[g] - m_new);
        rescale[g] = r;
        run_sum[g] = run_sum[g] * r + l;
        run_max[g] = m_new;
      }
    }
    __syncthreads();
    // C: weighted values.
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] *= rescale[g];
    for (int base = c0 + warp * RPW; base < c_end; base += ROWS_PER_PASS) {
      float vf[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = base + u * kWarps * RPW + slot;
        if (p < c_end) {
          load_vec(pool + row_offset(p) + v_offset, vf[u]);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) vf[u][i] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = base + u * kWarps * RPW + slot;
        if (p >= c_end) continue;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float w = scores[g][p - c0];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(w, vf[u][i], acc[g][i]);
        }
      }
    }
    __syncthreads();  // scores are rewritten by the next chunk
  }

  // Sum the accumulators over the row groups of each warp, then over the warps.
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < VEC; ++i)
#pragma unroll
      for (int off = LPR; off < 32; off *= 2) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], off);
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < VEC; ++i) reduce_buf[warp][g][part * VEC + i] = acc[g][i];
  }
  __syncthreads();
  const bool single = n_splits == 1;
  for (int e = threadIdx.x; e < G * HD; e += kThreads) {
    const int g = e / HD, col = e % HD;
    float total = 0.0f;
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
    const int s = i / G, g = i % G;
    const float* state = head_base + (static_cast<int64_t>(g) * n_splits + s) * (HD + 2);
    split_max[s][g] = __ldcg(state);
    split_scale[s][g] = __ldcg(state + 1);  // the sum for now
  }
  __syncthreads();
  if (threadIdx.x < G) {
    const int g = threadIdx.x;
    float m = -INFINITY;
    for (int s = 0; s < n_splits; ++s) m = fmaxf(m, split_max[s][g]);
    float l = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
      const float f = m == -INFINITY ? 0.0f : exp2f(split_max[s][g] - m);
      l += split_scale[s][g] * f;
      split_scale[s][g] = f;
    }
    inv_total[g] = l > 0.0f ? 1.0f / l : 0.0f;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * HD; e += kThreads) {
    const int g = e / HD, col = e % HD;
    const float* acc_base = head_base + static_cast<int64_t>(g) * n_splits * (HD + 2) + 2 + col;
    float a = 0.0f;
#pragma unroll 8
    for (int s = 0; s < n_splits; ++s) a = fmaf(split_scale[s][g], __ldcg(acc_base + static_cast<int64_t>(s) * (HD + 2)), a);
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
        decode_attention_kernel<T, HD, G><<<grid, kThreads, 0, stream>>>(
            static_cast<const T*>(q), static_cast<T*>(out), kv, batch, plan.decode_tokens, layer, n_heads, scale_log2,
            plan.split_tokens, plan.n_splits, partial, counters);
      });
      check_launch();
    });
  });
}

}  // namespace den::kernels
