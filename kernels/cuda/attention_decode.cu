// Decode attention over paged KV on tensor cores (f16/bf16, head_dim 64 or 128), one query
// token per sequence. The G query heads that share a KV head are the rows of one 16-row mma
// tile (the rest zero), so every K and V row is read once for the whole group. A block of W
// warps (4, or 8 in a sparse grid) handles (KV head, split, sequence); each warp walks tiles of
// 16 positions of the split (warp w takes tiles w, w + W, ...), gathering them through the block
// table into its own double-buffered shared memory with cp.async (loads of tile i + 1 in flight
// while tile i is computed; positions past the end are zero-filled), S = Q K^T and O += P V as
// m16n8k16 mma, online softmax in the log2 domain. The W warps' states merge through shared
// memory; splits of a sequence write partial (max, sum, accumulator) states and the last block
// to finish a (sequence, KV head) merges them (a counter per pair, reset by that block).
// Block-table entries are looked up a tile ahead of the copies that need them.
// Each block sizes its split from its own sequence's length (decode_split): a captured decode
// graph fixes only the grid, so the splits of every step cover the context evenly, with no
// empty blocks past its end.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attention_common.cuh"
#include "count_dispatch.h"
#include "device_query.h"
#include "den/kernels/attention.h"
#include "den/kernels/cuda_check.h"
#include "pdl.cuh"

