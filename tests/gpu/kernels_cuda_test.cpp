// The element-wise and row kernels against their CPU twins: RMSNorm, embedding gather, SwiGLU,
// the fused bias + RoPE + KV store, whole-block KV copies. Fresh random inputs at odd sizes;
// the reference gets the same (rounded) inputs; NaN wherever a kernel must not read.
#include <numeric>

#include "den/kernels/attention.h"
#include "den/kernels/embedding.h"
#include "den/kernels/kv_blocks.h"
#include "den/kernels/qkv_rope_store.h"
#include "den/kernels/rmsnorm.h"
#include "den/kernels/swiglu.h"
#include "gpu_support.h"

using namespace den;
using kernels::DType;

namespace {

// Device output of type `t` as floats.
std::vector<float> device_floats(const kernels::DeviceBuffer& b, size_t n, DType t) {
  if (t == DType::f32) return test::to_host<float>(b, n);
  const auto raw = test::to_host<uint16_t>(b, n);
  return t == DType::bf16 ? test::bf16_to_floats(raw) : test::fp16_to_floats(raw);
}

double bound_for(DType t) { return t == DType::f32 ? 1e-10 : 1e-5; }

}  // namespace

TEST_CASE("rmsnorm_cuda matches rmsnorm_ref, every output type, with a row list") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(31);
  for (DType t : {DType::f32, DType::bf16, DType::f16}) {
    for (int64_t n : {37, 576, 1002, 4096, 8192, 8196}) {
      const int64_t rows = 733;
      const auto x = test::random_floats(rng, static_cast<size_t>(rows * n), 2.0f);
      const auto w = test::random_floats(rng, static_cast<size_t>(n));
      std::vector<float> ref(x.size());
      kernels::rmsnorm_ref(x.data(), w.data(), ref.data(), rows, n, 1e-5f);
      const auto dx = test::to_device(x), dw = test::to_device(w);
      kernels::DeviceBuffer dy(x.size() * 4);
      kernels::check(cudaMemset(dy.get(), 0xff, dy.bytes()));  // NaN: every element must be written
      kernels::rmsnorm_cuda(dx.as<float>(), dw.as<float>(), dy.get(), t, nullptr, rows, n, 1e-5f, nullptr);
      test::check_close(test::compare(device_floats(dy, x.size(), t), ref), bound_for(t),
                        "rmsnorm " + std::string(kernels::dtype_name(t)) + " n=" + std::to_string(n));
    }
    // A row list picks rows (the rows whose logits a step wants), on both paths.
    for (int64_t n : {37, 2048}) {
      const auto x = test::random_floats(rng, static_cast<size_t>(10 * n));
      const auto w = test::random_floats(rng, static_cast<size_t>(n));
      const std::vector<int32_t> rows = {9, 2, 2, 5};
      std::vector<float> ref(rows.size() * static_cast<size_t>(n));
      for (size_t r = 0; r < rows.size(); ++r) {
        kernels::rmsnorm_ref(x.data() + rows[r] * n, w.data(), ref.data() + r * n, 1, n, 1e-5f);
      }
      const auto dx = test::to_device(x), dw = test::to_device(w), drows = test::to_device(rows);
      kernels::DeviceBuffer dy(ref.size() * 4);
      kernels::rmsnorm_cuda(dx.as<float>(), dw.as<float>(), dy.get(), t, drows.as<int32_t>(), 4, n, 1e-5f, nullptr);
      test::check_close(test::compare(device_floats(dy, ref.size(), t), ref), bound_for(t),
                        "rmsnorm row list n=" + std::to_string(n));
    }
  }
}

