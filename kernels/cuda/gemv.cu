// Small-batch GEMV with fused prologue and epilogues (see den/kernels/gemv.h).
// Persistent blocks of 4 warps; each warp owns one pair of output rows at a time and walks n_in
// with 16-byte loads, kUnroll pieces per row in flight plus the next step's prefetched; x is
// read through L1 (tiny, shared by every warp). Sums are reduced with shuffles and lane t
// finishes token t's epilogue: no block barrier per pair.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>
#include <vector>

#include "den/kernels/cuda_check.h"
#include "den/kernels/gemv.h"

#include "count_dispatch.h"
#include "device_query.h"
#include "device_types.cuh"
#include "pdl.cuh"

namespace den::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;

// Row pairs of a product: gate/up rows pair across the halves, every other epilogue pairs
// neighbours (an odd n_out's last pair has one row).
__host__ __device__ inline int64_t pair_count(GemvEpilogue e, int64_t n_out) {
  return e == GemvEpilogue::swiglu ? n_out / 2 : (n_out + 1) / 2;
}

// 16-byte input pieces per row.
inline int64_t input_pieces(DType weight_type, int64_t n_in) { return n_in / (16 / dtype_bytes(weight_type)); }

// The two rows of pair p, per epilogue.
__device__ __forceinline__ void pair_rows(GemvEpilogue e, int64_t p, int64_t n_out, int head_dim, RopeStyle style,
                                          int64_t& r0, int64_t& r1) {
  if (e == GemvEpilogue::swiglu) {
    r0 = p;
    r1 = p + n_out / 2;
  } else if (e == GemvEpilogue::rope_store && style == RopeStyle::neox) {
    const int64_t head = (2 * p) / head_dim, i = p % (head_dim / 2);
    r0 = head * head_dim + i;
    r1 = r0 + head_dim / 2;
  } else {
    r0 = 2 * p;
    r1 = 2 * p + 1;
  }
}

// The weight rows of pair p (an odd n_out's last pair repeats its one row; the second sum is
// then dropped).
template <typename T>
__device__ __forceinline__ void pair_weights(const T* w, GemvEpilogue e, int64_t p, int64_t n_in, int64_t n_out,
                                             const QkvShape& shape, const T*& w0, const T*& w1) {
  int64_t r0, r1;
  pair_rows(e, p, n_out, shape.head_dim, shape.style, r0, r1);
  w0 = w + r0 * n_in;
  w1 = w + (r1 < n_out ? r1 : r0) * n_in;
}

// Where the rope_store epilogue puts token t: its position and its K and V rows in the pool.
// Only the step's plan goes into it (no kernel writes that), so it can be looked up before
// pdl_wait(): three dependent loads off the epilogue's path.
struct RopeTarget {
  int position = 0;
  int64_t k = 0, v = 0;  // element offsets of the token's K and V rows of this layer
};
__device__ __forceinline__ RopeTarget rope_target(const GemvRope& rope, int t) {
  const int position = rope.batch.token_pos[t];
  const int seq = rope.batch.token_seq[t];
  const int bt = rope.kv.layout.block_tokens;
  const int block = rope.batch.block_tables[rope.batch.table_offsets[seq] + position / bt];
  return {position, rope.kv.offset(block, rope.layer, 0, position % bt), rope.kv.offset(block, rope.layer, 1, position % bt)};
}

