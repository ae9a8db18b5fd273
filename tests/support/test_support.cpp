// Test helpers.
#include "test_support.h"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <csignal>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "den/runtime/paths.h"

extern char** environ;

namespace den::test {

namespace {

// Paths are compiled in; the environment may override them when the binaries run elsewhere
// (the GPU machine gets a copy of the tree at another path).
std::string configured(const char* variable, const char* compiled) {
  const char* value = std::getenv(variable);
  return value != nullptr && value[0] != '\0' ? value : compiled;
}

}  // namespace

std::string shared_path(const std::string& relative) {
  return configured("DEN_TEST_SHARED_DIR", DEN_SHARED_DIR) + "/" + relative;
}
std::string fixture_path(const std::string& relative) {
  return configured("DEN_TEST_FIXTURES_DIR", DEN_FIXTURES_DIR) + "/" + relative;
}
std::string repo_path(const std::string& relative) {
  std::filesystem::path fixtures = std::filesystem::path(fixture_path("")).lexically_normal();
  if (fixtures.filename().empty()) fixtures = fixtures.parent_path();  // the trailing slash
  return (fixtures.parent_path().parent_path() / relative).string();
}
std::string den_binary() { return configured("DEN_TEST_BINARY", DEN_BINARY); }
bool file_exists(const std::string& path) { return std::filesystem::exists(path); }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::string stories_model() { return shared_path("models/stories260K/stories260K.gguf"); }

StoriesOracle stories_oracle() {
  const std::string md = read_file(shared_path("models/stories260K/SOURCE.md"));
  auto block_after = [&](const std::string& marker) {
    const size_t at = md.find(marker);
    if (at == std::string::npos) throw std::runtime_error("SOURCE.md has no '" + marker + "'");
    const size_t open = md.find("```\n", at);
    const size_t close = md.find("\n```", open + 4);
    return md.substr(open + 4, close - open - 4);
  };
  StoriesOracle oracle;
  oracle.stdout_text = block_after("stdout was exactly this") + "\n";
  std::istringstream ids(block_after("64 sampled token ids"));
  for (int32_t id; ids >> id;) oracle.ids.push_back(id);
  return oracle;
}

std::optional<std::string> default_model() {
  const std::string path = runtime::default_model_path();
  if (!file_exists(path)) return std::nullopt;
  return path;
}

BackgroundProcess::BackgroundProcess(const std::vector<std::string>& argv) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  const int rc = posix_spawnp(&pid_, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot run " + argv[0] + ": " + std::strerror(rc));
}

BackgroundProcess::~BackgroundProcess() { kill_and_wait(); }

void BackgroundProcess::kill_and_wait() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

CommandResult run_den(const std::vector<std::string>& args, const std::string& input) {
  // A child that exits without reading all of stdin must not kill the test with SIGPIPE.
  static const bool ignore_sigpipe = (std::signal(SIGPIPE, SIG_IGN), true);
  (void)ignore_sigpipe;
  int in_pipe[2], out_pipe[2], err_pipe[2];
  if (pipe2(in_pipe, O_CLOEXEC) != 0 || pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0) {
    throw std::runtime_error("pipe failed");
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in_pipe[0], 0);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], 1);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], 2);
  const std::string binary = den_binary();
  std::vector<std::string> argv_strings = {binary};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : argv_strings) argv.push_back(s.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(in_pipe[0]);
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (rc != 0) throw std::runtime_error("cannot start " + binary);

  CommandResult result;
  size_t written = 0;
  int in_fd = in_pipe[1];
  if (input.empty()) {
    close(in_fd);
    in_fd = -1;
  }
  bool out_open = true, err_open = true;
  while (out_open || err_open) {
    pollfd fds[3] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}, {in_fd, POLLOUT, 0}};
    const nfds_t n = in_fd >= 0 ? 3 : 2;
    if (poll(fds, n, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    char buffer[65536];
    for (int k = 0; k < 2; ++k) {
      if (fds[k].revents & (POLLIN | POLLHUP)) {
        const ssize_t r = read(fds[k].fd, buffer, sizeof buffer);
        if (r > 0) {
          (k == 0 ? result.out : result.err).append(buffer, static_cast<size_t>(r));
        } else {
          (k == 0 ? out_open : err_open) = false;
        }
      }
    }
    if (in_fd >= 0 && (fds[2].revents & (POLLOUT | POLLERR | POLLHUP))) {
      const ssize_t w = write(in_fd, input.data() + written, input.size() - written);
      if (w > 0) written += static_cast<size_t>(w);
      if (w < 0 || written == input.size()) {
        close(in_fd);
        in_fd = -1;
      }
    }
  }
  if (in_fd >= 0) close(in_fd);
  close(out_pipe[0]);
  close(err_pipe[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

TempDir::TempDir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "den-test-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::vector<float> random_floats(std::mt19937& rng, size_t n, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

}  // namespace den::test