TEST_CASE("residual_rmsnorm_cuda adds a split product's parts and normalizes like its twin") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(36);
  for (DType t : {DType::f32, DType::bf16}) {
    // 37 and 1002 take the generic kernel, 4096 and 8192 the register one; 1 to 5 parts.
    for (auto [n, n_parts] : {std::pair<int64_t, int32_t>{37, 3}, {1002, 1}, {4096, 4}, {4096, 2}, {8192, 5}}) {
      for (bool normed : {true, false}) {
        const int64_t rows = 33;
        const auto x = test::random_floats(rng, static_cast<size_t>(rows * n), 2.0f);
        const auto parts = test::random_floats(rng, static_cast<size_t>(n_parts * rows * n), 2.0f);
        const auto w = test::random_floats(rng, static_cast<size_t>(n));
        auto ref_x = x;
        std::vector<float> ref_y(x.size());
        kernels::residual_rmsnorm_ref(parts.data(), n_parts, ref_x.data(), normed ? w.data() : nullptr, ref_y.data(),
                                      rows, n, 1e-5f);
        const auto dx = test::to_device(x), dparts = test::to_device(parts), dw = test::to_device(w);
        kernels::DeviceBuffer dy(x.size() * 4);
        kernels::check(cudaMemset(dy.get(), 0xff, dy.bytes()));  // NaN: every element must be written
        kernels::residual_rmsnorm_cuda(dparts.as<float>(), n_parts, const_cast<float*>(dx.as<float>()),
                                       normed ? dw.as<float>() : nullptr, dy.get(), t, rows, n, 1e-5f, nullptr);
        const std::string what = std::string(kernels::dtype_name(t)) + " n=" + std::to_string(n) +
                                 " parts=" + std::to_string(n_parts) + (normed ? "" : " (add only)");
        // The residual rows are the same sums in the same order: exact.
        const auto got_x = test::to_host<float>(dx, x.size());
        CHECK_MESSAGE(got_x == ref_x, what);
        if (normed) {
          test::check_close(test::compare(device_floats(dy, x.size(), t), ref_y), bound_for(t), "residual_rmsnorm " + what);
        } else {
          const auto untouched = test::to_host<uint32_t>(dy, x.size());
          CHECK_MESSAGE(std::all_of(untouched.begin(), untouched.end(), [](uint32_t v) { return v == 0xffffffffu; }),
                        what);
        }
      }
    }
  }
  CHECK_THROWS_AS(kernels::residual_rmsnorm_cuda(nullptr, 0, nullptr, nullptr, nullptr, DType::f32, 1, 4, 1e-5f, nullptr),
                  std::invalid_argument);
}

TEST_CASE("embedding_gather_cuda matches embedding_gather_ref") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(32);
  const int64_t vocab = 1002, dim = 37, n = 733;
  std::uniform_int_distribution<int32_t> pick(0, vocab - 1);
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = pick(rng);
  const auto table = test::random_floats(rng, static_cast<size_t>(vocab * dim));
  for (DType t : {DType::f32, DType::bf16, DType::f16}) {
    std::vector<uint16_t> half(table.size());
    for (size_t i = 0; i < table.size(); ++i) {
      half[i] = t == DType::bf16 ? kernels::f32_to_bf16(table[i]) : kernels::f32_to_fp16(table[i]);
    }
    const void* host = t == DType::f32 ? static_cast<const void*>(table.data()) : half.data();
    const kernels::TensorType tt = t == DType::f32   ? kernels::TensorType::f32
                                   : t == DType::bf16 ? kernels::TensorType::bf16
                                                      : kernels::TensorType::f16;
    std::vector<float> ref(static_cast<size_t>(n * dim));
    kernels::embedding_gather_ref({tt, host, dim, vocab}, ids.data(), n, ref.data());
    const kernels::DeviceBuffer dt =
        t == DType::f32 ? test::to_device(table) : test::to_device(half);
    const auto did = test::to_device(ids);
    kernels::DeviceBuffer out(ref.size() * 4);
    kernels::embedding_gather_cuda(dt.get(), t, did.as<int32_t>(), n, dim, out.as<float>(), nullptr);
    test::check_close(test::compare(test::to_host<float>(out, ref.size()), ref), 0.0,
                      "embedding " + std::string(kernels::dtype_name(t)));
  }
}

TEST_CASE("swiglu_cuda matches swiglu_ref over the fused gate/up layout") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(33);
  const int64_t n_tokens = 37;
  for (int64_t n_ff : {1002, 1024}) {  // the general kernel, and four outputs a thread
    const auto gate_up = test::random_floats(rng, static_cast<size_t>(n_tokens * 2 * n_ff), 3.0f);
    std::vector<float> ref(static_cast<size_t>(n_tokens * n_ff));
    for (int64_t t = 0; t < n_tokens; ++t) {
      kernels::swiglu_ref(gate_up.data() + t * 2 * n_ff, gate_up.data() + t * 2 * n_ff + n_ff, ref.data() + t * n_ff,
                          n_ff);
    }
    const auto d = test::to_device(gate_up);
    for (DType t : {DType::f32, DType::bf16}) {
      kernels::DeviceBuffer out(ref.size() * 4);
      kernels::swiglu_cuda(d.as<float>(), out.get(), t, n_tokens, n_ff, nullptr);
      test::check_close(test::compare(device_floats(out, ref.size(), t), ref), bound_for(t),
                        "swiglu " + std::string(kernels::dtype_name(t)) + " n_ff=" + std::to_string(n_ff));
    }
  }
}

namespace {

// A KV pool filled with NaN, a few sequences with shuffled block tables, and their batch.
struct PagedSetup {
  kernels::KvLayout layout;
  std::vector<std::vector<int32_t>> tables;
  std::vector<int32_t> lengths;  // KV length after the step
  std::vector<int32_t> starts;   // first new position
  int64_t n_blocks = 0;

