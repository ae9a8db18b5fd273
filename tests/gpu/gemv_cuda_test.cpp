// The fused small-batch GEMV against its CPU twin: every epilogue, 1 to 8 tokens, odd sizes,
// every weight type; the rope_store epilogue writes the same KV pages as the reference.
#include <numeric>

#include "den/kernels/gemv.h"
#include "gpu_support.h"

using namespace den;
using kernels::DType;
using kernels::GemvEpilogue;

namespace {

std::vector<uint16_t> to_half_bits(const std::vector<float>& v, DType t) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = t == DType::bf16 ? kernels::f32_to_bf16(v[i]) : kernels::f32_to_fp16(v[i]);
  return out;
}
std::vector<float> from_half_bits(const std::vector<uint16_t>& v, DType t) {
  return t == DType::bf16 ? test::bf16_to_floats(v) : test::fp16_to_floats(v);
}

// Host and device copies of a float vector stored as `t`.
struct Stored {
  std::vector<float> f;
  std::vector<uint16_t> h;
  kernels::DeviceBuffer d;
  Stored(const std::vector<float>& v, DType t) {
    if (t == DType::f32) {
      f = v;
      d = test::to_device(f);
    } else {
      h = to_half_bits(v, t);
      d = test::to_device(h);
    }
  }
  const void* host() const { return f.empty() ? static_cast<const void*>(h.data()) : f.data(); }
};

std::vector<float> read(const kernels::DeviceBuffer& b, size_t n, DType t) {
  return t == DType::f32 ? test::to_host<float>(b, n) : from_half_bits(test::to_host<uint16_t>(b, n), t);
}

// One product on the GPU against gemv_ref on the same rounded inputs.
void check_product(std::mt19937& rng, DType t, int32_t n_tokens, int64_t n_in, int64_t n_out, GemvEpilogue e,
                   bool norm) {
  const Stored w(test::random_floats(rng, static_cast<size_t>(n_in * n_out), 0.05f), t);
  const auto xf = test::random_floats(rng, static_cast<size_t>((n_tokens + 2) * n_in), 2.0f);
  const Stored x(xf, norm ? DType::f32 : t);
  const auto norm_w = test::random_floats(rng, static_cast<size_t>(n_in));
  const auto d_norm = test::to_device(norm_w);
  std::vector<int32_t> rows(static_cast<size_t>(n_tokens));
  std::iota(rows.begin(), rows.end(), 0);
  std::reverse(rows.begin(), rows.end());
  const auto d_rows = test::to_device(rows);
  kernels::GemvInput host_in{x.host(), rows.data(), norm ? norm_w.data() : nullptr, 1e-5f};
  kernels::GemvInput dev_in{x.d.get(), d_rows.as<int32_t>(), norm ? d_norm.as<float>() : nullptr, 1e-5f};
  const int64_t out_n = e == GemvEpilogue::swiglu ? n_tokens * n_out / 2 : n_tokens * n_out;
  const DType out_t = e == GemvEpilogue::swiglu ? t : DType::f32;
  const auto start = test::random_floats(rng, static_cast<size_t>(out_n));  // accumulate adds to it
  std::vector<float> ref_f = start;
  std::vector<uint16_t> ref_h(static_cast<size_t>(out_n));
  void* ref_out = out_t == DType::f32 ? static_cast<void*>(ref_f.data()) : ref_h.data();
  kernels::gemv_ref(w.host(), t, n_in, n_out, host_in, n_tokens, e, ref_out, nullptr);
  kernels::DeviceBuffer y = out_t == DType::f32 ? test::to_device(start)
                                                : kernels::DeviceBuffer(static_cast<size_t>(out_n) * 2);
  kernels::gemv_cuda(w.d.get(), t, n_in, n_out, dev_in, n_tokens, e, y.get(), nullptr, nullptr);
  const auto got = read(y, static_cast<size_t>(out_n), out_t);
  const auto ref = out_t == DType::f32 ? ref_f : from_half_bits(ref_h, out_t);
  const char* names[] = {"store", "accumulate", "swiglu", "rope_store"};
  test::check_close(test::compare(got, ref), out_t == DType::f32 ? 1e-10 : 1e-5,
                    "gemv " + std::string(kernels::dtype_name(t)) + " " + names[static_cast<int>(e)] +
                        (norm ? " +norm" : "") + " tokens=" + std::to_string(n_tokens) + " " +
                        std::to_string(n_out) + "x" + std::to_string(n_in));
}

}  // namespace

