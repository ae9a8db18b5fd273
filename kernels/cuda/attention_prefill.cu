// Prefill attention over paged KV on tensor cores (f16/bf16, head_dim 64 or 128): a flash-
// attention forward pass. A block takes up to 64 new tokens of one sequence for one query head
// (a warp per 16 rows); K/V tiles of 64 positions are gathered through the block table into
// shared memory with cp.async (rows past the last query are zero-filled, so poisoned or stale
// pool memory never reaches the arithmetic); S = Q K^T and O += P V run as m16n8k16 mma.sync
// with fp32 accumulation; the softmax is online, in the log2 domain, with the causal mask.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_common.cuh"
#include "den/kernels/cuda_check.h"

namespace den::kernels {
namespace {

constexpr int kBlockM = kAttentionTileRows;  // query rows per block (4 warps x 16)
constexpr int kBlockN = 64;                  // KV positions per tile
constexpr int kThreads = 128;

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads)
    prefill_attention_kernel(const T* __restrict__ q, T* __restrict__ out, PagedKvView kv, PagedBatch batch,
                             const AttentionTile* __restrict__ tiles, int32_t layer, int32_t n_heads, int32_t group,
                             float scale_log2) {
  constexpr int STRIDE = HD + 8;  // padded rows: ldmatrix's eight rows land on distinct banks
  constexpr int CHUNKS = HD / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + kBlockM * STRIDE;
  T* Vs = Ks + kBlockN * STRIDE;

  const AttentionTile tile = tiles[blockIdx.x];
  const int head = blockIdx.y, kv_head = head / group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t* table = batch.block_tables + batch.table_offsets[tile.seq];
  const T* pool = static_cast<const T*>(kv.blocks);
  const int bt = kv.layout.block_tokens;
  const int64_t v_offset = kv.layout.slab_elements();

  for (int c = threadIdx.x; c < kBlockM * CHUNKS; c += kThreads) {
    const int r = c / CHUNKS, ch = c % CHUNKS;
    const bool valid = r < tile.n_rows;
    const T* src = valid ? q + (static_cast<int64_t>(tile.first_token + r) * n_heads + head) * HD + ch * 8 : q;
    cp_async_16(Qs + r * STRIDE + ch * 8, src, valid);
  }
  cp_async_wait_all();
  __syncthreads();

  uint32_t qf[HD / 16][4];
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    ldmatrix_x4(qf[kk], Qs + (warp * 16 + ((lane / 8) % 2) * 8 + lane % 8) * STRIDE + kk * 16 + (lane / 16) * 8);
  }

  float o[HD / 8][4];
#pragma unroll
  for (int dt = 0; dt < HD / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const int last_position = tile.first_position + tile.n_rows - 1;
  const int row0 = warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
  const int qpos[2] = {tile.first_position + row0, tile.first_position + row0 + 8};
  const int n_tiles = last_position / kBlockN + 1;

  for (int t = 0; t < n_tiles; ++t) {
    const int kv0 = t * kBlockN;
    __syncthreads();  // everyone is done with the previous K/V tile
    for (int c = threadIdx.x; c < kBlockN * CHUNKS; c += kThreads) {
      const int r = c / CHUNKS, ch = c % CHUNKS;
      const int p = kv0 + r;
      const bool valid = p <= last_position;
      const T* src = pool;
      if (valid) src = pool + kv.offset(table[p / bt], layer, 0, p % bt) + kv_head * HD + ch * 8;
      cp_async_16(Ks + r * STRIDE + ch * 8, src, valid);
      cp_async_16(Vs + r * STRIDE + ch * 8, valid ? src + v_offset : pool, valid);
    }
    cp_async_wait_all();
    __syncthreads();

    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
      for (int nt2 = 0; nt2 < kBlockN / 16; ++nt2) {
        uint32_t b[4];
        ldmatrix_x4(b, Ks + (nt2 * 16 + (lane / 16) * 8 + lane % 8) * STRIDE + kk * 16 + ((lane / 8) % 2) * 8);
        mma_16816<T>(s[2 * nt2], qf[kk], b[0], b[1]);
        mma_16816<T>(s[2 * nt2 + 1], qf[kk], b[2], b[3]);
      }
    }

    // Scale into the log2 domain, mask the future, online softmax per row.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kv0 + nt * 8 + (lane % 4) * 2 + (e % 2);
        const float v = key > qpos[e / 2] ? -INFINITY : s[nt][e] * scale_log2;
        s[nt][e] = v;
        mx[e / 2] = fmaxf(mx[e / 2], v);
      }
    }
    float correction[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      correction[r] = exp2f(m[r] - mx[r]);
      m[r] = mx[r];
      l[r] *= correction[r];
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m[e / 2]);
        l[e / 2] += s[nt][e];
      }
    }
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
      o[dt][0] *= correction[0];
      o[dt][1] *= correction[0];
      o[dt][2] *= correction[1];
      o[dt][3] *= correction[1];
    }
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt2 = 0; dt2 < HD / 16; ++dt2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, Vs + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * STRIDE + dt2 * 16 + (lane / 16) * 8);
        mma_16816<T>(o[2 * dt2], a, b[0], b[1]);
        mma_16816<T>(o[2 * dt2 + 1], a, b[2], b[3]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row >= tile.n_rows) continue;
    const float inv = 1.0f / l[r];
    T* dst = out + (static_cast<int64_t>(tile.first_token + row) * n_heads + head) * HD + (lane % 4) * 2;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
  }
}

}  // namespace

void prefill_attention_launch(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch,
                              const AttentionPlan& plan, int32_t layer, int32_t n_heads, float scale,
                              CudaStream stream) {
  if (plan.n_tiles == 0) return;
  const int32_t group = n_heads / kv.layout.n_kv_heads;
  const float scale_log2 = scale * 1.4426950408889634f;
  dispatch_half_types(kv.layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(kv.layout.head_dim, [&](auto hd_tag) {
      constexpr int HD = decltype(hd_tag)::value;
      constexpr size_t smem = static_cast<size_t>(kBlockM + 2 * kBlockN) * (HD + 8) * sizeof(T);
      auto kernel = prefill_attention_kernel<T, HD>;
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      kernel<<<dim3(static_cast<unsigned>(plan.n_tiles), static_cast<unsigned>(n_heads)), kThreads, smem, stream>>>(
          static_cast<const T*>(q), static_cast<T*>(out), kv, batch, plan.tiles, layer, n_heads, group, scale_log2);
      check_launch();
    });
  });
}

}  // namespace den::kernels