  PagedSetup(kernels::KvLayout l, const std::vector<int32_t>& starts_, const std::vector<int32_t>& lengths_,
             std::mt19937& rng)
      : layout(l), lengths(lengths_), starts(starts_) {
    int64_t need = 0;
    for (int32_t len : lengths) need += (len + l.block_tokens - 1) / l.block_tokens;
    n_blocks = need + 7;
    std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    size_t next = 0;
    for (int32_t len : lengths) {
      std::vector<int32_t> t;
      for (int32_t b = 0; b < (len + l.block_tokens - 1) / l.block_tokens; ++b) t.push_back(ids[next++]);
      tables.push_back(t);
    }
  }
  size_t pool_elements() const { return static_cast<size_t>(n_blocks * layout.block_elements()); }
};

// Host arrays of a PagedBatch and their device copies.
struct DeviceBatch {
  std::vector<int32_t> tables, offsets, kv_lengths, token_seq, token_pos;
  kernels::DeviceBuffer d_tables, d_offsets, d_lengths, d_seq, d_pos;
  kernels::PagedBatch batch;

  explicit DeviceBatch(const PagedSetup& s) {
    for (size_t q = 0; q < s.tables.size(); ++q) {
      offsets.push_back(static_cast<int32_t>(tables.size()));
      tables.insert(tables.end(), s.tables[q].begin(), s.tables[q].end());
      kv_lengths.push_back(s.lengths[q]);
      for (int32_t p = s.starts[q]; p < s.lengths[q]; ++p) {
        token_seq.push_back(static_cast<int32_t>(q));
        token_pos.push_back(p);
      }
    }
    d_tables = test::to_device(tables);
    d_offsets = test::to_device(offsets);
    d_lengths = test::to_device(kv_lengths);
    d_seq = test::to_device(token_seq);
    d_pos = test::to_device(token_pos);
    batch = {d_tables.as<int32_t>(), d_offsets.as<int32_t>(), d_lengths.as<int32_t>(), d_seq.as<int32_t>(),
             d_pos.as<int32_t>(),    static_cast<int32_t>(offsets.size()), static_cast<int32_t>(token_seq.size())};
  }
};

}  // namespace

TEST_CASE("qkv_rope_store_cuda matches its CPU twin: Q, and K/V in the right pages, from a product in parts") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(34);
  for (auto [style, n_rot] : {std::pair{kernels::RopeStyle::interleaved, 64}, std::pair{kernels::RopeStyle::neox, 32}}) {
    const kernels::QkvShape shape{6, 2, 64, n_rot, style};
    const kernels::KvLayout layout{3, 2, 64, 16, DType::f32};
    PagedSetup setup(layout, {0, 30, 7}, {37, 31, 1002 / 16}, rng);
    DeviceBatch db(setup);
    const auto n_tokens = static_cast<int64_t>(db.token_seq.size());
    constexpr int32_t kParts = 3;
    const auto qkv_parts = test::random_floats(rng, static_cast<size_t>(kParts * n_tokens * shape.row()), 2.0f);
    std::vector<float> qkv(static_cast<size_t>(n_tokens * shape.row()));
    for (size_t i = 0; i < qkv.size(); ++i) qkv[i] = (qkv_parts[i] + qkv_parts[qkv.size() + i]) + qkv_parts[2 * qkv.size() + i];
    const auto bias = test::random_floats(rng, static_cast<size_t>(shape.row()));
    const auto inv_freq = kernels::rope_inverse_frequencies(n_rot, 10000.0f, {});
    for (DType t : {DType::f32, DType::bf16}) {
      kernels::KvLayout l = layout;
      l.dtype = t;
      // CPU: host pool of NaN.
      std::vector<float> host_pool(setup.pool_elements(), std::nanf(""));
      std::vector<uint16_t> host_pool16(setup.pool_elements(), 0x7fc0);
      kernels::PagedKvView host_kv{t == DType::f32 ? static_cast<void*>(host_pool.data()) : host_pool16.data(),
                                   setup.n_blocks, l};
      std::vector<kernels::PagedSequence> seqs;
      for (size_t q = 0; q < setup.tables.size(); ++q) seqs.push_back({setup.tables[q], setup.lengths[q]});
      auto ref_qkv = qkv;
      std::vector<float> ref_q(static_cast<size_t>(n_tokens * shape.q_dim()));
      kernels::qkv_rope_store_ref(ref_qkv.data(), bias.data(), shape, inv_freq.data(), host_kv, seqs.data(),
                                  db.token_seq.data(), db.token_pos.data(), n_tokens, 1, ref_q.data());
      // GPU: device pool of NaN.
      kernels::DeviceBuffer pool(setup.pool_elements() * kernels::dtype_bytes(t));
      kernels::check(cudaMemset(pool.get(), 0xff, pool.bytes()));
      // The product arrives in 3 parts (a split cuBLAS product) on the GPU; the host summed them in
      // the same order into the twin's input.
      const auto dqkv = test::to_device(qkv_parts), dbias = test::to_device(bias), dfreq = test::to_device(inv_freq);
      kernels::DeviceBuffer q_out(ref_q.size() * 4);
      kernels::qkv_rope_store_cuda(dqkv.as<float>(), dbias.as<float>(), shape, dfreq.as<float>(),
                                   {pool.get(), setup.n_blocks, l}, db.batch, 1, q_out.get(), t, nullptr, kParts);
      test::check_close(test::compare(device_floats(q_out, ref_q.size(), t), ref_q), bound_for(t),
                        "qkv_rope_store q " + std::string(kernels::dtype_name(t)));
      // Every K/V element written on the CPU is written alike on the GPU; untouched ones stay NaN.
      const auto got = device_floats(pool, setup.pool_elements(), t);
      std::vector<float> ref_pool = t == DType::f32 ? host_pool : test::bf16_to_floats(host_pool16);
      std::vector<float> written_got, written_ref;
      size_t nan_mismatch = 0;
      for (size_t i = 0; i < ref_pool.size(); ++i) {
        if (std::isnan(ref_pool[i])) {
          nan_mismatch += !std::isnan(got[i]);
        } else {
          written_ref.push_back(ref_pool[i]);
          written_got.push_back(got[i]);
        }
      }
      CHECK(nan_mismatch == 0);
      CHECK(written_ref.size() == static_cast<size_t>(n_tokens * 2 * shape.kv_dim()));
      test::check_close(test::compare(written_got, written_ref), bound_for(t),
                        "qkv_rope_store kv " + std::string(kernels::dtype_name(t)));
    }
  }
}

