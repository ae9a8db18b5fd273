// The session memory manager with its fast pool in device memory and the CUDA backend reading
// it: a stories260K session hibernated to DRAM, then checkpointed to SSD and woken, holds
// bit-identical KV, and its next-token logits equal an uninterrupted run's bit for bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/memory/session_manager.h"
#include "gpu_support.h"

using namespace den;
using memory::SessionManager;

namespace {

memory::MemoryConfig device_config(const engine::Model& model, const std::filesystem::path& state) {
  memory::MemoryConfig c;
  c.layout = model.kv_layout(16, kernels::DType::f32);
  c.model_fingerprint = model.fingerprint();
  c.fast_blocks = 64;
  c.fast_placement = memory::Placement::device;
  c.dram_blocks = 64;
  c.state_dir = state;
  c.cost_model = false;
  return c;
}

// Feeds what the KV lacks; returns the last row of logits and appends its argmax.
std::vector<float> step(SessionManager& m, engine::Backend& backend, memory::SessionId id, bool layerwise = false) {
  const std::vector<int32_t> tokens = m.tokens(id);
  auto lease = m.lease(id, static_cast<int32_t>(tokens.size()), layerwise);
  REQUIRE(lease.has_value());
  const int32_t kv = lease->kv_tokens();
  engine::SequenceInput in{std::span(tokens).subspan(static_cast<size_t>(kv)), kv, lease->block_table(),
                           engine::LogitsWanted::last};
  engine::StepOutput out;
  if (layerwise) CHECK(lease->arrival() != nullptr);
  backend.forward({&in, 1}, m.fast_view(), out, lease->arrival());
  lease->computed(static_cast<int32_t>(tokens.size()));
  std::vector<float> row(out.row(0).begin(), out.row(0).end());
  const auto next = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
  m.append(id, std::span(&next, 1));
  return row;
}

// The session's KV copied to the host in token order.
std::vector<char> kv_image(SessionManager& m, memory::SessionId id) {
  auto lease = m.lease(id, static_cast<int32_t>(m.tokens(id).size()));
  REQUIRE(lease.has_value());
  const auto block_bytes = static_cast<size_t>(m.config().layout.block_bytes());
  const size_t blocks = (static_cast<size_t>(lease->kv_tokens()) + 15) / 16;
  std::vector<char> image(blocks * block_bytes);
  for (size_t b = 0; b < blocks; ++b) {
    const char* src = static_cast<const char*>(m.fast_view().blocks) + lease->block_table()[b] * block_bytes;
    REQUIRE(cudaMemcpy(image.data() + b * block_bytes, src, block_bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
  }
  return image;
}

}  // namespace

TEST_CASE("session manager on the GPU: DRAM, SSD and layer-wise round trips keep KV and logits bit-identical") {
  DEN_SKIP_WITHOUT_GPU();
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "stories260K is absent");
  const auto model = engine::Model::load(test::stories_model());
  const auto backend = engine::make_cuda_backend(*model, 0);
  const std::vector<int32_t> prompt = {1, 403, 407, 261, 378, 49, 395, 280, 263, 325, 24};

  std::vector<std::vector<float>> reference;
  {
    SessionManager m(device_config(*model, {}));
    const auto id = m.create();
    m.append(id, prompt);
    for (int i = 0; i < 40; ++i) reference.push_back(step(m, *backend, id));
  }

  test::TempDir dir;
  SessionManager m(device_config(*model, dir.path()));
  const auto id = m.create();
  m.append(id, prompt);
  for (int i = 0; i < 10; ++i) CHECK(step(m, *backend, id) == reference[static_cast<size_t>(i)]);
  const std::vector<char> before = kv_image(m, id);

  m.hibernate(id, memory::Tier::dram)->wait_or_throw();
  CHECK(m.info(id).fast_blocks == 0);
  CHECK(kv_image(m, id) == before);
  for (int i = 10; i < 20; ++i) CHECK(step(m, *backend, id) == reference[static_cast<size_t>(i)]);

  const std::vector<char> middle = kv_image(m, id);
  m.hibernate(id, memory::Tier::ssd)->wait_or_throw();
  CHECK(m.info(id).tier == memory::Tier::ssd);
  CHECK(kv_image(m, id) == middle);
  for (int i = 20; i < 30; ++i) CHECK(step(m, *backend, id) == reference[static_cast<size_t>(i)]);

  // Layer-wise wakes: each step starts while its KV is still arriving, layer by layer.
  for (int i = 30; i < 40; ++i) {
    m.hibernate(id, memory::Tier::dram)->wait_or_throw();
    CHECK(step(m, *backend, id, true) == reference[static_cast<size_t>(i)]);
  }
  const auto st = m.stats();
  CHECK(st.tokens_recomputed == 0);
  CHECK(st.bytes_ssd_read > 0);
  CHECK(st.bytes_dram_to_fast > 0);
}
