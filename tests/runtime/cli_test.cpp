// The `den` command line, run as a user would: exact stdout contracts, exit codes, errors.
#include "test_support.h"

using den::test::run_den;

TEST_CASE("den --version and --help") {
  const auto v = run_den({"--version"});
  CHECK(v.exit_code == 0);
  CHECK(v.out.find("den ") == 0);
  const auto h = run_den({"--help"});
  CHECK(h.exit_code == 0);
  for (const char* cmd : {"generate", "chat", "tokenize", "model", "bench"}) CHECK(h.out.find(cmd) != std::string::npos);
}

TEST_CASE("den generate reproduces llama2.c's stories260K output exactly") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::stories_model()), "../shared/models/stories260K is absent");
  const auto oracle = den::test::stories_oracle();
  const auto text = run_den({"generate", "--local", "-m", den::test::stories_model(), "-n", "64", "--temp", "0"});
  CHECK(text.exit_code == 0);
  CHECK(text.out == oracle.stdout_text);
  CHECK(text.err.find("tok/s") != std::string::npos);  // timings on stderr, not stdout

  const auto ids = run_den({"generate", "--local", "-m", den::test::stories_model(), "-n", "64", "--temp", "0", "--ids"});
  std::string expected;
  for (int32_t id : oracle.ids) expected += (expected.empty() ? "" : " ") + std::to_string(id);
  CHECK(ids.out == expected + "\n");
}

TEST_CASE("den generate with a prompt prints only the continuation") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::stories_model()), "../shared/models/stories260K is absent");
  const auto oracle = den::test::stories_oracle();
  // The oracle's story starts "Once upon a time"; greedy continuation must follow it.
  const auto r = run_den({"generate", "--local", "-m", den::test::stories_model(), "-p", "Once upon a time", "-n", "20", "--temp", "0"});
  CHECK(r.exit_code == 0);
  const std::string rest = oracle.stdout_text.substr(std::string("Once upon a time").size());
  REQUIRE(r.out.size() > 10);
  CHECK(rest.compare(0, r.out.size() - 1, r.out, 0, r.out.size() - 1) == 0);
  CHECK(r.out.back() == '\n');
}

TEST_CASE("den tokenize is byte-exact on stdin") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::shared_path("tokenizers")), "../shared/tokenizers is absent");
  const std::string vocab = den::test::shared_path("tokenizers/ggml-vocab-gpt-2.gguf");
  CHECK(run_den({"tokenize", "-m", vocab}, "Hello world").out == "15496 995\n");
  CHECK(run_den({"tokenize", "-m", vocab}, " Hello world\n").out == "18435 995 198\n");
  CHECK(run_den({"tokenize", "-m", vocab}, "").out == "\n");
  CHECK(run_den({"tokenize", "-m", vocab, "--parse-special"}, "<|endoftext|>").out == "50256\n");
  CHECK(run_den({"tokenize", "-m", vocab}, "<|endoftext|>").out != "50256\n");
  const std::string spm = den::test::shared_path("tokenizers/ggml-vocab-llama-spm.gguf");
  CHECK(run_den({"tokenize", "-m", spm, "--bos"}, "Hello").out == "1 15043\n");
}

TEST_CASE("bad input: clear errors, non-zero exit, nothing on stdout") {
  const auto missing = run_den({"generate", "--local", "-m", "/nonexistent/model.gguf"});
  CHECK(missing.exit_code == 1);
  CHECK(missing.out.empty());
  CHECK(missing.err.find("den: error: cannot open '/nonexistent/model.gguf'") != std::string::npos);

  den::test::TempDir dir;
  den::test::write_file(dir.file("junk.gguf"), "this is not a model");
  const auto junk = run_den({"model", "info", dir.file("junk.gguf")});
  CHECK(junk.exit_code == 1);
  CHECK(junk.err.find("not a GGUF file") != std::string::npos);

  const auto usage = run_den({"generate", "--temp"});
  CHECK(usage.exit_code != 0);
  const auto bad_value = run_den({"generate", "--local", "-m", den::test::stories_model(), "--top-p", "0"});
  CHECK(bad_value.exit_code == 1);
  CHECK(bad_value.err.find("top_p") != std::string::npos);
}

TEST_CASE("den model new writes a runnable random model") {
  den::test::TempDir dir;
  const std::string path = dir.file("tiny.gguf");
  const auto made = run_den({"model", "new", "--shape", "tiny", "--dtype", "f16", "--seed", "3", "-o", path});
  REQUIRE(made.exit_code == 0);
  const auto info = run_den({"model", "info", path});
  CHECK(info.exit_code == 0);
  CHECK(info.out.find("2 layers, embedding 64") != std::string::npos);
  const auto gen = run_den({"generate", "--local", "-m", path, "-n", "8", "--temp", "0", "--ids"});
  CHECK(gen.exit_code == 0);
  // The same seed writes the same file.
  REQUIRE(run_den({"model", "new", "--shape", "tiny", "--dtype", "f16", "--seed", "3", "-o", dir.file("again.gguf")})
              .exit_code == 0);
  CHECK(den::test::read_file(path) == den::test::read_file(dir.file("again.gguf")));
  const auto bad = run_den({"model", "new", "--shape", "gpt-5", "-o", path});
  CHECK(bad.exit_code != 0);
}

TEST_CASE("den model new --vocab copies a real tokenizer, and refuses one of the wrong size") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::stories_model()), "../shared/models/stories260K is absent");
  den::test::TempDir dir;
  const std::string path = dir.file("tiny-stories-vocab.gguf");
  REQUIRE(run_den({"model", "new", "--shape", "tiny", "--vocab", den::test::stories_model(), "-o", path}).exit_code == 0);
  // The tokenizer is stories260K's: the same ids for the same text.
  CHECK(run_den({"tokenize", "-m", path}, "Once upon a time").out ==
        run_den({"tokenize", "-m", den::test::stories_model()}, "Once upon a time").out);
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::shared_path("tokenizers")), "../shared/tokenizers is absent");
  const auto wrong = run_den({"model", "new", "--shape", "tiny", "--vocab",
                              den::test::shared_path("tokenizers/ggml-vocab-gpt-2.gguf"), "-o", dir.file("x.gguf")});
  CHECK(wrong.exit_code == 1);
  CHECK(wrong.err.find("has 50257 tokens but the shape needs 512") != std::string::npos);
  CHECK_FALSE(den::test::file_exists(dir.file("x.gguf")));
}

TEST_CASE("den chat answers on the default model") {
  const auto model = den::test::default_model();
  DEN_SKIP_UNLESS(model, "the default model (SmolLM2) is not fetched: run scripts/fetch-model");
  const auto r = run_den({"chat", "--local", "--temp", "0", "-n", "32"}, "What is the capital of France?\n");
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("Paris") != std::string::npos);
}