namespace den::kernels {
namespace {

constexpr int kWarps = 4;  // a dense grid's blocks
constexpr int kSparseWarps = 8;  // a sparse grid's blocks: one tile a warp at the shortest split
constexpr int kTile = kDecodeTile;  // positions per warp tile
constexpr int kMaxSplits = 128;

template <int HD, int W>
struct DecodeSmem {
  static constexpr int kStride = HD + 8;  // padded rows: ldmatrix's eight rows on distinct banks
  static constexpr size_t kQ = 16 * kStride;
  static constexpr size_t kTileElems = kTile * kStride;
  // Q, then per warp 2 stages of (K tile, V tile); afterwards reused for the warps' merge.
  static constexpr size_t kElems = kQ + size_t{W} * 2 * 2 * kTileElems;
};

// W warps a block: kWarps in a dense grid, kSparseWarps in a sparse one (see with_decode_kernel).
template <typename T, int HD, int G, int W>
__global__ void __launch_bounds__(W * 32)
    decode_attention_kernel(const T* __restrict__ q, T* __restrict__ out, PagedKvView kv, PagedBatch batch,
                            const DecodeEntry* __restrict__ decode, int32_t layer, int32_t n_heads,
                            float scale_log2, int32_t min_split_tokens, int32_t n_splits, float* __restrict__ partial,
                            int32_t* __restrict__ counters) {
  using Smem = DecodeSmem<HD, W>;
  constexpr int kBlockThreads = W * 32;
  constexpr int STRIDE = Smem::kStride;
  constexpr int CHUNKS = HD / 8;  // 16-byte pieces per row
  pdl_allow_next();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  const int kv_head = blockIdx.x, split = blockIdx.y, d = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // This warp's stages: (K tile, V tile) at Ks(st), Ks(st) + kTileElems (arithmetic, not an
  // array of pointers, which would live in local memory when indexed by the running stage).
  T* const warp_stages = Qs + Smem::kQ + static_cast<size_t>(warp) * 2 * 2 * Smem::kTileElems;
  auto Ks = [&](int st) { return warp_stages + st * 2 * Smem::kTileElems; };
  auto Vs = [&](int st) { return warp_stages + st * 2 * Smem::kTileElems + Smem::kTileElems; };
  const DecodeEntry entry = decode[d];  // the step's plan: no kernel writes it
  const int token = entry.token;
  const DecodeSplit range = decode_split(entry.kv_length, split, n_splits, min_split_tokens);
  if (split >= range.used) return;  // more splits than this sequence needs
  const int begin = range.begin, end = range.end, used = range.used;
  const int32_t* table = batch.block_tables + entry.table_offset;
  const T* pool = static_cast<const T*>(kv.blocks);
  const int bt = kv.layout.block_tokens;
  const int64_t v_offset = kv.layout.slab_elements();

  // Where this lane's rows of a tile live, looked up one tile ahead of the copies that use them:
  // a table load is a round trip, and issued next to its copies it would stall the warp. When
  // blocks hold whole tiles (block_tokens a multiple of 16, as configured in practice) a tile is
  // one table entry and consecutive slots; otherwise each row is looked up on its own.
  constexpr int ROWS_PER_PASS = 32 / CHUNKS;  // a warp copies this many rows at a time
  constexpr int PASSES = kTile / ROWS_PER_PASS;
  static_assert(PASSES >= 2, "whole-tile lookups keep (block, first slot) in id[0], id[1]");
  const bool whole_tiles = bt % kTile == 0;
  const int64_t token_elements = kv.layout.token_elements();
  struct RowBlocks {
    int32_t id[PASSES];
  };
  auto lookup = [&](int tile_start) {
    RowBlocks b;
    if (whole_tiles) {
      const int index = tile_start / bt;
      b.id[0] = tile_start < end ? __ldg(table + index) : 0;
      b.id[1] = tile_start - index * bt;
      return b;
    }
#pragma unroll
    for (int j = 0; j < PASSES; ++j) {
      const int p = tile_start + lane / CHUNKS + j * ROWS_PER_PASS;
      b.id[j] = p < end ? __ldg(table + p / bt) : 0;
    }
    return b;
  };
  // Gathers the tile at tile_start (16 positions) into stage `st`; rows past `end` zero-filled.
  // The row at `skip` is left for a later load (see below).
  auto load_tile = [&](const RowBlocks& b, int tile_start, int st, int skip) {
    const int ch = lane % CHUNKS;
    const T* tile_base =
        pool + kv.offset(whole_tiles ? b.id[0] : 0, layer, 0, whole_tiles ? b.id[1] : 0) + kv_head * HD + ch * 8;
#pragma unroll
    for (int j = 0; j < PASSES; ++j) {
      const int r = lane / CHUNKS + j * ROWS_PER_PASS;
      const int p = tile_start + r;
      if (p == skip) continue;
      const bool valid = p < end;
      const T* src = pool;
      if (valid) {
        src = whole_tiles ? tile_base + r * token_elements
                          : pool + kv.offset(b.id[j], layer, 0, p % bt) + kv_head * HD + ch * 8;
      }
      cp_async_16(Ks(st) + r * STRIDE + ch * 8, src, valid);
      cp_async_16(Vs(st) + r * STRIDE + ch * 8, valid ? src + v_offset : pool, valid);
    }
  };
  const int tile_stride = W * kTile;
  const int first_tile = begin + warp * kTile;

  // Only the newest position's K/V is the previous kernel's output (the Q/K/V product writes
  // one position per sequence; kernels that write older ones are full stream boundaries), so
  // this warp's first two tiles, but for that row, are fetched before the wait, overlapping the
  // previous kernel's tail. Q and the newest row follow the wait.
  const int newest = entry.kv_length - 1;
  const RowBlocks first_blocks[2] = {lookup(first_tile), lookup(first_tile + tile_stride)};
  RowBlocks ahead = lookup(first_tile + 2 * tile_stride);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tile_start = first_tile + i * tile_stride;
    if (tile_start < end) load_tile(first_blocks[i], tile_start, i, newest);
    cp_async_commit();
  }
  pdl_wait();
  for (int c = threadIdx.x; c < 16 * CHUNKS; c += kBlockThreads) {
    const int r = c / CHUNKS, ch = c % CHUNKS;
    const bool valid = r < G;
    const T* src = valid ? q + (static_cast<int64_t>(token) * n_heads + kv_head * G + r) * HD + ch * 8 : q;
    cp_async_16(Qs + r * STRIDE + ch * 8, src, valid);
  }
  for (int i = 0; i < 2; ++i) {
    const int tile_start = first_tile + i * tile_stride;
    if (newest >= tile_start && newest < tile_start + kTile && newest < end && lane < CHUNKS) {
      const int r = newest - tile_start;
      const T* src = pool + kv.offset(table[newest / bt], layer, 0, newest % bt) + static_cast<int64_t>(kv_head) * HD +
                     lane * 8;
      cp_async_16(Ks(i) + r * STRIDE + lane * 8, src, true);
      cp_async_16(Vs(i) + r * STRIDE + lane * 8, src + v_offset, true);
    }
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t qf[HD / 16][4];
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    ldmatrix_x4(qf[kk], Qs + (((lane / 8) % 2) * 8 + lane % 8) * STRIDE + kk * 16 + (lane / 16) * 8);
  }
  float o[HD / 8][4];
#pragma unroll
  for (int dt = 0; dt < HD / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  // Two stages per warp: tile i computes from stage i % 2 while tile i + 1 lands; its stage is
  // refilled with tile i + 2 right after (one commit group per tile, empty past the end).
  int stage = 0;
  for (int tile_start = first_tile, i = 0; tile_start < end; tile_start += tile_stride, ++i) {
    if (i > 0) cp_async_wait<1>();  // tile i is in; tile i + 1 may still be in flight
    __syncwarp();
    const T* K = Ks(stage);
    const T* V = Vs(stage);
    // Scores in two accumulator sets (even and odd kk), halving the chain of dependent mma.
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    float s_odd[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t b[4];
      ldmatrix_x4(b, K + ((lane / 16) * 8 + lane % 8) * STRIDE + kk * 16 + ((lane / 8) % 2) * 8);
      float(*acc)[4] = kk % 2 == 0 ? s : s_odd;
      mma_16816<T>(acc[0], qf[kk], b[0], b[1]);
      mma_16816<T>(acc[1], qf[kk], b[2], b[3]);
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] += s_odd[nt][e];
    }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = tile_start + nt * 8 + (lane % 4) * 2 + (e % 2);
        const float v = key < end ? s[nt][e] * scale_log2 : -INFINITY;
        s[nt][e] = v;
        mx[e / 2] = fmaxf(mx[e / 2], v);
      }
    }
    float correction[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      correction[r] = m[r] == -INFINITY ? 0.0f : exp2f(m[r] - mx[r]);
      m[r] = mx[r];
      l[r] *= correction[r];
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = m[e / 2] == -INFINITY ? 0.0f : exp2f(s[nt][e] - m[e / 2]);
        l[e / 2] += s[nt][e];
      }
    }
    // Once the running maxima settle, most tiles leave them unchanged: skip the rescale then.
    if (__any_sync(0xffffffffu, correction[0] != 1.0f || correction[1] != 1.0f)) {
#pragma unroll
      for (int dt = 0; dt < HD / 8; ++dt) {
        o[dt][0] *= correction[0];
        o[dt][1] *= correction[0];
        o[dt][2] *= correction[1];
        o[dt][3] *= correction[1];
      }
    }
    const uint32_t a[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                           pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int dt2 = 0; dt2 < HD / 16; ++dt2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, V + (((lane / 8) % 2) * 8 + lane % 8) * STRIDE + dt2 * 16 + (lane / 16) * 8);
      mma_16816<T>(o[2 * dt2], a, b[0], b[1]);
      mma_16816<T>(o[2 * dt2 + 1], a, b[2], b[3]);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
    if (tile_start + 2 * tile_stride < end) load_tile(ahead, tile_start + 2 * tile_stride, stage, -1);
    cp_async_commit();
    ahead = lookup(tile_start + 3 * tile_stride);
    stage ^= 1;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }

  // Merge the W warps (rows < G only) through shared memory, reusing the tile buffers.
  __syncthreads();
  float* merge_o = reinterpret_cast<float*>(smem_raw);  // [W][G][HD]
  float* merge_m = merge_o + W * G * HD;                 // [W][G]
  float* merge_l = merge_m + W * G;                      // [W][G]
  const int row0 = lane / 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row >= G) continue;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
      const int col = dt * 8 + (lane % 4) * 2;
      merge_o[(warp * G + row) * HD + col] = o[dt][2 * r];
      merge_o[(warp * G + row) * HD + col + 1] = o[dt][2 * r + 1];
    }
    if (lane % 4 == 0) {
      merge_m[warp * G + row] = m[r];
      merge_l[warp * G + row] = l[r];
    }
  }
  __syncthreads();
  __shared__ float run_max[G], run_sum[G], warp_scale[W][G];
  if (threadIdx.x < G) {
    const int g = threadIdx.x;
    float mm = -INFINITY;
    for (int w = 0; w < W; ++w) mm = fmaxf(mm, merge_m[w * G + g]);
    float ll = 0.0f;
    for (int w = 0; w < W; ++w) {
      const float f = mm == -INFINITY || merge_m[w * G + g] == -INFINITY ? 0.0f : exp2f(merge_m[w * G + g] - mm);
      warp_scale[w][g] = f;
      ll += merge_l[w * G + g] * f;
    }
    run_max[g] = mm;
    run_sum[g] = ll;
  }
  __syncthreads();
  const bool single = used == 1;
  // Partial states: accumulators [n_decode][n_heads][n_splits][HD], then (max, sum) pairs in
  // the same order, so the merge below reads accumulators as aligned float4.
  const int64_t head_row0 = (static_cast<int64_t>(d) * n_heads + kv_head * G) * n_splits;  // (g 0, split 0)
  float2* split_states = reinterpret_cast<float2*>(partial + static_cast<int64_t>(gridDim.z) * n_heads * n_splits * HD);
  for (int e = threadIdx.x; e < G * HD; e += kBlockThreads) {
    const int g = e / HD, col = e % HD;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < W; ++w) total += merge_o[(w * G + g) * HD + col] * warp_scale[w][g];
    if (single) {
      out[(static_cast<int64_t>(token) * n_heads + kv_head * G + g) * HD + col] =
          from_float<T>(run_sum[g] > 0.0f ? total / run_sum[g] : 0.0f);
    } else {
      const int64_t row = head_row0 + static_cast<int64_t>(g) * n_splits + split;
      if (col == 0) split_states[row] = make_float2(run_max[g], run_sum[g]);
      partial[row * HD + col] = total;
    }
  }
  if (single) {
    timeline_end();
    return;
  }

  // The last split to finish merges all of them. The barrier orders the block's partial writes
  // before thread 0's release (as in a grid barrier); its acquire, then the second barrier, make
  // every other split's writes visible to the whole block: one round trip to L2, no full fences.
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) last = arrive_last(counters + static_cast<int64_t>(d) * kv.layout.n_kv_heads + kv_head, used);
  __syncthreads();
  if (!last) {
    timeline_end();
    return;
  }
  // The splits' states come to shared memory (the tile buffers, free now) in chunks: each
  // chunk's accumulators by cp.async (L2 only: other blocks wrote them) while its (max, sum)
  // pairs are loaded beside them, so a chunk costs one round trip whatever its size, without
  // holding registers. Each thread owns quads of head rows and merges them with a running max.
  constexpr int QUADS = HD / 4;
  constexpr int kOwned = (G * QUADS + kBlockThreads - 1) / kBlockThreads;
  constexpr int kChunk = static_cast<int>(Smem::kElems * sizeof(T) / ((HD * sizeof(float) + sizeof(float2)) * G));
  static_assert(kChunk >= 1, "merge chunk");
  float* chunk_acc = reinterpret_cast<float*>(smem_raw);                      // [kChunk][G][HD]
  float2* chunk_state = reinterpret_cast<float2*>(chunk_acc + kChunk * G * HD);  // [kChunk][G]
  float4 a[kOwned];
  float mm[kOwned], ll[kOwned];
