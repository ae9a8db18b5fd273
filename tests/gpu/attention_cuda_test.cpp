// Paged attention on the GPU against paged_attention_head_ref: decode sequences up to 5000
// positions with KV splits (4, 7, 64 and 128 at most, each sequence cut by its own length; and
// single sequences, whose grids take the sparse 8-warp instance, with 16, 6, 5 and 1 splits in use),
// prefill tiles, GQA groups of 3 and 4, blocks of 16 tokens (and 5, 12 and 32 for the decode
// lookups), f16/bf16 at head sizes 64 and 128 (the fast paths) and f32 at 8 and 40 (the generic
// kernel). Both sides read the very same KV bytes and the same rounded queries; unused pool
// slots hold NaN.
#include <numeric>

#include "den/kernels/attention.h"
#include "gpu_support.h"

using namespace den;
using kernels::DType;

namespace {

struct Seq {
  int32_t start;  // first new position
  int32_t length; // KV length after the step
};

uint16_t to_half_bits(float v, DType t) { return t == DType::bf16 ? kernels::f32_to_bf16(v) : kernels::f32_to_fp16(v); }
float from_half_bits(uint16_t h, DType t) { return t == DType::bf16 ? kernels::bf16_to_f32(h) : kernels::fp16_to_f32(h); }

void check_attention(DType t, int32_t head_dim, int32_t n_heads, int32_t n_kv, const std::vector<Seq>& seqs,
                     std::mt19937& rng, int32_t bt = 16, int32_t splits = 4, int32_t min_split = 64) {
  const kernels::KvLayout layout{2, n_kv, head_dim, bt, t};
  const int32_t layer = 1;
  // Block tables over a shuffled pool with spare blocks.
  int64_t need = 0;
  for (const Seq& s : seqs) need += (s.length + bt - 1) / bt;
  const int64_t n_blocks = need + 5;
  std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<std::vector<int32_t>> tables;
  size_t next = 0;
  for (const Seq& s : seqs) {
    tables.emplace_back(ids.begin() + static_cast<ptrdiff_t>(next),
                        ids.begin() + static_cast<ptrdiff_t>(next + (s.length + bt - 1) / bt));
    next += (s.length + bt - 1) / bt;
  }
  // The pool: NaN everywhere, random K/V for every position of every sequence.
  const size_t elements = static_cast<size_t>(n_blocks * layout.block_elements());
  std::vector<float> pool32;
  std::vector<uint16_t> pool16;
  if (t == DType::f32) {
    pool32.assign(elements, std::nanf(""));
  } else {
    pool16.assign(elements, 0xffff);
  }
  kernels::PagedKvView host{t == DType::f32 ? static_cast<void*>(pool32.data()) : pool16.data(), n_blocks, layout};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t q = 0; q < seqs.size(); ++q) {
    for (int32_t p = 0; p < seqs[q].length; ++p) {
      for (int kv = 0; kv < 2; ++kv) {
        const int64_t base = host.offset(tables[q][static_cast<size_t>(p / bt)], layer, kv, p % bt);
        for (int64_t i = 0; i < layout.token_elements(); ++i) {
          const float v = normal(rng);
          if (t == DType::f32) {
            pool32[static_cast<size_t>(base + i)] = v;
          } else {
            pool16[static_cast<size_t>(base + i)] = to_half_bits(v, t);
          }
        }
      }
    }
  }
  // Tokens, queries (rounded to the KV type), the plan.
  std::vector<int32_t> flat_tables, offsets, lengths, token_seq, token_pos;
  std::vector<kernels::DecodeEntry> decode;
  std::vector<kernels::AttentionTile> tiles;
  for (size_t q = 0; q < seqs.size(); ++q) {
    offsets.push_back(static_cast<int32_t>(flat_tables.size()));
    flat_tables.insert(flat_tables.end(), tables[q].begin(), tables[q].end());
    lengths.push_back(seqs[q].length);
    const auto first = static_cast<int32_t>(token_seq.size());
    const int32_t n = seqs[q].length - seqs[q].start;
    for (int32_t i = 0; i < n; ++i) {
      token_seq.push_back(static_cast<int32_t>(q));
      token_pos.push_back(seqs[q].start + i);
    }
    if (n == 1) {
      decode.push_back({first, static_cast<int32_t>(q), seqs[q].length, offsets.back()});
    } else {
      for (int32_t r = 0; r < n; r += kernels::kAttentionTileRows) {
        tiles.push_back({static_cast<int32_t>(q), first + r, std::min(kernels::kAttentionTileRows, n - r),
                         seqs[q].start + r});
      }
    }
  }
  const auto n_tokens = static_cast<int32_t>(token_seq.size());
  const size_t q_elements = static_cast<size_t>(n_tokens) * n_heads * head_dim;
  std::vector<float> qf(q_elements);
  std::vector<uint16_t> q16(q_elements);
  for (size_t i = 0; i < q_elements; ++i) {
    const float v = normal(rng);
    if (t == DType::f32) {
      qf[i] = v;
    } else {
      q16[i] = to_half_bits(v, t);
      qf[i] = from_half_bits(q16[i], t);
    }
  }
  // Reference.
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> ref(q_elements), scores(6000);
  for (int32_t tok = 0; tok < n_tokens; ++tok) {
    const size_t q = static_cast<size_t>(token_seq[static_cast<size_t>(tok)]);
    const kernels::PagedSequence seq{tables[q], seqs[q].length};
    for (int32_t h = 0; h < n_heads; ++h) {
      const size_t at = (static_cast<size_t>(tok) * n_heads + h) * head_dim;
      kernels::paged_attention_head_ref(host, seq, layer, token_pos[static_cast<size_t>(tok)], h / (n_heads / n_kv),
                                        qf.data() + at, scale, ref.data() + at, scores.data());
    }
  }
  // Device.
  const kernels::DeviceBuffer d_pool = t == DType::f32 ? test::to_device(pool32) : test::to_device(pool16);
  const kernels::DeviceBuffer d_q = t == DType::f32 ? test::to_device(qf) : test::to_device(q16);
  const auto d_tables = test::to_device(flat_tables), d_offsets = test::to_device(offsets),
             d_lengths = test::to_device(lengths), d_seq = test::to_device(token_seq),
             d_pos = test::to_device(token_pos), d_decode = test::to_device(decode),
             d_tiles = test::to_device(tiles);
  kernels::PagedBatch batch{d_tables.as<int32_t>(), d_offsets.as<int32_t>(), d_lengths.as<int32_t>(),
                            d_seq.as<int32_t>(),    d_pos.as<int32_t>(),     static_cast<int32_t>(seqs.size()),
                            n_tokens};
  kernels::AttentionPlan plan;
  plan.decode = d_decode.as<kernels::DecodeEntry>();
  plan.n_decode = static_cast<int32_t>(decode.size());
  plan.n_splits = splits;
  plan.min_split_tokens = min_split;
  kernels::DeviceBuffer workspace(kernels::attention_workspace_bytes(plan.n_decode, n_heads, plan.n_splits, head_dim));
  kernels::check(cudaMemset(workspace.get(), 0, workspace.bytes()));
  plan.partial = workspace.as<float>();
  plan.tiles = d_tiles.as<kernels::AttentionTile>();
  plan.n_tiles = static_cast<int32_t>(tiles.size());
  kernels::DeviceBuffer out(q_elements * kernels::dtype_bytes(t));
  kernels::check(cudaMemset(out.get(), 0xff, out.bytes()));
  // Twice: the second launch relies on the merge counters the first one returned to zero.
  for (int launch = 0; launch < 2; ++launch) {
    kernels::check(cudaMemset(out.get(), 0xff, out.bytes()));
    kernels::paged_attention_cuda(d_q.get(), out.get(), {d_pool.get(), n_blocks, layout}, batch, plan, layer, n_heads,
                                  scale, nullptr);
  }
  std::vector<float> got = t == DType::f32 ? test::to_host<float>(out, q_elements)
                                           : (t == DType::bf16 ? test::bf16_to_floats(test::to_host<uint16_t>(out, q_elements))
                                                               : test::fp16_to_floats(test::to_host<uint16_t>(out, q_elements)));
  const std::string what = "attention " + std::string(kernels::dtype_name(t)) + " hd=" + std::to_string(head_dim) +
                           " block_tokens " + std::to_string(bt) +
                           " heads " + std::to_string(n_heads) + "/" + std::to_string(n_kv) +
                           (kernels::attention_fast_path(t, head_dim) ? " (fast paths, splits " +
                                                                            std::to_string(plan.n_splits) + ")"
                                                                      : " (generic)");
  test::check_close(test::compare(got, ref), t == DType::f32 ? 1e-10 : 1e-5, what);
}

}  // namespace

