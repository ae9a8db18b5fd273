// Writes the binary seed corpora of the fuzz targets with the project's own writers, so that
// the seeds are real files: tiny GGUF files (GgufWriter, plus one encoded by hand for what the
// writer never emits: GGUF v2, every scalar type, nested arrays, another alignment) and KV
// segments (write_segment). Deterministic; run it again after a format change:
//   build-fuzz/tests/fuzz/fuzz_seed_writer tests/fuzz/corpus
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "den/engine/gguf_writer.h"
#include "den/memory/segment_file.h"

namespace {

namespace fs = std::filesystem;
using den::engine::GgufType;
using den::engine::GgufWriter;
using den::kernels::TensorType;

// Tensor bytes: a fixed pattern, so the files are identical on every run.
void fill_pattern(size_t tensor, int64_t first_row, std::span<uint8_t> bytes) {
  for (size_t k = 0; k < bytes.size(); ++k) bytes[k] = static_cast<uint8_t>(tensor * 31 + first_row * 7 + k);
}

void write_gguf_seeds(const fs::path& dir) {
  {
    GgufWriter w;  // no keys but the alignment, no tensors
    w.write((dir / "empty.gguf").string(), fill_pattern);
  }
  {
    GgufWriter w;  // a model-shaped header with one tensor of every supported type
    w.set_string("general.architecture", "llama");
    w.set_u32("llama.block_count", 1);
    w.set_i32("llama.context_length", -1);
    w.set_f32("llama.rope.freq_base", 10000.0f);
    w.set_bool("general.quantized", true);
    w.add_tensor("f32", TensorType::f32, {8, 2});
    w.add_tensor("f16", TensorType::f16, {4});
    w.add_tensor("bf16", TensorType::bf16, {2, 1, 1, 3});
    w.add_tensor("q4_0", TensorType::q4_0, {32});
    w.add_tensor("q4_1", TensorType::q4_1, {32});
    w.add_tensor("q8_0", TensorType::q8_0, {32, 2});
    w.add_tensor("q4_k", TensorType::q4_k, {256});
    w.add_tensor("q6_k", TensorType::q6_k, {256});
    w.write((dir / "tensors.gguf").string(), fill_pattern);
  }
  {
    GgufWriter w;  // a vocabulary-only file, as the tokenizer reads it
    w.set_string("tokenizer.ggml.model", "gpt2");
    w.set_string_array("tokenizer.ggml.tokens", {"<s>", "</s>", "a", "b", "ab", "\xc4\xa0"});
    w.set_f32_array("tokenizer.ggml.scores", {0.0f, -1.0f, -2.5f, 3.0f, 1e30f, -0.0f});
    w.set_i32_array("tokenizer.ggml.token_type", {3, 3, 1, 1, 1, 6});
    w.set_string_array("tokenizer.ggml.merges", {"a b"});
    w.set_u32("tokenizer.ggml.bos_token_id", 0);
    w.write((dir / "vocabulary.gguf").string(), fill_pattern);
  }

  // By hand: version 2, alignment 64 (a u64 key), every scalar type, a nested array.
  std::vector<uint8_t> b;
  auto put = [&](const auto& value) {
    const size_t at = b.size();
    b.resize(at + sizeof value);
    std::memcpy(b.data() + at, &value, sizeof value);
  };
  auto put_string = [&](std::string_view s) {
    put(uint64_t{s.size()});
    b.insert(b.end(), s.begin(), s.end());
  };
  auto key = [&](std::string_view name, GgufType type) {
    put_string(name);
    put(static_cast<uint32_t>(type));
  };
  put(uint32_t{0x46554747});
  put(uint32_t{2});
  put(uint64_t{1});   // tensors
  put(uint64_t{14});  // keys
  key("general.alignment", GgufType::u64), put(uint64_t{64});
  key("u8", GgufType::u8), put(uint8_t{200});
  key("i8", GgufType::i8), put(int8_t{-100});
  key("u16", GgufType::u16), put(uint16_t{60000});
  key("i16", GgufType::i16), put(int16_t{-30000});
  key("u32", GgufType::u32), put(uint32_t{4000000000u});
  key("i32", GgufType::i32), put(int32_t{-2000000000});
  key("u64", GgufType::u64), put(uint64_t{18000000000000000000u});
  key("i64", GgufType::i64), put(int64_t{-9000000000000000000});
  key("f64", GgufType::f64), put(2.5);
  key("bool", GgufType::boolean), put(uint8_t{0});
  key("string", GgufType::string), put_string("h\xc3\xa9llo");
  key("u16s", GgufType::array), put(static_cast<uint32_t>(GgufType::u16)), put(uint64_t{3});
  put(uint16_t{1}), put(uint16_t{2}), put(uint16_t{65535});
  key("nested", GgufType::array), put(static_cast<uint32_t>(GgufType::array)), put(uint64_t{2});
  for (int k = 0; k < 2; ++k) put(static_cast<uint32_t>(GgufType::i8)), put(uint64_t{1}), put(int8_t{-1});
  put_string("t");
  put(uint32_t{1}), put(uint64_t{16}), put(uint32_t{0}), put(uint64_t{0});  // f32 [16] at 0
  b.resize((b.size() + 63) / 64 * 64, 0);
  for (int k = 0; k < 64; ++k) b.push_back(static_cast<uint8_t>(k));
  std::ofstream((dir / "v2_all_types.gguf"), std::ios::binary).write(reinterpret_cast<const char*>(b.data()),
                                                                       static_cast<std::streamsize>(b.size()));
}

void write_segment_seed(const fs::path& path, den::kernels::KvLayout layout, const std::vector<int32_t>& tokens) {
  fs::remove(path);
  std::vector<std::vector<uint8_t>> blocks;
  std::vector<den::memory::SegmentBlockSource> sources;
  for (size_t i = 0; i < tokens.size(); ++i) {
    blocks.emplace_back(static_cast<size_t>(layout.block_bytes()));
    for (size_t k = 0; k < blocks.back().size(); ++k) blocks.back()[k] = static_cast<uint8_t>(i * 13 + k);
  }
  for (size_t i = 0; i < tokens.size(); ++i) sources.push_back({0x1000 + i, tokens[i], blocks[i].data()});
  den::memory::SegmentHeader header;
  header.model_fingerprint = 0xfeedface;
  header.session_id = 7;
  header.generation = 3;
  header.layout = layout;
  den::memory::write_segment(path, header, sources);
  // write_segment makes segments private (0600); seeds are ordinary files.
  fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read);
}

void write_segment_seeds(const fs::path& dir) {
  using den::kernels::DType;
  // 128-byte blocks: one page of stride each, mostly padding.
  const den::kernels::KvLayout small{1, 1, 8, 4, DType::f16};
  // Exactly one page per block: stride == block_bytes, so reads go straight to the destination.
  const den::kernels::KvLayout page{1, 1, 64, 16, DType::f16};
  write_segment_seed(dir / "no_blocks.seg", small, {});
  write_segment_seed(dir / "two_blocks.seg", small, {4, 2});
  write_segment_seed(dir / "page_blocks.seg", page, {16, 16});
  write_segment_seed(dir / "f32_block.seg", {2, 1, 4, 2, DType::f32}, {1});
  write_segment_seed(dir / "bf16_block.seg", {1, 2, 4, 4, DType::bf16}, {0});
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus directory>\n", argv[0]);
    return 2;
  }
  const fs::path corpus = argv[1];
  fs::create_directories(corpus / "gguf_reader");
  fs::create_directories(corpus / "segment_reader");
  write_gguf_seeds(corpus / "gguf_reader");
  write_segment_seeds(corpus / "segment_reader");
  std::printf("wrote the GGUF and segment seeds under %s\n", corpus.c_str());
  return 0;
}
