// Paged attention against a dense double-precision reference: shuffled block tables, GQA,
// every KV dtype, and NaN in every slot the kernel must not read.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "den/kernels/attention.h"
#include "test_support.h"

using namespace den::kernels;

namespace {

struct PagedFixture {
  KvLayout layout;
  std::vector<float> pool_f32;
  std::vector<uint16_t> pool_16;
  std::vector<int32_t> table;
  std::vector<float> k_dense, v_dense;  // [tokens, n_kv_heads, head_dim], as stored (rounded)

  PagedFixture(DType dtype, int32_t tokens, std::mt19937& rng)
      : layout{2, 3, 40, 16, dtype} {
    const int32_t n_blocks_used = (tokens + layout.block_tokens - 1) / layout.block_tokens;
    const int64_t n_blocks = n_blocks_used + 5;  // spare blocks nobody owns
    if (dtype == DType::f32) {
      pool_f32.assign(static_cast<size_t>(n_blocks * layout.block_elements()), std::numeric_limits<float>::quiet_NaN());
    } else {
      pool_16.assign(static_cast<size_t>(n_blocks * layout.block_elements()), dtype == DType::f16 ? 0x7e00 : 0x7fc0);
    }
    std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    table.assign(ids.begin(), ids.begin() + n_blocks_used);
    const PagedKvView kv = view();
    const PagedSequence seq{table, tokens};
    const auto te = static_cast<size_t>(layout.token_elements());
    k_dense.resize(static_cast<size_t>(layout.n_layers) * tokens * te);
    v_dense.resize(k_dense.size());
    for (int32_t layer = 0; layer < layout.n_layers; ++layer) {
      for (int32_t p = 0; p < tokens; ++p) {
        const auto k = den::test::random_floats(rng, te);
        const auto v = den::test::random_floats(rng, te);
        kv_store_ref(kv, seq, layer, p, k.data(), v.data());
        // Read back what the pool holds (rounded to its dtype) for the dense reference.
        for (size_t i = 0; i < te; ++i) {
          const int64_t ko = kv.offset(table[static_cast<size_t>(p / layout.block_tokens)], layer, 0, p % layout.block_tokens) +
                             static_cast<int64_t>(i);
          const int64_t vo = kv.offset(table[static_cast<size_t>(p / layout.block_tokens)], layer, 1, p % layout.block_tokens) +
                             static_cast<int64_t>(i);
          const size_t d = (static_cast<size_t>(layer) * tokens + p) * te + i;
          k_dense[d] = load(ko);
          v_dense[d] = load(vo);
          REQUIRE(std::abs(k_dense[d] - k[i]) <= (dtype == DType::f32 ? 0.0f : 1e-2f * std::abs(k[i]) + 1e-3f));
        }
      }
    }
  }

  float load(int64_t index) const;
  PagedKvView view() {
    void* base = pool_f32.empty() ? static_cast<void*>(pool_16.data()) : static_cast<void*>(pool_f32.data());
    const int64_t n = static_cast<int64_t>(pool_f32.empty() ? pool_16.size() : pool_f32.size()) / layout.block_elements();
    return {base, n, layout};
  }
};

float PagedFixture::load(int64_t index) const {
  if (!pool_f32.empty()) return pool_f32[static_cast<size_t>(index)];
  const uint16_t h = pool_16[static_cast<size_t>(index)];
  if (layout.dtype == DType::bf16) return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
  return static_cast<float>(std::bit_cast<_Float16>(h));
}

void check_attention(DType dtype) {
  std::mt19937 rng(6);
  const int32_t tokens = 53;  // three full blocks and a partial one
  PagedFixture f(dtype, tokens, rng);
  const PagedKvView kv = f.view();
  const PagedSequence seq{f.table, tokens};
  const int32_t hd = f.layout.head_dim;
  const auto te = static_cast<size_t>(f.layout.token_elements());
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> scores(static_cast<size_t>(tokens));
  for (int32_t layer = 0; layer < f.layout.n_layers; ++layer) {
    for (int32_t position : {0, 15, 16, 31, 52}) {
      for (int32_t kv_head = 0; kv_head < f.layout.n_kv_heads; ++kv_head) {
        const auto q = den::test::random_floats(rng, static_cast<size_t>(hd));
        std::vector<float> out(static_cast<size_t>(hd), std::nanf(""));
        paged_attention_head_ref(kv, seq, layer, position, kv_head, q.data(), scale, out.data(), scores.data());
        // Dense reference in double.
        std::vector<double> s(static_cast<size_t>(position + 1));
        double max_s = -1e300;
        for (int32_t p = 0; p <= position; ++p) {
          double dot = 0.0;
          for (int32_t d = 0; d < hd; ++d) {
            dot += static_cast<double>(q[static_cast<size_t>(d)]) *
                   f.k_dense[(static_cast<size_t>(layer) * tokens + p) * te + static_cast<size_t>(kv_head * hd + d)];
          }
          s[static_cast<size_t>(p)] = dot * scale;
          max_s = std::max(max_s, s[static_cast<size_t>(p)]);
        }
        double sum = 0.0;
        for (double& v : s) sum += (v = std::exp(v - max_s));
        for (int32_t d = 0; d < hd; ++d) {
          double ref = 0.0;
          for (int32_t p = 0; p <= position; ++p) {
            ref += s[static_cast<size_t>(p)] / sum *
                   f.v_dense[(static_cast<size_t>(layer) * tokens + p) * te + static_cast<size_t>(kv_head * hd + d)];
          }
          REQUIRE(std::isfinite(out[static_cast<size_t>(d)]));
          REQUIRE(std::abs(out[static_cast<size_t>(d)] - ref) < 1e-5);
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("paged attention over a shuffled block table equals dense attention (f32 KV)") {
  check_attention(DType::f32);
}
TEST_CASE("paged attention with f16 KV") { check_attention(DType::f16); }
TEST_CASE("paged attention with bf16 KV") { check_attention(DType::bf16); }

TEST_CASE("decode_split cuts each context into equal runs of whole tiles, no more than asked") {
  for (int32_t length : {0, 1, 15, 16, 17, 37, 128, 129, 1000, 1044, 5000, 32800}) {
    for (int32_t n_splits : {1, 4, 7, 16, 49, 64, 128}) {
      for (int32_t min_split : {1, 16, 64, 128}) {
        CAPTURE(length);
        CAPTURE(n_splits);
        CAPTURE(min_split);
        const int32_t used = decode_split(length, 0, n_splits, min_split).used;
        const int32_t tiles = std::max(1, (length + kDecodeTile - 1) / kDecodeTile);
        CHECK(used == std::max(1, std::min({n_splits, tiles, (length + min_split - 1) / min_split})));
        int32_t covered = 0, fewest = 1 << 30, most = 0;
        for (int32_t s = 0; s < n_splits; ++s) {
          const DecodeSplit d = decode_split(length, s, n_splits, min_split);
          CHECK(d.used == used);
          if (s >= used) {
            CHECK(d.begin == d.end);
            continue;
          }
          CHECK(d.begin == covered);  // contiguous, in order, from 0
          CHECK(d.begin % kDecodeTile == 0);
          CHECK((length == 0 || d.end > d.begin));
          covered = d.end;
          const int32_t split_tiles = (d.end - d.begin + kDecodeTile - 1) / kDecodeTile;
          fewest = std::min(fewest, split_tiles);
          most = std::max(most, split_tiles);
        }
        CHECK(covered == length);
        if (length > kDecodeTile) CHECK(most - fewest <= 1);
      }
    }
  }
}