TEST_CASE("paged attention fast paths match the reference (decode with splits, prefill tiles)") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(41);
  const std::vector<Seq> mixed = {{0, 37}, {36, 37}, {1001, 1002}, {4999, 5000}, {100, 250}, {0, 64}, {0, 1}, {5, 6}};
  for (DType t : {DType::bf16, DType::f16}) {
    for (int32_t hd : {64, 128}) {
      check_attention(t, hd, 8, 2, mixed, rng);
      check_attention(t, hd, 6, 2, mixed, rng);
    }
  }
  // Blocks that do not hold whole 16-position decode tiles (rows looked up one by one), and
  // blocks of two tiles.
  for (int32_t bt : {12, 5, 32}) check_attention(DType::bf16, 128, 8, 2, mixed, rng, bt);
  // As many splits as the step plan makes at long contexts (the last block merges all of them),
  // and splits of one or two tiles: 7 over 37 positions (3 tiles) leaves 3 in use, and over
  // 1002 positions (63 tiles) 7 of 9 or 10 tiles each.
  check_attention(DType::bf16, 128, 8, 2, mixed, rng, 16, 64);
  check_attention(DType::bf16, 64, 8, 2, mixed, rng, 16, 7, 16);
  check_attention(DType::f16, 128, 8, 2, mixed, rng, 32, 128, 1);
  // One decode sequence: a sparse grid (no more blocks than SMs: the 8-warp instance). 16
  // splits of which 16 are used; 5 of 8 used (idle blocks return at once); one used (no merge);
  // 6 of 6.
  check_attention(DType::bf16, 128, 8, 2, {{1001, 1002}}, rng, 16, 16, 64);
  check_attention(DType::bf16, 64, 6, 2, {{299, 300}}, rng, 16, 8, 64);
  check_attention(DType::f16, 64, 8, 2, {{36, 37}}, rng, 16, 8, 64);
  check_attention(DType::bf16, 128, 6, 2, {{4999, 5000}}, rng, 16, 6, 64);
}

TEST_CASE("paged attention generic kernel (f32 KV, small heads) matches the reference") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(42);
  const std::vector<Seq> mixed = {{0, 37}, {36, 37}, {300, 1002}, {0, 1}};
  check_attention(DType::f32, 8, 8, 4, mixed, rng);
  check_attention(DType::f32, 40, 6, 3, mixed, rng);
  check_attention(DType::bf16, 40, 4, 4, mixed, rng);
}