// The epilogue of one pair for token t, given its two sums (target and inv_freq: rope_store only).
template <typename T>
__device__ __forceinline__ void finish_pair(GemvEpilogue epilogue, int t, int64_t pair, const int64_t* r, bool second,
                                            float a0, float a1, int64_t n_out, void* y, const GemvRope& rope,
                                            const RopeTarget& target, const float* inv_freq) {
  switch (epilogue) {
    case GemvEpilogue::store: {
      float* out = static_cast<float*>(y) + t * n_out;
      out[r[0]] = a0;
      if (second) out[r[1]] = a1;
      return;
    }
    case GemvEpilogue::accumulate: {
      float* out = static_cast<float*>(y) + t * n_out;
      a0 += out[r[0]];
      out[r[0]] = a0;
      if (second) out[r[1]] += a1;
      return;
    }
    case GemvEpilogue::swiglu: {
      T* out = static_cast<T*>(y) + t * (n_out / 2);
      out[pair] = from_float<T>(a0 / (1.0f + expf(-a0)) * a1);
      return;
    }
    case GemvEpilogue::rope_store: {
      const QkvShape& s = rope.shape;
      if (rope.bias != nullptr) {
        a0 += rope.bias[r[0]];
        a1 += rope.bias[r[1]];
      }
      const int q_dim = s.q_dim(), kv_dim = s.kv_dim();
      if (r[0] < q_dim + kv_dim) {  // Q or K: rotate the pair
        const int d0 = static_cast<int>(r[0] % s.head_dim);
        const int i = s.style == RopeStyle::interleaved ? d0 / 2 : d0;
        const float theta = static_cast<float>(target.position) * inv_freq[i];
        float sn, cs;
        sincosf(theta, &sn, &cs);
        const float b0 = a0 * cs - a1 * sn, b1 = a0 * sn + a1 * cs;
        a0 = b0;
        a1 = b1;
      }
      if (r[0] < q_dim) {
        T* q = static_cast<T*>(y) + static_cast<int64_t>(t) * q_dim;
        q[r[0]] = from_float<T>(a0);
        q[r[1]] = from_float<T>(a1);
      } else {
        const bool is_k = r[0] < q_dim + kv_dim;
        const int64_t col = r[0] - q_dim - (is_k ? 0 : kv_dim);
        T* dst = static_cast<T*>(rope.kv.blocks) + (is_k ? target.k : target.v);
        dst[col] = from_float<T>(a0);
        dst[col + (r[1] - r[0])] = from_float<T>(a1);
      }
      return;
    }
  }
}

// The inverse RMS of each of the block's B input rows, from the sums of squares of the pieces
// each thread read (fixed order: the same value in every block). scratch: [warps * B].
template <int BLOCK_THREADS, int B>
__device__ __forceinline__ void block_inv_rms(const float (&sum_squares)[B], int64_t n, float eps, float* scratch,
                                              float* inv_rms /* [B], shared */) {
  constexpr int kBlockWarps = BLOCK_THREADS / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int t = 0; t < B; ++t) {
    const float s = warp_sum(sum_squares[t]);
    if (lane == 0) scratch[warp * B + t] = s;
  }
  __syncthreads();
  if (threadIdx.x < B) {
    float total = 0.0f;
    for (int k = 0; k < kBlockWarps; ++k) total += scratch[k * B + threadIdx.x];
    inv_rms[threadIdx.x] = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
  }
  __syncthreads();
}

// Weights of one loop step of one pair, kept packed (16-byte pieces) until used: half the
// registers of unpacked floats, so the next step's loads can be in flight during this one's
// arithmetic.
struct PairPieces {
  uint4 row[kUnroll][2];
};

template <typename T, int B>
__global__ void __launch_bounds__(kThreads)
    gemv_kernel(const T* __restrict__ w, int64_t n_in, int64_t n_out, GemvInput input, GemvEpilogue epilogue,
                void* __restrict__ y, GemvRope rope) {
  constexpr int VEC = kVec<T>;
  constexpr int64_t kStep = 32 * VEC;  // elements a warp covers per piece
  pdl_allow_next();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ float row_scale[B];
  __shared__ float scratch[kWarps * B];
  const int64_t n_pairs = pair_count(epilogue, n_out);
  const bool normed = input.norm_weight != nullptr;
  const int64_t first = lane * VEC;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarps;

  auto load_pieces = [&](int64_t pair, int64_t base, PairPieces& pieces) {
    const T *w0, *w1;
    pair_weights(w, epilogue, pair, n_in, n_out, rope.shape, w0, w1);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kStep;
      if (k < n_in) {
        pieces.row[u][0] = *reinterpret_cast<const uint4*>(w0 + k);
        pieces.row[u][1] = *reinterpret_cast<const uint4*>(w1 + k);
      }
    }
  };

  int64_t x_row[B];
