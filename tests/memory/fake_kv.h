// A fake engine for the memory tests: writes KV whose every value encodes (token, position,
// layer, K/V, element), so a block in the wrong place, stale or half-copied reads back wrong.
// f32 layouts only. Used by the session manager and durability tests.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "den/memory/session_manager.h"

namespace den::test {

inline float fake_kv_value(int32_t token, int32_t position, int32_t layer, int kv, int64_t element) {
  return static_cast<float>(token) * 1000.0f + static_cast<float>(position) + static_cast<float>(layer) * 0.25f +
         static_cast<float>(kv) * 0.125f + static_cast<float>(element) * 1e-3f;
}

// Calls fn(position, layer, kv, slab) for each token slab of positions [first, last) of a lease.
template <typename Fn>
void for_each_kv_slab(memory::SessionManager& m, const memory::Lease& lease, int32_t first, int32_t last, Fn&& fn) {
  const kernels::PagedKvView view = m.fast_view();
  const kernels::KvLayout& layout = m.config().layout;
  auto* base = static_cast<float*>(view.blocks);
  for (int32_t p = first; p < last; ++p) {
    const int32_t block = lease.block_table()[static_cast<size_t>(p / layout.block_tokens)];
    for (int32_t layer = 0; layer < layout.n_layers; ++layer) {
      for (int kv = 0; kv < 2; ++kv) fn(p, layer, kv, base + view.offset(block, layer, kv, p % layout.block_tokens));
    }
  }
}

// Writes the KV of tokens [lease.kv_tokens(), history) and reports it computed.
inline void fake_compute(memory::SessionManager& m, memory::Lease& lease) {
  const std::vector<int32_t> tokens = m.tokens(lease.session());
  const int64_t n = m.config().layout.token_elements();
  for_each_kv_slab(m, lease, lease.kv_tokens(), static_cast<int32_t>(tokens.size()),
                   [&](int32_t p, int32_t layer, int kv, float* slab) {
                     for (int64_t e = 0; e < n; ++e) slab[e] = fake_kv_value(tokens[static_cast<size_t>(p)], p, layer, kv, e);
                   });
  lease.computed(static_cast<int32_t>(tokens.size()));
}

// Every KV value of the session's first kv_tokens tokens is what fake_compute wrote.
// Leases the whole history, computes the KV it lacks and returns how many tokens that was.
inline int32_t fake_compute_missing(memory::SessionManager& m, memory::SessionId id) {
  const auto n = static_cast<int32_t>(m.tokens(id).size());
  auto lease = m.lease(id, n);
  REQUIRE(lease.has_value());
  const int32_t missing = n - lease->kv_tokens();
  fake_compute(m, *lease);
  return missing;
}

inline bool fake_kv_is_exact(memory::SessionManager& m, memory::SessionId id) {
  const std::vector<int32_t> tokens = m.tokens(id);
  auto lease = m.lease(id, static_cast<int32_t>(tokens.size()));
  REQUIRE(lease.has_value());
  const int64_t n = m.config().layout.token_elements();
  bool exact = true;
  for_each_kv_slab(m, *lease, 0, lease->kv_tokens(), [&](int32_t p, int32_t layer, int kv, const float* slab) {
    for (int64_t e = 0; e < n && exact; ++e) {
      if (slab[e] != fake_kv_value(tokens[static_cast<size_t>(p)], p, layer, kv, e)) {
        MESSAGE("session " << id << " token " << p << " layer " << layer << " kv " << kv << ": " << slab[e]);
        exact = false;
      }
    }
  });
  return exact;
}

// The session's KV in token order, whatever blocks hold it (an image to compare across tiers).
inline std::vector<float> kv_image(memory::SessionManager& m, memory::SessionId id) {
  auto lease = m.lease(id, static_cast<int32_t>(m.tokens(id).size()));
  REQUIRE(lease.has_value());
  const int64_t n = m.config().layout.token_elements();
  std::vector<float> image;
  for_each_kv_slab(m, *lease, 0, lease->kv_tokens(),
                   [&](int32_t, int32_t, int, const float* slab) { image.insert(image.end(), slab, slab + n); });
  return image;
}

}  // namespace den::test