TEST_CASE("kv_copy_blocks_cuda gathers, scatters and copies whole blocks like the reference") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(35);
  const int64_t block_bytes = 16 * 37 * 16, n_blocks = 101;
  std::vector<uint8_t> pool(static_cast<size_t>(block_bytes * n_blocks));
  for (auto& b : pool) b = static_cast<uint8_t>(rng());
  std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(37);
  const auto dpool = test::to_device(pool), dids = test::to_device(ids);
  // Gather into staging.
  std::vector<uint8_t> ref_staging(ids.size() * block_bytes);
  kernels::kv_copy_blocks_ref(pool.data(), ref_staging.data(), ids.data(), nullptr, 37, block_bytes);
  kernels::DeviceBuffer staging(ref_staging.size());
  kernels::kv_copy_blocks_cuda(dpool.get(), staging.get(), dids.as<int32_t>(), nullptr, 37, block_bytes, nullptr);
  CHECK(test::to_host<uint8_t>(staging, ref_staging.size()) == ref_staging);
  // Scatter back into a zeroed pool.
  kernels::DeviceBuffer target(pool.size());
  kernels::check(cudaMemset(target.get(), 0, pool.size()));
  std::vector<uint8_t> ref_target(pool.size(), 0);
  kernels::kv_copy_blocks_ref(ref_staging.data(), ref_target.data(), nullptr, ids.data(), 37, block_bytes);
  kernels::kv_copy_blocks_cuda(staging.get(), target.get(), nullptr, dids.as<int32_t>(), 37, block_bytes, nullptr);
  CHECK(test::to_host<uint8_t>(target, pool.size()) == ref_target);
}

TEST_CASE("kv_copy_block_slices_cuda copies one slice of each block like the reference") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(36);
  const int64_t block_bytes = 16 * 53 * 8, n_blocks = 64, offset = 16 * 53 * 3, slice = 16 * 53 * 2;
  std::vector<uint8_t> pool(static_cast<size_t>(block_bytes * n_blocks));
  for (auto& b : pool) b = static_cast<uint8_t>(rng());
  std::vector<int32_t> from(29), to(29);
  std::vector<int32_t> order(static_cast<size_t>(n_blocks));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::copy_n(order.begin(), 29, from.begin());
  std::shuffle(order.begin(), order.end(), rng);
  std::copy_n(order.begin(), 29, to.begin());
  std::vector<uint8_t> ref_target(pool.size(), 0x5a);
  kernels::kv_copy_block_slices_ref(pool.data(), ref_target.data(), from.data(), to.data(), 29, block_bytes, offset, slice);
  const auto dpool = test::to_device(pool), dfrom = test::to_device(from), dto = test::to_device(to);
  kernels::DeviceBuffer target(pool.size());
  kernels::check(cudaMemset(target.get(), 0x5a, pool.size()));
  kernels::kv_copy_block_slices_cuda(dpool.get(), target.get(), dfrom.as<int32_t>(), dto.as<int32_t>(), 29, block_bytes,
                                     offset, slice, nullptr);
  CHECK(test::to_host<uint8_t>(target, pool.size()) == ref_target);
}