#pragma unroll
  for (int j = 0; j < kOwned; ++j) {
    a[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    mm[j] = -INFINITY;
    ll[j] = 0.0f;
  }
  for (int first = 0; first < used; first += kChunk) {
    const int n = min(kChunk, used - first);
    for (int i = threadIdx.x; i < n * G * QUADS; i += kBlockThreads) {
      const int sp = i / (G * QUADS), g = (i / QUADS) % G, quad = i % QUADS;
      const float* src = partial + (head_row0 + static_cast<int64_t>(g) * n_splits + first + sp) * HD + quad * 4;
      cp_async_16(chunk_acc + (sp * G + g) * HD + quad * 4, src, true);
    }
    cp_async_commit();
    for (int i = threadIdx.x; i < n * G; i += kBlockThreads) {
      const int sp = i / G, g = i % G;
      chunk_state[i] = __ldcg(split_states + head_row0 + static_cast<int64_t>(g) * n_splits + first + sp);
    }
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kOwned; ++j) {
      const int e = threadIdx.x + j * kBlockThreads;
      if (e >= G * QUADS) break;
      const int g = e / QUADS, quad = e % QUADS;
      float chunk_max = mm[j];
      for (int sp = 0; sp < n; ++sp) chunk_max = fmaxf(chunk_max, chunk_state[sp * G + g].x);
      if (chunk_max != mm[j]) {  // rescale what earlier chunks summed
        const float c = mm[j] == -INFINITY ? 0.0f : exp2f(mm[j] - chunk_max);
        ll[j] *= c;
        a[j].x *= c;
        a[j].y *= c;
        a[j].z *= c;
        a[j].w *= c;
        mm[j] = chunk_max;
      }
      for (int sp = 0; sp < n; ++sp) {
        const float2 state = chunk_state[sp * G + g];
        const float f = mm[j] == -INFINITY || state.x == -INFINITY ? 0.0f : exp2f(state.x - mm[j]);
        const float4 v = *reinterpret_cast<const float4*>(chunk_acc + (sp * G + g) * HD + quad * 4);
        ll[j] = fmaf(f, state.y, ll[j]);
        a[j].x = fmaf(f, v.x, a[j].x);
        a[j].y = fmaf(f, v.y, a[j].y);
        a[j].z = fmaf(f, v.z, a[j].z);
        a[j].w = fmaf(f, v.w, a[j].w);
      }
    }
    __syncthreads();  // the chunk is consumed before the next one lands
  }
