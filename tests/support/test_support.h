// Shared helpers of the test suites: where the shared models and fixtures are, running the
// `den` binary, temporary directories, random data.
#pragma once

#include <doctest/doctest.h>
#include <sys/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace den::test {

// ../shared/<relative>; $DEN_TEST_SHARED_DIR, $DEN_TEST_FIXTURES_DIR and $DEN_TEST_BINARY
// override the compiled-in locations.
std::string shared_path(const std::string& relative);
std::string den_binary();
std::string fixture_path(const std::string& relative);
// A file of the repository (examples/, agents/, ...): tests/fixtures is two levels below its root.
std::string repo_path(const std::string& relative);
bool file_exists(const std::string& path);
std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& bytes);

std::string stories_model();  // ../shared/models/stories260K/stories260K.gguf

// llama2.c's published greedy output for stories260K, read from its SOURCE.md: the 64 token
// ids after BOS and the exact stdout of `run stories260K.bin -z tok512.bin -t 0.0 -n 64`.
struct StoriesOracle {
  std::vector<int32_t> ids;
  std::string stdout_text;
};
StoriesOracle stories_oracle();
// The fetched default model (SmolLM2), or nullopt when it was not fetched.
std::optional<std::string> default_model();

struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
// Runs the den binary with args, feeding `input` on stdin.
CommandResult run_den(const std::vector<std::string>& args, const std::string& input = {});

// A program running beside a test (argv[0] looked up in PATH; stdin from /dev/null, stdout and
// stderr shared with the test). The destructor SIGKILLs and reaps it.
class BackgroundProcess {
 public:
  explicit BackgroundProcess(const std::vector<std::string>& argv);
  ~BackgroundProcess();
  BackgroundProcess(const BackgroundProcess&) = delete;
  BackgroundProcess& operator=(const BackgroundProcess&) = delete;
  void kill_and_wait();  // SIGKILL, reaped; nothing if it already was

 private:
  pid_t pid_ = -1;
};

// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

std::vector<float> random_floats(std::mt19937& rng, size_t n, float stddev = 1.0f);

// max |ours - reference| / max |reference|: the logits comparison against external references.
template <typename Ours, typename Reference>
double max_relative_error(const Ours& ours, const Reference& reference, size_t n) {
  double max_ref = 0.0, max_delta = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double r = reference(i);
    max_ref = std::max(max_ref, std::abs(r));
    max_delta = std::max(max_delta, std::abs(static_cast<double>(ours[i]) - r));
  }
  return max_delta / max_ref;
}

}  // namespace den::test

// Ends the test case with a message when a precondition (shared data, a fetched model, a GPU)
// is missing. Only for inputs the test cannot make itself.
#define DEN_SKIP_UNLESS(condition, why) \
  do {                                  \
    if (!(condition)) {                 \
      MESSAGE("skipped: " << why);      \
      return;                           \
    }                                   \
  } while (0)