TEST_CASE("gemv_cuda matches gemv_ref: store, accumulate, swiglu, with and without the norm") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(61);
  for (DType t : {DType::bf16, DType::f16, DType::f32}) {
    for (int32_t n_tokens : {1, 3, 8}) {
      // 14336 and 9000 inputs: rows of more than 1024 16-byte pieces, which batch 1 runs on 512-thread blocks.
      for (auto [n_in, n_out] : {std::pair<int64_t, int64_t>{1000, 37}, {4096, 1002}, {576, 2 * 1536}, {14336, 74},
                                 {9000, 38}}) {
        for (GemvEpilogue e : {GemvEpilogue::store, GemvEpilogue::accumulate, GemvEpilogue::swiglu}) {
          if (e == GemvEpilogue::swiglu && n_out % 2 != 0) continue;
          for (bool norm : {false, true}) check_product(rng, t, n_tokens, n_in, n_out, e, norm);
        }
      }
    }
  }
}

TEST_CASE("gemv_cuda at the 1B shape's single-token products") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(63);
  check_product(rng, DType::bf16, 1, 2048, 2 * 8192, GemvEpilogue::swiglu, true);
  check_product(rng, DType::bf16, 1, 8192, 2048, GemvEpilogue::accumulate, false);
  check_product(rng, DType::f16, 1, 2048, 3072, GemvEpilogue::store, true);
}

TEST_CASE("gemv_cuda reads a first layer's input from the embedding table and starts the residual stream") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(65);
  for (DType t : {DType::bf16, DType::f16}) {
    for (auto [n_in, n_out] : {std::pair<int64_t, int64_t>{2048, 3072}, {576, 74}, {4096, 1002}}) {
      const int64_t n_vocab = 301;
      const Stored table(test::random_floats(rng, static_cast<size_t>(n_vocab * n_in), 1.0f), t);
      const Stored w(test::random_floats(rng, static_cast<size_t>(n_in * n_out), 0.05f), t);
      const auto norm_w = test::random_floats(rng, static_cast<size_t>(n_in));
      const std::vector<int32_t> ids = {7, 283};  // token 0's row is rows[0] = 1: id 283
      const std::vector<int32_t> rows = {1};
      const auto d_norm = test::to_device(norm_w), d_ids = test::to_device(ids), d_rows = test::to_device(rows);
      std::vector<float> ref_y(static_cast<size_t>(n_out)), ref_x(static_cast<size_t>(2 * n_in), -1.0f);
      kernels::GemvInput host_in{table.host(), rows.data(), norm_w.data(), 1e-5f, ids.data(), ref_x.data()};
      kernels::gemv_ref(w.host(), t, n_in, n_out, host_in, 1, GemvEpilogue::store, ref_y.data(), nullptr);
      kernels::DeviceBuffer y(static_cast<size_t>(n_out) * 4);
      const auto x = test::to_device(std::vector<float>(static_cast<size_t>(2 * n_in), -1.0f));
      kernels::GemvInput dev_in{table.d.get(), d_rows.as<int32_t>(), d_norm.as<float>(), 1e-5f, d_ids.as<int32_t>(),
                                x.as<float>()};
      kernels::gemv_cuda(w.d.get(), t, n_in, n_out, dev_in, 1, GemvEpilogue::store, y.get(), nullptr, nullptr);
      const std::string what = std::string(kernels::dtype_name(t)) + " " + std::to_string(n_out) + "x" +
                               std::to_string(n_in);
      test::check_close(test::compare(test::to_host<float>(y, ref_y.size()), ref_y), 1e-10, "gemv from the embedding " + what);
      // The residual row is the table row exactly; the other row is untouched.
      CHECK(test::to_host<float>(x, ref_x.size()) == ref_x);
    }
  }
  // Anywhere but the single-token kernel, an embedding-table input is refused.
  const auto table = test::to_device(std::vector<float>(64 * 16, 1.0f));
  const auto w = test::to_device(std::vector<float>(64 * 8, 1.0f));
  const auto norm = test::to_device(std::vector<float>(64, 1.0f));
  const auto ids = test::to_device(std::vector<int32_t>{3});
  kernels::DeviceBuffer x(64 * 4), y(8 * 4);
  const kernels::GemvInput f32_in{table.get(), nullptr, norm.as<float>(), 1e-5f, ids.as<int32_t>(), x.as<float>()};
  CHECK_THROWS_AS(kernels::gemv_cuda(w.get(), DType::f32, 64, 8, f32_in, 1, GemvEpilogue::store, y.get(), nullptr, nullptr),
                  std::invalid_argument);
}

