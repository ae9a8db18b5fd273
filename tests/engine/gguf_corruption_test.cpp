// Damage a real model file thousands of ways; every outcome must be a clean error or a model
// that runs (producing whatever numbers), never a crash or an out-of-bounds read. Run under
// ASan/UBSan (-DDEN_SANITIZE=ON) to make the second half of that claim checkable.
#include <cstring>

#include "den/engine/backend.h"
#include "den/engine/gguf.h"
#include "den/engine/model.h"
#include "den/memory/block_pool.h"
#include "test_support.h"

using namespace den;

namespace {

enum class Outcome { rejected, loaded };

Outcome try_load_and_run(const std::string& path) {
  std::unique_ptr<engine::Model> model;
  try {
    model = engine::Model::load(path);
  } catch (const std::runtime_error&) {
    return Outcome::rejected;  // GgufError derives from runtime_error
  }
  // A model that loads must run a step without crashing.
  const auto backend = engine::make_cpu_backend(*model, 1);
  memory::BlockPool pool(model->kv_layout(16, kernels::DType::f32), 2, memory::Placement::host, false);
  memory::SequenceBlocks blocks(pool);
  REQUIRE(blocks.reserve(3));
  const int32_t tokens[3] = {1, 2, std::min(3, model->config().n_vocab - 1)};
  engine::SequenceInput in{tokens, 0, blocks.table(), engine::LogitsWanted::last};
  engine::StepOutput out;
  backend->forward({&in, 1}, pool.view(), out);
  CHECK(out.logits.size() == static_cast<size_t>(model->config().n_vocab));
  return Outcome::loaded;
}

}  // namespace

TEST_CASE("corrupted and truncated GGUF files never crash the loader") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  const std::string original = test::read_file(test::stories_model());
  const engine::GgufFile parsed(test::stories_model());
  const size_t header = parsed.header_bytes();
  test::TempDir dir;
  const std::string path = dir.file("damaged.gguf");
  std::mt19937 rng(11);
  int rejected = 0, loaded = 0;
  auto attempt = [&](const std::string& bytes) {
    test::write_file(path, bytes);
    (try_load_and_run(path) == Outcome::rejected ? rejected : loaded)++;
  };

  SUBCASE("truncation anywhere") {
    for (size_t cut = 0; cut < header; cut += std::max<size_t>(1, header / 400)) attempt(original.substr(0, cut));
    for (int i = 0; i < 40; ++i) attempt(original.substr(0, header + rng() % (original.size() - header)));
    CHECK(loaded == 0);  // the last tensor ends at the end of the file: every cut loses data
  }
  SUBCASE("bit flips in the header, metadata and tensor table") {
    for (int i = 0; i < 1500; ++i) {
      std::string bytes = original;
      bytes[rng() % header] ^= static_cast<char>(1 << (rng() % 8));
      attempt(bytes);
    }
    CHECK(rejected > 0);
  }
  SUBCASE("whole fields overwritten with extreme values") {
    for (int i = 0; i < 600; ++i) {
      std::string bytes = original;
      const size_t at = rng() % (header - 8);
      const uint64_t values[] = {0, ~uint64_t{0}, uint64_t{1} << 63, 0x7fffffff, 0xffffffff};
      std::memcpy(&bytes[at], &values[rng() % 5], 8);
      attempt(bytes);
    }
    CHECK(rejected > 0);
  }
  SUBCASE("garbage in the tensor data still loads and runs") {
    for (int i = 0; i < 20; ++i) {
      std::string bytes = original;
      for (int k = 0; k < 64; ++k) bytes[header + rng() % (bytes.size() - header)] = static_cast<char>(rng());
      attempt(bytes);
    }
    CHECK(loaded == 20);
  }
  MESSAGE("rejected " << rejected << ", loaded " << loaded);
}