#pragma unroll
  for (int t = 0; t < B; ++t) x_row[t] = input.rows != nullptr ? input.rows[t] : t;

  // A warp owns a pair of rows at a time and walks pairs with the stride of all warps: no block
  // barrier per pair. Weights belong to no kernel, so the first loads go out before waiting for
  // the predecessor, whose outputs (x, the KV pages) are read after pdl_wait().
  int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  PairPieces cur, next;
  if (pair < n_pairs) load_pieces(pair, first, cur);
  // Lane t finishes token t of every pair it sums: its RoPE target (the plan's, so before the
  // wait) is the same for all of them.
  const RopeTarget target = epilogue == GemvEpilogue::rope_store && lane < B ? rope_target(rope, lane) : RopeTarget{};
  pdl_wait();
  if (normed) {
    // Each block computes the norm of its input rows itself (they are read through L1 anyway).
    float sum_squares[B];
#pragma unroll
    for (int t = 0; t < B; ++t) {
      sum_squares[t] = 0.0f;
      const float* xr = static_cast<const float*>(input.x) + x_row[t] * n_in;
      for (int64_t i = int64_t{threadIdx.x} * 4; i < n_in; i += kThreads * 4) {
        const float4 v = *reinterpret_cast<const float4*>(xr + i);
        sum_squares[t] += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
    }
    block_inv_rms<kThreads, B>(sum_squares, n_in, input.eps, scratch, row_scale);
  }

  for (; pair < n_pairs; pair += warps_total) {
    int64_t r[2];
    pair_rows(epilogue, pair, n_out, rope.shape.head_dim, rope.shape.style, r[0], r[1]);
    const bool second = r[1] < n_out;
    float acc[2][B];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int t = 0; t < B; ++t) acc[i][t] = 0.0f;

    for (int64_t base = first; base < n_in; base += kStep * kUnroll) {
      // The next step's pieces (of this pair, or the first of the next pair) go out now.
      const int64_t next_base = base + kStep * kUnroll;
      if (next_base < n_in) {
        load_pieces(pair, next_base, next);
      } else if (pair + warps_total < n_pairs) {
        load_pieces(pair + warps_total, first, next);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = base + u * kStep;
        if (k >= n_in) break;
        float wf[2][VEC];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const T* e = reinterpret_cast<const T*>(&cur.row[u][i]);
#pragma unroll
          for (int j = 0; j < VEC; ++j) wf[i][j] = to_float<T>(e[j]);
        }
        float nw[VEC];
        if (normed) {
#pragma unroll
          for (int j = 0; j < VEC; j += 4) {
            const float4 v = *reinterpret_cast<const float4*>(input.norm_weight + k + j);
            nw[j] = v.x;
            nw[j + 1] = v.y;
            nw[j + 2] = v.z;
            nw[j + 3] = v.w;
          }
        }
#pragma unroll
        for (int t = 0; t < B; ++t) {
          float xv[VEC];
          if (normed) {
            const float* xf = static_cast<const float*>(input.x) + x_row[t] * n_in + k;
            const float sc = row_scale[t];
#pragma unroll
            for (int j = 0; j < VEC; j += 4) {
              const float4 v = *reinterpret_cast<const float4*>(xf + j);
              xv[j] = nw[j] * (v.x * sc);
              xv[j + 1] = nw[j + 1] * (v.y * sc);
              xv[j + 2] = nw[j + 2] * (v.z * sc);
              xv[j + 3] = nw[j + 3] * (v.w * sc);
            }
          } else {
            load_vec(static_cast<const T*>(input.x) + x_row[t] * n_in + k, xv);
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            acc[0][t] = fmaf(wf[0][j], xv[j], acc[0][t]);
            acc[1][t] = fmaf(wf[1][j], xv[j], acc[1][t]);
          }
        }
      }
      cur = next;
    }
    // Lane t finishes token t (the sums are on every lane after the butterfly).
    float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
    for (int t = 0; t < B; ++t) {
      const float s0 = warp_sum(acc[0][t]), s1 = warp_sum(acc[1][t]);
      if (t == lane) {
        a0 = s0;
        a1 = s1;
      }
    }
    if (lane < B) finish_pair<T>(epilogue, lane, pair, r, second, a0, a1, n_out, y, rope, target, rope.inv_freq);
  }
  timeline_end();
}