TEST_CASE("gemv_cuda rope_store: Q out, K/V into their pages, both RoPE pairings") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(62);
  for (auto style : {kernels::RopeStyle::interleaved, kernels::RopeStyle::neox}) {
    for (DType t : {DType::bf16, DType::f32}) {
      const kernels::QkvShape shape{8, 2, 64, 64, style};
      const int64_t n_in = 512, n_out = shape.row();
      for (int32_t n_tokens : {1, 3}) {  // one token: the single-token kernels
        const kernels::KvLayout layout{2, 2, 64, 16, t};
        const int64_t n_blocks = 9;
        // Three sequences at positions 5, 16, 40; shuffled tables.
        std::vector<std::vector<int32_t>> tables = {{3}, {7, 1}, {0, 4, 8}};
        const std::vector<int32_t> positions = {5, 16, 40}, token_seq = {0, 1, 2};
        std::vector<kernels::PagedSequence> seqs;
        for (size_t s = 0; s < 3; ++s) seqs.push_back({tables[s], positions[s] + 1});
        const Stored w(test::random_floats(rng, static_cast<size_t>(n_in * n_out), 0.05f), t);
        const auto xf = test::random_floats(rng, static_cast<size_t>(n_tokens * n_in), 2.0f);
        const auto norm_w = test::random_floats(rng, static_cast<size_t>(n_in));
        const auto bias = test::random_floats(rng, static_cast<size_t>(n_out));
        const auto inv_freq = kernels::rope_inverse_frequencies(64, 500000.0f, {});
        // Host pool (NaN) and reference.
        const size_t elements = static_cast<size_t>(n_blocks * layout.block_elements());
        std::vector<float> pool_f(t == DType::f32 ? elements : 0, std::nanf(""));
        std::vector<uint16_t> pool_h(t == DType::f32 ? 0 : elements, 0xffff);
        kernels::PagedKvView host_kv{t == DType::f32 ? static_cast<void*>(pool_f.data()) : pool_h.data(), n_blocks, layout};
        kernels::GemvRopeRef rr{shape, bias.data(), inv_freq.data(), host_kv, seqs.data(), token_seq.data(),
                                positions.data(), 1};
        std::vector<float> q_f(static_cast<size_t>(n_tokens) * shape.q_dim());
        std::vector<uint16_t> q_h(q_f.size());
        kernels::gemv_ref(w.host(), t, n_in, n_out, {xf.data(), nullptr, norm_w.data(), 1e-5f}, n_tokens,
                          GemvEpilogue::rope_store, t == DType::f32 ? static_cast<void*>(q_f.data()) : q_h.data(), &rr);
        // Device.
        std::vector<int32_t> flat, offsets, lengths;
        for (size_t s = 0; s < 3; ++s) {
          offsets.push_back(static_cast<int32_t>(flat.size()));
          flat.insert(flat.end(), tables[s].begin(), tables[s].end());
          lengths.push_back(positions[s] + 1);
        }
        const auto d_flat = test::to_device(flat), d_offsets = test::to_device(offsets), d_lengths = test::to_device(lengths),
                   d_seq = test::to_device(token_seq), d_pos = test::to_device(positions), d_x = test::to_device(xf),
                   d_norm = test::to_device(norm_w), d_bias = test::to_device(bias), d_freq = test::to_device(inv_freq);
        kernels::DeviceBuffer pool(elements * kernels::dtype_bytes(t));
        kernels::check(cudaMemset(pool.get(), 0xff, pool.bytes()));
        kernels::GemvRope rope{shape, d_bias.as<float>(), d_freq.as<float>(), {pool.get(), n_blocks, layout},
                               {d_flat.as<int32_t>(), d_offsets.as<int32_t>(), d_lengths.as<int32_t>(),
                                d_seq.as<int32_t>(), d_pos.as<int32_t>(), 3, n_tokens},
                               1};
        kernels::DeviceBuffer q(q_f.size() * kernels::dtype_bytes(t));
        kernels::gemv_cuda(w.d.get(), t, n_in, n_out, {d_x.get(), nullptr, d_norm.as<float>(), 1e-5f}, n_tokens,
                           GemvEpilogue::rope_store, q.get(), &rope, nullptr);
        const std::string what = std::string(kernels::dtype_name(t)) +
                                 (style == kernels::RopeStyle::neox ? " neox" : " interleaved") +
                                 " tokens=" + std::to_string(n_tokens);
        test::check_close(test::compare(read(q, q_f.size(), t), t == DType::f32 ? q_f : from_half_bits(q_h, t)),
                          t == DType::f32 ? 1e-10 : 1e-5, "gemv rope_store q " + what);
        const auto got_pool = read(pool, elements, t);
        const auto ref_pool = t == DType::f32 ? pool_f : from_half_bits(pool_h, t);
        std::vector<float> g, r;
        size_t stray = 0;
        for (size_t i = 0; i < elements; ++i) {
          if (std::isnan(ref_pool[i])) {
            stray += !std::isnan(got_pool[i]);
          } else {
            g.push_back(got_pool[i]);
            r.push_back(ref_pool[i]);
          }
        }
        CHECK(stray == 0);
        CHECK(r.size() == static_cast<size_t>(n_tokens) * 2 * shape.kv_dim());
        test::check_close(test::compare(g, r), t == DType::f32 ? 1e-10 : 1e-5, "gemv rope_store kv " + what);
      }
    }
  }
}
