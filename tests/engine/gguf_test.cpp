// GGUF reader: a real file read right, and each kind of damage reported with a clear message.
#include <cstring>

#include "den/engine/gguf.h"
#include "den/engine/gguf_writer.h"
#include "test_support.h"

using namespace den;
using engine::GgufError;
using engine::GgufFile;

TEST_CASE("stories260K.gguf: header, metadata and tensors") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  const GgufFile f(test::stories_model());
  CHECK(f.version() == 3);
  CHECK(f.tensors().size() == 48);
  CHECK(f.metadata().size() == 19);
  CHECK(f.alignment() == 32);
  CHECK(f.get_string("general.architecture") == "llama");
  CHECK(f.get_int("llama.embedding_length") == 64);
  CHECK(f.get_int("llama.block_count") == 5);
  CHECK(f.get_float("llama.attention.layer_norm_rms_epsilon") == doctest::Approx(1e-5));
  CHECK(f.get_string_array("tokenizer.ggml.tokens").size() == 512);
  const engine::GgufTensor* q = f.find_tensor("blk.0.attn_q.weight");
  REQUIRE(q != nullptr);
  CHECK(q->type == kernels::TensorType::f32);
  CHECK(q->dims == std::vector<int64_t>{64, 64});
  const engine::GgufTensor* gate = f.find_tensor("blk.0.ffn_gate.weight");
  REQUIRE(gate != nullptr);
  CHECK(gate->dims == std::vector<int64_t>{64, 172});
  CHECK(f.find_tensor("no.such.tensor") == nullptr);
  CHECK_THROWS_WITH_AS(f.get_string("llama.block_count"), doctest::Contains("should be a string, found uint32"),
                       GgufError);
  CHECK_THROWS_WITH_AS(f.get_int("llama.missing"), doctest::Contains("'llama.missing' is missing"), GgufError);
}

namespace {

// A small valid file written by GgufWriter: two tensors, a few keys.
std::string write_small(const test::TempDir& dir) {
  engine::GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_u32("test.count", 7);
  w.add_tensor("alpha", kernels::TensorType::f32, {32, 2});
  w.add_tensor("beta", kernels::TensorType::f16, {64});
  const std::string path = dir.file("small.gguf");
  w.write(path, [](size_t, int64_t, std::span<uint8_t> bytes) { std::memset(bytes.data(), 0x3c, bytes.size()); });
  return path;
}

std::string expect_error(const std::string& path) {
  try {
    GgufFile f(path);
  } catch (const GgufError& e) {
    return e.what();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  FAIL("no error for " << path);
  return {};
}

}  // namespace

TEST_CASE("GgufWriter output reads back") {
  test::TempDir dir;
  const GgufFile f(write_small(dir));
  CHECK(f.get_int("test.count") == 7);
  REQUIRE(f.tensors().size() == 2);
  CHECK(f.tensors()[1].name == "beta");
  CHECK(f.tensors()[1].n_bytes == 128);
  CHECK(f.tensors()[1].data[0] == 0x3c);
}

TEST_CASE("damaged files give errors that say what is wrong") {
  test::TempDir dir;
  const std::string good = test::read_file(write_small(dir));
  const std::string path = dir.file("bad.gguf");
  auto with = [&](const std::string& bytes) {
    test::write_file(path, bytes);
    return expect_error(path);
  };

  std::string bytes = good;
  bytes[0] = 'X';
  CHECK(with(bytes).find("not a GGUF file") != std::string::npos);

  bytes = good;
  bytes[4] = 1;
  CHECK(with(bytes).find("GGUF version 1 is not supported (supported: 2, 3)") != std::string::npos);

  CHECK(with(good.substr(0, 30)).find("truncated") != std::string::npos);
  CHECK(with(good.substr(0, good.size() - 100)).find("tensor 'beta'") != std::string::npos);
  CHECK(with(good.substr(0, good.size() - 100)).find("extends past the end") != std::string::npos);
  CHECK(with("").find("truncated while reading magic") != std::string::npos);
  CHECK(with("").find("bad.gguf") != std::string::npos);

  // The tensor type of "beta" -> 13 (Q5_K): named, with the supported list.
  bytes = good;
  const size_t name_at = bytes.find("beta");
  const size_t type_at = name_at + 4 + 4 + 8;  // name, n_dims, one dim
  const uint32_t q5_k = 13;
  std::memcpy(&bytes[type_at], &q5_k, 4);
  const std::string message = with(bytes);
  CHECK(message.find("tensor 'beta' has type id 13") != std::string::npos);
  CHECK(message.find("F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q6_K") != std::string::npos);

  // A metadata count no file could hold.
  bytes = good;
  const uint64_t huge = uint64_t{1} << 60;
  std::memcpy(&bytes[16], &huge, 8);
  CHECK(with(bytes).find("metadata count") != std::string::npos);

  CHECK_THROWS_WITH(GgufFile(dir.file("missing.gguf")), doctest::Contains("cannot open"));
}