#pragma unroll
  for (int j = 0; j < kOwned; ++j) {
    const int e = threadIdx.x + j * kBlockThreads;
    if (e >= G * QUADS) break;
    const int g = e / QUADS, quad = e % QUADS;
    T* dst = out + (static_cast<int64_t>(token) * n_heads + kv_head * G + g) * HD + quad * 4;
    const float inv = ll[j] > 0.0f ? 1.0f / ll[j] : 0.0f;
    dst[0] = from_float<T>(a[j].x * inv);
    dst[1] = from_float<T>(a[j].y * inv);
    dst[2] = from_float<T>(a[j].z * inv);
    dst[3] = from_float<T>(a[j].w * inv);
  }
  timeline_end();
}

// The SM's shared memory and what the driver reserves for each block.
struct SmemLimits {
  size_t per_sm = 0, reserved_per_block = 0;
};
SmemLimits smem_limits() {
  int device = 0, per_sm = 0, reserved = 0;
  check(cudaGetDevice(&device));
  check(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  check(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
  return {static_cast<size_t>(per_sm), static_cast<size_t>(reserved)};
}
// The shared-memory carveout (percent of the SM's maximum) that holds `blocks` blocks of
// `block_bytes` each; the driver rounds it up to a configuration the SM supports.
int carveout_percent(int blocks, size_t block_bytes) {
  const SmemLimits limits = smem_limits();
  const size_t need = static_cast<size_t>(blocks) * (block_bytes + limits.reserved_per_block);
  return static_cast<int>(std::min<size_t>(100, (100 * need + limits.per_sm - 1) / limits.per_sm));
}

// How many decode-attention blocks of block_bytes (dynamic and static shared memory) a dense
// grid puts on an SM: as many as fit kBelowLargestCarveout under the largest carveout. The
// largest leaves L1 only 28 KiB and slows the products around attention (8B batch 1 at 1K, H200:
// 83.4% of the floor with three blocks an SM in that carveout, 88.7% with two).
constexpr size_t kBelowLargestCarveout = 32 * 1024;
int dense_blocks_per_sm(size_t block_bytes) {
  const SmemLimits limits = smem_limits();
  const size_t room = limits.per_sm > kBelowLargestCarveout ? limits.per_sm - kBelowLargestCarveout : 0;
  return std::max(1, static_cast<int>(room / (block_bytes + limits.reserved_per_block)));
}
template <typename Kernel>
size_t block_shared_bytes(Kernel kernel, size_t dynamic_bytes) {
  cudaFuncAttributes attributes{};
  check(cudaFuncGetAttributes(&attributes, kernel));
  return dynamic_bytes + attributes.sharedSizeBytes;
}

// Calls f(kernel, dynamic shared memory, threads, tag of T) with the decode kernel instance for
// (dtype, head_dim, group), its shared memory and carveout set: the one place that picks an
// instance. A sparse grid (no more blocks than SMs: batch 1 at short contexts) runs 8-warp
// blocks, so a 128-position split is one tile a warp instead of two (8B batch 1 at 1K: +0.9
// points of the floor, 1B +1.7), with a carveout that holds one block, so the SM keeps most of
// its L1 for the products around it (+0.4 to +1.3 and +2); a dense grid runs 4-warp blocks, its
// carveout sized by dense_blocks_per_sm.
template <typename F>
void with_decode_kernel(DType dtype, int32_t head_dim, int32_t group, bool sparse, F&& f) {
  dispatch_half_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(head_dim, [&](auto hd_tag) {
      constexpr int HD = decltype(hd_tag)::value;
      dispatch_count_1_to_8(group, "decode attention: query heads per KV head", [&](auto g_tag) {
        constexpr int G = decltype(g_tag)::value;
        // Attributes are set once per thread and device for each instance (launches in eager
        // steps would otherwise repeat them every layer).
        static thread_local int configured_device[2] = {-1, -1};
        auto run = [&](auto kernel, auto w_tag, bool one_block) {
          constexpr int W = decltype(w_tag)::value;
          constexpr size_t smem = DecodeSmem<HD, W>::kElems * sizeof(T);
          static_assert(smem >= (W * G * HD + 2 * W * G) * sizeof(float), "merge space");
          int device = 0;
          check(cudaGetDevice(&device));
          if (configured_device[one_block] != device) {
            check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
            const size_t block_bytes = block_shared_bytes(kernel, smem);
            const int blocks = one_block ? 1 : dense_blocks_per_sm(block_bytes);
            check(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                       carveout_percent(blocks, block_bytes)));
            configured_device[one_block] = device;
          }
          f(kernel, smem, W * 32, tag);
        };
        if (sparse) {
          run(decode_attention_kernel<T, HD, G, kSparseWarps>, std::integral_constant<int, kSparseWarps>{}, true);
        } else {
          run(decode_attention_kernel<T, HD, G, kWarps>, std::integral_constant<int, kWarps>{}, false);
        }
      });
    });
  });
}

}  // namespace

