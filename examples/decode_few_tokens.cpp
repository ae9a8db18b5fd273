// Decodes a few tokens with the engine directly: load a GGUF, give the CPU backend a block
// pool and a block table, run one prefill step and a few decode steps, greedy.
//   ./build/decode_few_tokens ../shared/models/stories260K/stories260K.gguf "Once upon a time"
#include <cstdio>
#include <string>

#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/engine/sampler.h"
#include "den/memory/block_pool.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL.gguf [PROMPT]\n", argv[0]);
    return 2;
  }
  try {
    const auto model = den::engine::Model::load(argv[1]);
    const auto& tokenizer = model->tokenizer();
    const auto backend = den::engine::make_cpu_backend(*model, 0);

    // A pool of 64 blocks of 16 tokens, and the blocks of our one sequence.
    den::memory::BlockPool pool(model->kv_layout(16, backend->kv_dtype()), 64, den::memory::Placement::host, true);
    den::memory::SequenceBlocks blocks(pool);

    std::vector<int32_t> tokens = tokenizer.encode(argc > 2 ? argv[2] : "", tokenizer.add_bos_by_default(), false);
    if (tokens.empty() && tokenizer.bos()) tokens.push_back(*tokenizer.bos());
    den::engine::StepOutput out;
    int32_t position = 0;
    den::engine::TokenStreamDecoder decoder(tokenizer, tokens.back());
    for (int step = 0; step < 16; ++step) {
      blocks.reserve(position + static_cast<int64_t>(tokens.size()));
      den::engine::SequenceInput input{tokens, position, blocks.table(), den::engine::LogitsWanted::last};
      backend->forward({&input, 1}, pool.view(), out);
      position += static_cast<int32_t>(tokens.size());
      const int32_t next = den::engine::argmax(out.row(0));
      std::fputs(decoder.push(next).c_str(), stdout);
      tokens.assign(1, next);
    }
    std::printf("%s\n", decoder.flush().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