// Single-token products (the batch-1 decode step, where every weight byte is read for one
// token): a block of 256 threads (512 for rows of over 1024 pieces) owns a contiguous range of
// pairs, so blocks differ by at most one pair (whole-row work per warp left a ragged last wave:
// 3,072 Q/K/V pairs over 2,112 warps). Thread t owns the input pieces t, t + THREADS, ... (P of
// them) for the whole kernel, held in registers (normalized once, in fp32, when there is a norm;
// else packed as loaded), so the inner loop streams weights only. PAIRS pairs (2 * PAIRS rows) are in flight per step, the next step's
// loads issued before this step's sums; each step's per-warp sums meet in shared memory (double
// buffered: one barrier per step) and one thread per pair finishes its epilogue.
constexpr int kSliceThreads = 256;
constexpr int kSliceMaxPieces = 8;  // n_in up to 8 * 256 * 8 = 16,384 (bf16/f16)
constexpr int kSliceWidePieces = 4;
constexpr int kSliceMaxFreq = 128;  // RoPE frequencies copied to shared memory (head_dim up to 256)
static_assert(kSliceMaxPieces * kSliceThreads <= kSliceWidePieces * 2 * kSliceThreads, "wide blocks hold every row");

template <int P>
__host__ __device__ constexpr int slice_pairs() {
  return P == 1 ? 4 : P == 2 ? 2 : 1;  // about 8 16-byte loads per thread per step
}