int64_t decode_attention_resident_blocks(DType kv_dtype, int32_t head_dim, int32_t group) {
  if (!attention_fast_path(kv_dtype, head_dim)) return 0;
  int per_sm = 0;
  with_decode_kernel(kv_dtype, head_dim, group, false, [&](auto kernel, size_t smem, int threads, auto) {
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    per_sm = std::min(per_sm, dense_blocks_per_sm(block_shared_bytes(kernel, smem)));
  });
  return int64_t{std::max(per_sm, 1)} * sm_count();
}

void decode_attention_launch(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch,
                             const AttentionPlan& plan, int32_t layer, int32_t n_heads, float scale,
                             CudaStream stream) {
  if (plan.n_decode == 0) return;
  if (plan.n_splits < 1 || plan.n_splits > kMaxSplits) {
    throw std::invalid_argument("decode attention: 1 to 128 KV splits");
  }
  if (plan.min_split_tokens < 1) throw std::invalid_argument("decode attention: min_split_tokens must be positive");
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
  const bool sparse = int64_t{grid.x} * grid.y * grid.z <= sm_count();
  with_decode_kernel(kv.layout.dtype, kv.layout.head_dim, group, sparse,
                     [&](auto kernel, size_t smem, int threads, auto tag) {
    using T = decltype(tag);
    launch_chained(kernel, grid, dim3(threads), smem, stream, static_cast<const T*>(q), static_cast<T*>(out), kv,
                   batch, plan.decode, layer, n_heads, scale_log2, plan.min_split_tokens, plan.n_splits, partial,
                   counters);
    check_launch();
  });
}

}  // namespace den::kernels
