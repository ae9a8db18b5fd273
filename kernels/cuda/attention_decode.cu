// Decode attention over paged KV (f16/bf16, head_dim 64 or 128), one query token per sequence.
// A block handles (KV head, split, sequence): its lanes are grouped LANES_PER_TOKEN to a KV row
// (16-byte loads, so a row is read once, coalesced) and each group computes the scores of all
// G query heads that share the KV head, with an online softmax per head. Splits of long
// contexts keep the grid full; a second kernel merges their (max, sum, accumulator) states.
// Each lane group loads kUnroll rows before using any (bytes in flight hide HBM latency).
// Scores are kept in the log2 domain (q pre-scaled by scale * log2 e) so exp2f does the work.
#include <cmath>

#include "attention_common.cuh"
#include "den/kernels/attention.h"
#include "den/kernels/cuda_check.h"

namespace den::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kUnroll = 4;  // KV rows each lane group loads before using them (bytes in flight)

template <typename T, int HD, int G>
__global__ void __launch_bounds__(kWarps * 32)
    decode_attention_kernel(const T* __restrict__ q, T* __restrict__ out, PagedKvView kv, PagedBatch batch,
                            const int32_t* __restrict__ decode_tokens, int32_t layer, int32_t n_heads,
                            float scale_log2, int32_t split_tokens, int32_t n_splits, float* __restrict__ partial) {
  constexpr int VEC = kVec<T>;
  constexpr int LPT = HD / VEC;  // lanes per KV row
  constexpr int TPW = 32 / LPT;  // KV rows per warp per load
  const int kv_head = blockIdx.x, split = blockIdx.y, d = blockIdx.z;
  const int token = decode_tokens[d];
  const int seq = batch.token_seq[token];
  const int len = batch.kv_lengths[seq];
  const int begin = split * split_tokens;
  const int end = min(len, begin + split_tokens);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / LPT, part = lane % LPT;

  float qv[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load_vec(q + (static_cast<int64_t>(token) * n_heads + kv_head * G + g) * HD + part * VEC, qv[g]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) qv[g][i] *= scale_log2;
  }
  SoftmaxState<VEC> st[G];
  const int32_t* table = batch.block_tables + batch.table_offsets[seq];
  const T* pool = static_cast<const T*>(kv.blocks);
  const int bt = kv.layout.block_tokens;
  const int64_t v_offset = kv.layout.slab_elements();
  // Warp-uniform loop (the shuffles need every lane); rows past `end` are masked.
  for (int base = begin + warp * TPW * kUnroll; base < end; base += kWarps * TPW * kUnroll) {
    float kf[kUnroll][VEC], vf[kUnroll][VEC];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * TPW + slot;
      valid[u] = p < end;
      if (valid[u]) {
        const int64_t row = kv.offset(table[p / bt], layer, 0, p % bt) + kv_head * HD + part * VEC;
        load_vec(pool + row, kf[u]);
        load_vec(pool + row + v_offset, vf[u]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) kf[u][i] = vf[u][i] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) s = fmaf(qv[g][i], kf[u][i], s);
#pragma unroll
        for (int off = LPT / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (valid[u]) st[g].add(s, vf[u]);
      }
    }
  }
  // Merge the row groups of the warp, then the warps through shared memory.
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int off = LPT; off < 32; off *= 2) st[g].merge_shuffle(off);
  }
  __shared__ float smem[kWarps][G][2 + HD];
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (part == 0) {
        smem[warp][g][0] = st[g].m;
        smem[warp][g][1] = st[g].l;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) smem[warp][g][2 + part * VEC + i] = st[g].acc[i];
    }
  }
  __syncthreads();
  if (warp != 0 || slot != 0) return;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    SoftmaxState<VEC> total;
    for (int w = 0; w < kWarps; ++w) {
      SoftmaxState<VEC> other;
      other.m = smem[w][g][0];
      other.l = smem[w][g][1];
#pragma unroll
      for (int i = 0; i < VEC; ++i) other.acc[i] = smem[w][g][2 + part * VEC + i];
      total.merge(other);
    }
    const int head = kv_head * G + g;
    if (n_splits == 1) {
      float o[VEC];
      const float inv = total.l > 0.0f ? 1.0f / total.l : 0.0f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = total.acc[i] * inv;
      store_vec(out + (static_cast<int64_t>(token) * n_heads + head) * HD + part * VEC, o);
    } else {
      float* dst = partial + ((static_cast<int64_t>(d) * n_heads + head) * n_splits + split) * (HD + 2);
      if (part == 0) {
        dst[0] = total.m;
        dst[1] = total.l;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) dst[2 + part * VEC + i] = total.acc[i];
    }
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

// One block per (sequence, head), one thread per output element.
template <typename T, int HD>
__global__ void decode_combine_kernel(T* __restrict__ out, const int32_t* __restrict__ decode_tokens, int32_t n_heads,
                                      int32_t n_splits, const float* __restrict__ partial) {
  const int d = blockIdx.x, head = blockIdx.y, e = threadIdx.x;
  const float* base = partial + (static_cast<int64_t>(d) * n_heads + head) * n_splits * (HD + 2);
  float m = -INFINITY;
  for (int s = 0; s < n_splits; ++s) m = fmaxf(m, base[s * (HD + 2)]);
  float l = 0.0f, acc = 0.0f;
  if (m != -INFINITY) {
    for (int s = 0; s < n_splits; ++s) {
      const float ms = base[s * (HD + 2)];
      if (ms == -INFINITY) continue;
      const float f = exp2f(ms - m);
      l += base[s * (HD + 2) + 1] * f;
      acc += base[s * (HD + 2) + 2 + e] * f;
    }
  }
  out[(static_cast<int64_t>(decode_tokens[d]) * n_heads + head) * HD + e] = from_float<T>(l > 0.0f ? acc / l : 0.0f);
}

}  // namespace

void decode_attention_launch(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch,
                             const AttentionPlan& plan, int32_t layer, int32_t n_heads, float scale,
                             CudaStream stream) {
  if (plan.n_decode == 0) return;
  const int32_t n_kv = kv.layout.n_kv_heads;
  const int32_t group = n_heads / n_kv;
  const float scale_log2 = scale * 1.4426950408889634f;
  const dim3 grid(static_cast<unsigned>(n_kv), static_cast<unsigned>(plan.n_splits), static_cast<unsigned>(plan.n_decode));
  dispatch_half_types(kv.layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(kv.layout.head_dim, [&](auto hd_tag) {
      constexpr int HD = decltype(hd_tag)::value;
      dispatch_group(group, [&](auto g_tag) {
        constexpr int G = decltype(g_tag)::value;
        decode_attention_kernel<T, HD, G><<<grid, kWarps * 32, 0, stream>>>(
            static_cast<const T*>(q), static_cast<T*>(out), kv, batch, plan.decode_tokens, layer, n_heads, scale_log2,
            plan.split_tokens, plan.n_splits, plan.partial);
      });
      check_launch();
      if (plan.n_splits > 1) {
        decode_combine_kernel<T, HD><<<dim3(static_cast<unsigned>(plan.n_decode), static_cast<unsigned>(n_heads)), HD,
                                      0, stream>>>(static_cast<T*>(out), plan.decode_tokens, n_heads, plan.n_splits,
                                                   plan.partial);
        check_launch();
      }
    });
  });
}

}  // namespace den::kernels