template <typename T, int P, bool NORMED, int THREADS>
__global__ void __launch_bounds__(THREADS)
    gemv_slice_kernel(const T* __restrict__ w, int64_t n_in, int64_t n_out, GemvInput input, GemvEpilogue epilogue,
                      void* __restrict__ y, GemvRope rope) {
  constexpr int VEC = kVec<T>;
  constexpr int PAIRS = slice_pairs<P>();
  constexpr int WARPS = THREADS / 32;
  pdl_allow_next();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ float sums[2][WARPS][PAIRS][2];
  __shared__ float scratch[WARPS], inv_rms[1];
  __shared__ float freq_copy[kSliceMaxFreq];
  const int64_t n_pairs = pair_count(epilogue, n_out);
  const int64_t begin = blockIdx.x * n_pairs / gridDim.x, end = (blockIdx.x + 1) * n_pairs / gridDim.x;
  const int64_t n_pieces = n_in / VEC;

  struct Step {
    uint4 piece[PAIRS][2][P];
  };
  auto load_step = [&](int64_t first_pair, Step& s) {
#pragma unroll
    for (int q = 0; q < PAIRS; ++q) {
      const int64_t pair = first_pair + q;
      if (pair >= end) continue;
      const T *w0, *w1;
      pair_weights(w, epilogue, pair, n_in, n_out, rope.shape, w0, w1);
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int64_t piece = threadIdx.x + int64_t{i} * THREADS;
        if (piece < n_pieces) {
          // Streaming loads: each weight is read once per step, L2 should keep other things.
          s.piece[q][0][i] = __ldcs(reinterpret_cast<const uint4*>(w0) + piece);
          s.piece[q][1][i] = __ldcs(reinterpret_cast<const uint4*>(w1) + piece);
        }
      }
    }
  };

  Step cur, next;
  if (begin < end) load_step(begin, cur);
  // The epilogue's lookups in the plan, and the RoPE frequencies, before the wait too.
  RopeTarget target{};
  const float* inv_freq = rope.inv_freq;
  if (epilogue == GemvEpilogue::rope_store) {
    if (threadIdx.x < PAIRS) target = rope_target(rope, 0);
    if (rope.shape.n_rot / 2 <= kSliceMaxFreq) {
      for (int i = threadIdx.x; i < rope.shape.n_rot / 2; i += THREADS) freq_copy[i] = rope.inv_freq[i];
      inv_freq = freq_copy;  // read after the loop's barrier
    }
  }
  // The norm weights are no kernel's output either, nor is an embedding row (the table is a
  // weight, the ids are the plan's).
  const int64_t x_row = input.rows != nullptr ? input.rows[0] : 0;
  const bool embedded = NORMED && input.embed_ids != nullptr;
  float4 gw[NORMED ? P : 1][VEC / 4];
  uint4 embed_row[NORMED ? P : 1];
  if constexpr (NORMED) {
    const T* table_row = embedded ? static_cast<const T*>(input.x) + int64_t{input.embed_ids[x_row]} * n_in : nullptr;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int64_t k = (threadIdx.x + int64_t{i} * THREADS) * VEC;
      if (k >= n_in) continue;
#pragma unroll
      for (int j = 0; j < VEC; j += 4) gw[i][j / 4] = *reinterpret_cast<const float4*>(input.norm_weight + k + j);
      if (embedded) embed_row[i] = *reinterpret_cast<const uint4*>(table_row + k);
    }
  }
  pdl_wait();
  // The accumulate epilogue's residual rows, one step ahead, so the epilogue thread does not
  // wait for them while the block waits at the next step's barrier.
  float resid[2] = {0.0f, 0.0f};
  auto load_resid = [&](int64_t first) {
    if (epilogue != GemvEpilogue::accumulate || threadIdx.x >= PAIRS || first + threadIdx.x >= end) return;
    int64_t r0, r1;
    pair_rows(epilogue, first + threadIdx.x, n_out, rope.shape.head_dim, rope.shape.style, r0, r1);
    resid[0] = static_cast<const float*>(y)[r0];
    resid[1] = r1 < n_out ? static_cast<const float*>(y)[r1] : 0.0f;
  };
  load_resid(begin);

  // This thread's input pieces: normalized in fp32, or packed as they are. The block holds the
  // whole row, so it computes the norm itself: one block reduction, no kernel or grid-wide
  // step to produce the scale.
  float xf[NORMED ? P : 1][VEC];
  uint4 xp[NORMED ? 1 : P];
  float sum_squares[1] = {0.0f};
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int64_t k = (threadIdx.x + int64_t{i} * THREADS) * VEC;
    if (k >= n_in) continue;
    if constexpr (NORMED) {
      if (embedded) {
        const T* e = reinterpret_cast<const T*>(&embed_row[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xf[i][j] = to_float<T>(e[j]);
        if (blockIdx.x == 0) {  // the residual stream starts as the embedding row
          float* out = input.embed_out + x_row * n_in + k;
#pragma unroll
          for (int j = 0; j < VEC; j += 4) {
            *reinterpret_cast<float4*>(out + j) = make_float4(xf[i][j], xf[i][j + 1], xf[i][j + 2], xf[i][j + 3]);
          }
        }
      } else {
        const float* xr = static_cast<const float*>(input.x) + x_row * n_in + k;
#pragma unroll
        for (int j = 0; j < VEC; j += 4) {
          const float4 v = *reinterpret_cast<const float4*>(xr + j);
          xf[i][j] = v.x;
          xf[i][j + 1] = v.y;
          xf[i][j + 2] = v.z;
          xf[i][j + 3] = v.w;
        }
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum_squares[0] += xf[i][j] * xf[i][j];
    } else {
      xp[i] = *reinterpret_cast<const uint4*>(static_cast<const T*>(input.x) + x_row * n_in + k);
    }
  }
  if constexpr (NORMED) {
    block_inv_rms<THREADS, 1>(sum_squares, n_in, input.eps, scratch, inv_rms);
    const float sc = inv_rms[0];
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int64_t k = (threadIdx.x + int64_t{i} * THREADS) * VEC;
      if (k >= n_in) continue;
#pragma unroll
      for (int j = 0; j < VEC; j += 4) {
        const float4 g = gw[i][j / 4];
        xf[i][j] = g.x * (xf[i][j] * sc);
        xf[i][j + 1] = g.y * (xf[i][j + 1] * sc);
        xf[i][j + 2] = g.z * (xf[i][j + 2] * sc);
        xf[i][j + 3] = g.w * (xf[i][j + 3] * sc);
      }
    }
  }

  int buf = 0;
  for (int64_t first = begin; first < end; first += PAIRS, buf ^= 1) {
    if (first + PAIRS < end) load_step(first + PAIRS, next);
    float acc[PAIRS][2];
#pragma unroll
    for (int q = 0; q < PAIRS; ++q) acc[q][0] = acc[q][1] = 0.0f;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if ((threadIdx.x + int64_t{i} * THREADS) >= n_pieces) continue;
      float xv[VEC];
      if constexpr (NORMED) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) xv[j] = xf[i][j];
      } else {
        const T* e = reinterpret_cast<const T*>(&xp[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xv[j] = to_float<T>(e[j]);
      }
#pragma unroll
      for (int q = 0; q < PAIRS; ++q) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const T* e = reinterpret_cast<const T*>(&cur.piece[q][h][i]);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[q][h] = fmaf(to_float<T>(e[j]), xv[j], acc[q][h]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < PAIRS; ++q) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float s = warp_sum(acc[q][h]);
        if (lane == 0) sums[buf][warp][q][h] = s;
      }
    }
    __syncthreads();
    if (threadIdx.x < PAIRS && first + threadIdx.x < end) {
      const int q = threadIdx.x;
      const int64_t pair = first + q;
      float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
      for (int k = 0; k < WARPS; ++k) {
        a0 += sums[buf][k][q][0];
        a1 += sums[buf][k][q][1];
      }
      int64_t r[2];
      pair_rows(epilogue, pair, n_out, rope.shape.head_dim, rope.shape.style, r[0], r[1]);
      if (epilogue == GemvEpilogue::accumulate) {  // the residual, loaded a step ago
        finish_pair<T>(GemvEpilogue::store, 0, pair, r, r[1] < n_out, a0 + resid[0], a1 + resid[1], n_out, y, rope,
                       target, inv_freq);
        load_resid(first + PAIRS);
      } else {
        finish_pair<T>(epilogue, 0, pair, r, r[1] < n_out, a0, a1, n_out, y, rope, target, inv_freq);
      }
    }
    cur = next;
  }
  timeline_end();
}

// Whether the single-token kernel takes this product (half types, n_in within its pieces).
bool slice_path(DType weight_type, int64_t n_in, int32_t n_tokens) {
  if (n_tokens != 1 || weight_type == DType::f32) return false;
  return input_pieces(weight_type, n_in) <= int64_t{kSliceMaxPieces} * kSliceThreads;
}

// Blocks of `kernel` (threads each) resident on one SM, asked once per kernel.
int slice_blocks_per_sm(const void* kernel, int threads) {
  static thread_local std::vector<std::pair<const void*, int>> known;
  for (const auto& [k, n] : known) {
    if (k == kernel) return n;
  }
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  known.emplace_back(kernel, std::max(per_sm, 1));
  return known.back().second;
}

// Launches the single-token kernel on as many blocks as are resident at once. Rows longer than
// kSliceWidePieces pieces per thread of a 256-thread block take 512-thread blocks instead: the
// long rows' registers (both steps' weights and the input pieces) would hold a 256-thread block
// to one an SM.
void launch_slice(const void* weights, DType weight_type, int64_t n_in, int64_t n_out, const GemvInput& input,
                  GemvEpilogue epilogue, void* y, const GemvRope& rope, cudaStream_t stream) {
  const int64_t n_pairs = pair_count(epilogue, n_out);
  const int64_t pieces = input_pieces(weight_type, n_in);
  const bool wide = pieces > int64_t{kSliceWidePieces} * kSliceThreads;
  const int threads = wide ? 2 * kSliceThreads : kSliceThreads;
  const auto per_thread = static_cast<int32_t>((pieces + threads - 1) / threads);
  dispatch_half_types(weight_type, [&](auto tag) {
    using T = decltype(tag);
    dispatch_count_1_to_8(per_thread, "gemv: input pieces per thread", [&](auto p_tag) {
      constexpr int P = decltype(p_tag)::value;
      auto run = [&](auto kernel) {
        const int64_t resident = int64_t{sm_count()} * slice_blocks_per_sm(reinterpret_cast<const void*>(kernel), threads);
        const auto grid = static_cast<unsigned>(std::max<int64_t>(1, std::min(resident, n_pairs)));
        launch_chained(kernel, dim3(grid), dim3(threads), 0, stream, static_cast<const T*>(weights), n_in, n_out,
                       input, epilogue, y, rope);
      };
      const bool normed = input.norm_weight != nullptr;
      if (wide) {
        // Wide rows have at most kSliceMaxPieces * kSliceThreads pieces: kSliceWidePieces each.
        if constexpr (P <= kSliceWidePieces) {
          normed ? run(gemv_slice_kernel<T, P, true, 2 * kSliceThreads>)
                 : run(gemv_slice_kernel<T, P, false, 2 * kSliceThreads>);
        } else {
          throw std::logic_error("gemv: a wide row with more pieces per thread than the wide kernel holds");
        }
      } else {
        normed ? run(gemv_slice_kernel<T, P, true, kSliceThreads>) : run(gemv_slice_kernel<T, P, false, kSliceThreads>);
      }
    });
  }, "gemv: the single-token path's weight type");
}

}  // namespace

bool gemv_supported(DType weight_type, int64_t n_in, int32_t n_tokens) {
  const int64_t vec = 16 / dtype_bytes(weight_type);
  return n_tokens >= 1 && n_tokens <= kGemvMaxTokens && n_in % vec == 0 && n_in % 4 == 0;
}

bool gemv_gathers_embedding(DType weight_type, int64_t n_in, int32_t n_tokens) {
  return gemv_supported(weight_type, n_in, n_tokens) && slice_path(weight_type, n_in, n_tokens);
}

void gemv_cuda(const void* weights, DType weight_type, int64_t n_in, int64_t n_out, const GemvInput& input,
               int32_t n_tokens, GemvEpilogue epilogue, void* y, const GemvRope* rope, CudaStream stream) {
  if (!gemv_supported(weight_type, n_in, n_tokens)) throw std::invalid_argument("gemv: unsupported shape");
  if (epilogue == GemvEpilogue::rope_store &&
      (rope == nullptr || rope->shape.n_rot != rope->shape.head_dim || rope->kv.layout.dtype != weight_type)) {
    throw std::invalid_argument("gemv: the fused RoPE needs n_rot == head_dim and KV in the weight type");
  }
  if (input.norm_weight != nullptr && !(input.eps >= 0.0f)) throw std::invalid_argument("gemv: the norm's eps must be >= 0");
  if (input.embed_ids != nullptr &&
      (!gemv_gathers_embedding(weight_type, n_in, n_tokens) || input.norm_weight == nullptr || input.embed_out == nullptr)) {
    throw std::invalid_argument("gemv: an embedding-table input needs the single-token kernel, a norm and embed_out");
  }
  const int64_t n_pairs = pair_count(epilogue, n_out);
  const GemvRope no_rope{};
  if (slice_path(weight_type, n_in, n_tokens)) {
    launch_slice(weights, weight_type, n_in, n_out, input, epilogue, y, rope != nullptr ? *rope : no_rope, stream);
    check_launch();
    return;
  }
  dispatch_dtype(weight_type, [&](auto tag) {
    using T = decltype(tag);
    dispatch_count_1_to_8(n_tokens, "gemv: tokens per call", [&](auto b_tag) {
      constexpr int B = decltype(b_tag)::value;
      // Persistent blocks: as many as are resident at once, each walking pairs with the grid's
      // stride (no launch cost per pair, no ragged last wave).
      static thread_local int per_sm = 0;
      if (per_sm == 0) check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_kernel<T, B>, kThreads, 0));
      const int64_t warps_needed = (n_pairs + kWarps - 1) / kWarps;
      const auto blocks = static_cast<unsigned>(std::min<int64_t>(warps_needed, int64_t{sm_count()} * std::max(per_sm, 1)));
      launch_chained(gemv_kernel<T, B>, dim3(blocks), dim3(kThreads), 0, stream, static_cast<const T*>(weights), n_in,
                     n_out, input, epilogue, y, rope != nullptr ? *rope : no_rope);
    });
  });
  check_launch();
}

}  // namespace den::kernels
