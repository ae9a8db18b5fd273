// `den generate` and `den chat`: generation through the daemon when one listens at the socket
// (`den serve`; sessions live there), else in this process on one model, as before.
//   generate: stdout carries only the continuation and one newline (or the generated ids with
//             --ids); logs and timings go to stderr.
//   chat:     an interactive conversation with the model's chat template; the KV of earlier
//             turns is reused, only each new turn is prefilled. Through the daemon the
//             conversation is a session that outlives the command (--session NAME continues it).
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "commands.h"
#include "den/engine/chat_template.h"
#include "den/engine/model.h"
#include "den/runtime/client.h"
#include "den/runtime/local_generator.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

namespace json = boost::json;

struct CommonOptions {
  std::string model;
  std::string backend = "cpu";
  int device = 0;
  int threads = 0;
  int32_t context = 0;  // 0: the model's, capped at 4096
  int32_t block_tokens = 16;
};

// The options that shape the in-process model; the daemon has its own model and ignores them.
constexpr const char* kLocalOnlyOptions[] = {"--model", "--backend", "--device", "--threads", "--ctx", "--block-tokens"};

void add_common(CLI::App& cmd, CommonOptions& o) {
  cmd.add_option("-m,--model", o.model, "GGUF model file (default: the fetched default model; in-process only)");
  cmd.add_option("--backend", o.backend, "Decoder backend (in-process only)")->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd.add_option("--device", o.device, "CUDA device (with --backend cuda)")->capture_default_str();
  cmd.add_option("-t,--threads", o.threads, "CPU threads (default: one per hardware thread)");
  cmd.add_option("--ctx", o.context, "Context length in tokens (default: the model's, at most 4096)")
      ->check(CLI::Range(1, 1 << 24));
  cmd.add_option("--block-tokens", o.block_tokens, "Tokens per KV block")->check(CLI::Range(1, 4096))->capture_default_str();
}

// Where to generate: the daemon at the socket unless --local, else this process.
struct DaemonOptions {
  std::string socket;
  bool local = false;
  std::string session;
};

void add_daemon_options(CLI::App& cmd, DaemonOptions& o, const char* session_help) {
  cmd.add_option("--socket", o.socket,
                 "The daemon's socket (default: $DEN_SOCKET, else $XDG_RUNTIME_DIR/den/den.sock, else "
                 "/tmp/den-$UID/den.sock); without a daemon there, generation runs in this process");
  cmd.add_flag("--local", o.local, "Generate in this process even when a daemon is running");
  cmd.add_option("--session", o.session, session_help);
}

// The daemon's socket when it is to be used, nullopt for in-process generation. --session only
// exists on the daemon, so asking for one without a daemon is an error rather than a silent
// in-process run that would forget the conversation.
std::optional<std::string> daemon_to_use(const DaemonOptions& o, bool local_forced) {
  if (o.local || local_forced) {
    if (!o.session.empty()) throw std::runtime_error("--session needs the daemon: drop --local (and --no-bos)");
    return std::nullopt;
  }
  const std::string path = socket_path(o.socket);
  if (daemon_listening(path)) return path;
  if (!o.session.empty()) {
    throw DaemonUnavailable("--session needs the daemon, and there is no daemon at " + path +
                            ": start one with 'den serve'");
  }
  return std::nullopt;
}

// Options given on the command line that only shape the in-process model.
std::vector<std::string> local_options_given(const CLI::App& cmd, std::vector<std::string> names) {
  std::vector<std::string> given;
  for (const std::string& name : names) {
    if (cmd.count(name) > 0) given.push_back(name);
  }
  return given;
}

void note_daemon_model(const std::vector<std::string>& given, const std::string& path) {
  if (given.empty()) return;
  std::string list;
  for (const std::string& name : given) list += (list.empty() ? "" : ", ") + name;
  std::fprintf(stderr, "note: using the daemon at %s and its model; %s only apply with --local\n", path.c_str(),
               list.c_str());
}

struct Session {
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<engine::Backend> backend;
  std::unique_ptr<LocalGenerator> generator;
};

Session open_session(const CommonOptions& o) {
  Session s;
  s.model = engine::Model::load(resolve_model_path(o.model));
  s.backend = engine::make_backend(o.backend, *s.model, o.threads, o.device);
  const int32_t context = o.context > 0 ? o.context : std::min(s.model->config().n_ctx_train, 4096);
  s.generator = std::make_unique<LocalGenerator>(*s.model, *s.backend, o.block_tokens, context);
  return s;
}

void write_stdout(std::string_view text) {
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

// The next line typed into a chat (a "> " prompt first on a terminal); false at the end of the
// input or on /exit, /quit.
bool next_chat_line(bool interactive, std::string& line) {
  if (interactive) {
    std::fputs("> ", stdout);
    std::fflush(stdout);
  }
  if (!std::getline(std::cin, line)) return false;
  return line != "/exit" && line != "/quit";
}

void report_timings(const GenerationResult& r) {
  const double decode_rate = r.decode_seconds > 0 ? static_cast<double>(r.tokens.size()) / r.decode_seconds : 0.0;
  const double prefill_tokens = r.prompt_tokens - r.reused_tokens;
  const double prefill_rate = r.prefill_seconds > 0 ? prefill_tokens / r.prefill_seconds : 0.0;
  std::fprintf(stderr, "prompt: %d tokens (%d reused), prefill %.1f ms (%.1f tok/s); generated %zu tokens in %.1f ms (%.1f tok/s); stop: %s\n",
               r.prompt_tokens, r.reused_tokens, r.prefill_seconds * 1e3, prefill_rate, r.tokens.size(),
               r.decode_seconds * 1e3, decode_rate, std::string(stop_reason_name(r.reason)).c_str());
}

struct GenerateOptions {
  CommonOptions common;
  DaemonOptions daemon;
  std::vector<std::string> local_given;  // local-only options on the command line
  std::string prompt;
  int32_t n_tokens = 128;
  bool ids = false;
  bool no_bos = false;
  std::vector<std::string> stop;
  int32_t logprobs = -1;
  engine::SamplingParams sampling;
  bool seed_given = false;
};

void run_generate_local(GenerateOptions& o) {
  finalize_seed(o.sampling, o.seed_given);
  Session s = open_session(o.common);
  const engine::Tokenizer& tok = s.model->tokenizer();
  std::vector<int32_t> context = tok.encode(o.prompt, tok.add_bos_by_default() && !o.no_bos, false);
  if (context.empty() && tok.bos()) context.push_back(*tok.bos());  // an empty prompt starts a document

  GenerationOptions g;
  g.max_new_tokens = o.n_tokens;
  g.sampling = o.sampling;
  g.stop = o.stop;
  g.top_logprobs = o.logprobs;
  GenerationResult r = s.generator->generate(context, g, o.ids ? std::function<void(std::string_view)>{} : write_stdout);
  if (o.ids) {
    std::string line;
    for (const GeneratedToken& t : r.tokens) line += (line.empty() ? "" : " ") + std::to_string(t.id);
    write_stdout(line);
  }
  write_stdout("\n");
  if (o.logprobs >= 0) {
    for (const GeneratedToken& t : r.tokens) {
      std::fprintf(stderr, "logprob %d %.6f", t.id, t.logprob);
      for (const engine::TokenLogprob& alt : t.top) std::fprintf(stderr, " %d:%.6f", alt.id, alt.logprob);
      std::fprintf(stderr, "\n");
    }
  }
  report_timings(r);
}

struct ChatOptions {
  CommonOptions common;
  DaemonOptions daemon;
  std::vector<std::string> local_given;
  std::string system;
  std::string template_name;
  int32_t n_tokens = 512;
  bool verbose = false;
  engine::SamplingParams sampling;
  bool seed_given = false;
};

void run_chat_local(ChatOptions& o) {
  finalize_seed(o.sampling, o.seed_given);
  Session s = open_session(o.common);
  const engine::Tokenizer& tok = s.model->tokenizer();
  const engine::ChatTemplate chat =
      o.template_name.empty()
          ? engine::ChatTemplate::for_model(s.model->file().get_string_opt("tokenizer.chat_template"), tok)
          : engine::ChatTemplate::by_name(o.template_name);
  const bool interactive = ::isatty(STDIN_FILENO) != 0;
  if (interactive) {
    std::fprintf(stderr, "den chat: %s (%s template). Type a message; /reset starts over, /exit or Ctrl-D ends.\n",
                 s.model->config().name.c_str(), std::string(chat.name()).c_str());
  }
  std::vector<engine::ChatMessage> messages;
  if (!o.system.empty()) messages.push_back({"system", o.system});
  GenerationOptions g;
  g.max_new_tokens = o.n_tokens;
  g.sampling = o.sampling;
  std::string line;
  while (next_chat_line(interactive, line)) {
    if (line == "/reset") {
      messages.resize(o.system.empty() ? 0 : 1);
      continue;
    }
    if (line.empty()) continue;
    messages.push_back({"user", line});
    const std::vector<int32_t> context = chat.tokenize(tok, messages, true);
    GenerationResult r = s.generator->generate(context, g, write_stdout);
    write_stdout("\n");
    messages.push_back({"assistant", r.text});
    if (o.verbose) report_timings(r);
    if (r.reason == StopReason::context_full) {
      std::fprintf(stderr, "den chat: the context is full; /reset to start a new conversation\n");
    }
  }
}


// ---- Through the daemon ----------------------------------------------------------------------

const json::object& as_object(const json::value& v, std::string_view what) {
  if (const json::object* o = v.if_object()) return *o;
  throw std::runtime_error("the daemon's " + std::string(what) + " result is not an object: " + json::serialize(v));
}

std::string string_field(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  return v != nullptr && v->is_string() ? std::string(v->as_string()) : std::string();
}

double number_field(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  json::error_code ec;
  const double d = v != nullptr ? v->to_number<double>(ec) : 0.0;
  return v == nullptr || ec ? 0.0 : d;
}

const json::object& object_field(const json::object& o, std::string_view key) {
  static const json::object kEmpty;
  const json::value* v = o.if_contains(key);
  return v != nullptr && v->is_object() ? v->as_object() : kEmpty;
}

// sessions/generate's sampling parameters. Without --seed (and not greedy) a seed is drawn
// here and printed, as in-process generation does, so a run can be repeated; it is kept below
// 2^53, the integers every JSON peer reads exactly (the daemon refuses larger ones).
void add_sampling(json::object& params, engine::SamplingParams p, bool seed_given) {
  p.validate();
  params["temperature"] = p.temperature;
  params["top_k"] = p.top_k;
  params["top_p"] = p.top_p;
  params["min_p"] = p.min_p;
  params["repeat_penalty"] = p.repeat_penalty;
  params["repeat_last_n"] = p.repeat_last_n;
  params["presence_penalty"] = p.presence_penalty;
  params["frequency_penalty"] = p.frequency_penalty;
  if (!seed_given && p.temperature > 0.0f) {
    std::random_device rd;
    p.seed = ((static_cast<uint64_t>(rd()) << 32) ^ rd()) >> 11;
    std::fprintf(stderr, "seed: %llu\n", static_cast<unsigned long long>(p.seed));
    seed_given = true;
  }
  if (!seed_given) return;
  if (p.seed <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    params["seed"] = static_cast<int64_t>(p.seed);
  } else {
    params["seed"] = p.seed;
  }
}

// A session id as the daemon makes them ("s-<digits>"): such a name cannot be created.
bool is_session_id(std::string_view name) {
  return name.size() > 2 && name.starts_with("s-") &&
         std::all_of(name.begin() + 2, name.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// The session called `name` (a name or an id), created when missing; `created` says which.
json::object find_or_create_session(DaemonClient& client, const std::string& name, bool& created) {
  try {
    json::value found = client.call("sessions/get", {{"session", name}});
    created = false;
    return as_object(found, "sessions/get");
  } catch (const RpcCallError& e) {
    if (e.code() != -32000 || is_session_id(name)) throw;
  }
  created = true;
  return as_object(client.call("sessions/create", {{"name", name}}), "sessions/create");
}

json::object create_session(DaemonClient& client, const std::string& name) {
  json::object params;
  if (!name.empty()) params["name"] = name;
  return as_object(client.call("sessions/create", params), "sessions/create");
}

// Deletes the session when the command ends, however it ends: `den generate` without --session
// must leave nothing behind on the daemon.
class TemporarySession {
 public:
  TemporarySession(DaemonClient& client, std::string id) : client_(client), id_(std::move(id)) {}
  ~TemporarySession() {
    try {
      client_.call("sessions/delete", {{"session", id_}});
    } catch (const std::exception&) {
      // The daemon went away (its sessions with it) or refused: nothing more to do here.
    }
  }
  TemporarySession(const TemporarySession&) = delete;
  TemporarySession& operator=(const TemporarySession&) = delete;

 private:
  DaemonClient& client_;
  std::string id_;
};

// The write end of the live CancelOnInterrupt's pipe (-1: none). A signal handler can reach
// nothing but a global; lock-free atomics are safe to read there.
std::atomic<int> g_interrupt_pipe{-1};

void on_sigint(int) {
  const int saved_errno = errno;
  const int fd = g_interrupt_pipe.load();
  if (fd >= 0) {
    const char byte = 'c';
    [[maybe_unused]] const ssize_t written = ::write(fd, &byte, 1);
  }
  errno = saved_errno;
}

// Both ends of a pipe, closed on destruction.
struct OwnedPipe {
  int fds[2] = {-1, -1};
  OwnedPipe() {
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("cannot create a pipe for Ctrl-C handling");
  }
  ~OwnedPipe() {
    for (int fd : fds) ::close(fd);
  }
  OwnedPipe(const OwnedPipe&) = delete;
  OwnedPipe& operator=(const OwnedPipe&) = delete;
};

// While alive, Ctrl-C stops the daemon's generation on `session` instead of killing this
// process. The handler only writes a byte to a pipe (async-signal-safe); a watcher thread sends
// sessions/cancel over a second connection, since the first is blocked waiting for the
// generate result, which then comes back with finish_reason "cancelled". SA_RESETHAND: a
// second Ctrl-C kills as usual, for a daemon that does not answer.
class CancelOnInterrupt {
 public:
  CancelOnInterrupt(std::string socket_path, std::string session)
      : watcher_([this, path = std::move(socket_path), session = std::move(session)] { watch(path, session); }) {
    ::sigaction(SIGINT, nullptr, &previous_);
    // A shell starts background jobs with SIGINT ignored: Ctrl-C is not meant for them.
    if (previous_.sa_handler == SIG_IGN) return;
    g_interrupt_pipe.store(pipe_.fds[1]);
    struct sigaction action {};
    action.sa_handler = on_sigint;
    action.sa_flags = SA_RESETHAND;
    sigemptyset(&action.sa_mask);
    ::sigaction(SIGINT, &action, nullptr);
  }
  ~CancelOnInterrupt() {
    ::sigaction(SIGINT, &previous_, nullptr);
    g_interrupt_pipe.store(-1);
    const char quit = 'q';
    [[maybe_unused]] const ssize_t written = ::write(pipe_.fds[1], &quit, 1);
    watcher_.join();
  }
  CancelOnInterrupt(const CancelOnInterrupt&) = delete;
  CancelOnInterrupt& operator=(const CancelOnInterrupt&) = delete;

  bool interrupted() const { return interrupted_.load(); }

 private:
  void watch(const std::string& path, const std::string& session) {
    for (;;) {
      char byte = 0;
      const ssize_t got = ::read(pipe_.fds[0], &byte, 1);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0 || byte == 'q') return;
      interrupted_.store(true);
      try {
        DaemonClient(path).call("sessions/cancel", {{"session", session}});
      } catch (const std::exception& e) {
        std::fprintf(stderr, "\nden: cannot cancel the generation: %s\n", e.what());
      }
    }
  }

  OwnedPipe pipe_;  // declared before watcher_: the thread reads it from its first instruction
  std::atomic<bool> interrupted_{false};
  struct sigaction previous_ {};
  std::thread watcher_;
};

// Runs sessions/generate with streaming and returns its result, printing the streamed text as
// it arrives when `print`. The stream's texts concatenated equal the result's text
// (docs/PROTOCOL.md); should a daemon stream less, the rest is printed from the result.
json::object generate_streaming(DaemonClient& client, json::object params, bool print) {
  params["stream"] = true;
  const int64_t request = client.next_id();
  std::string streamed;
  const json::value result =
      client.call("sessions/generate", params, [&](std::string_view method, const json::object& p) {
        if (method != "sessions/stream" || number_field(p, "request") != static_cast<double>(request)) return;
        const std::string text = string_field(p, "text");
        streamed += text;
        if (print) write_stdout(text);
      });
  json::object r = as_object(result, "sessions/generate");
  const std::string text = string_field(r, "text");
  if (print && text.size() > streamed.size() && text.starts_with(streamed)) {
    write_stdout(std::string_view(text).substr(streamed.size()));
  }
  return r;
}

void report_daemon_timings(const json::object& r) {
  const json::object& tokens = object_field(r, "tokens");
  const json::object& timings = object_field(r, "timings");
  const double generated = number_field(tokens, "generated");
  const double decode_ms = number_field(timings, "decode_ms");
  std::fprintf(stderr,
               "prompt: %.0f tokens (%.0f reused), prefill %.1f ms; first token after %.1f ms; generated %.0f "
               "tokens in %.1f ms (%.1f tok/s); stop: %s\n",
               number_field(tokens, "prompt"), number_field(tokens, "reused"), number_field(timings, "prefill_ms"),
               number_field(timings, "ttft_ms"), generated, decode_ms, decode_ms > 0 ? generated * 1e3 / decode_ms : 0.0,
               string_field(r, "finish_reason").c_str());
}

void run_generate_daemon(const GenerateOptions& o, const std::string& path) {
  note_daemon_model(o.local_given, path);
  json::object params;
  params["text"] = o.prompt;  // on an empty history the daemon starts with BOS, as in-process generation does
  params["max_tokens"] = o.n_tokens;
  if (!o.stop.empty()) params["stop"] = json::value_from(o.stop);
  add_sampling(params, o.sampling, o.seed_given);
  // The result names the generated ids only in its logprobs entries: --ids asks for those.
  const int32_t logprobs = o.ids ? std::max(o.logprobs, 0) : o.logprobs;
  if (logprobs >= 0) params["logprobs"] = logprobs;

  try {
    DaemonClient client(path);
    std::string session;
    std::optional<TemporarySession> temporary;
    if (o.daemon.session.empty()) {
      session = string_field(create_session(client, ""), "id");
      temporary.emplace(client, session);
    } else {
      bool created = false;
      session = string_field(find_or_create_session(client, o.daemon.session, created), "id");
    }
    params["session"] = session;

    json::object r;
    bool interrupted = false;
    {
      CancelOnInterrupt cancel(path, session);
      r = generate_streaming(client, params, !o.ids);
      interrupted = cancel.interrupted();
    }
    const json::value* entries = r.if_contains("logprobs");
    const json::array* tokens = entries != nullptr ? entries->if_array() : nullptr;
    if (o.ids) {
      std::string line;
      for (size_t i = 0; tokens != nullptr && i < tokens->size(); ++i) {
        const json::object* t = (*tokens)[i].if_object();
        if (t == nullptr) continue;
        line += (line.empty() ? "" : " ") + std::to_string(static_cast<int64_t>(number_field(*t, "id")));
      }
      write_stdout(line);
    }
    write_stdout("\n");
    if (o.logprobs >= 0 && tokens != nullptr) {
      for (const json::value& v : *tokens) {
        if (!v.is_object()) continue;
        const json::object& t = v.as_object();
        std::fprintf(stderr, "logprob %lld %.6f", static_cast<long long>(number_field(t, "id")),
                     number_field(t, "logprob"));
        const json::value* top = t.if_contains("top");
        for (size_t i = 0; top != nullptr && top->is_array() && i < top->as_array().size(); ++i) {
          if (const json::object* alt = top->as_array()[i].if_object()) {
            std::fprintf(stderr, " %lld:%.6f", static_cast<long long>(number_field(*alt, "id")),
                         number_field(*alt, "logprob"));
          }
        }
        std::fprintf(stderr, "\n");
      }
    }
    report_daemon_timings(r);
    if (interrupted) throw std::runtime_error("interrupted: the generation was cancelled");
  } catch (const RpcCallError& e) {
    throw std::runtime_error(describe_for_user(e));
  }
}

void run_chat_daemon(const ChatOptions& o, const std::string& path) {
  note_daemon_model(o.local_given, path);
  json::object sampling;
  add_sampling(sampling, o.sampling, o.seed_given);
  try {
    DaemonClient client(path);
    const std::string& name = o.daemon.session;
    bool fresh = true;  // nothing generated on the session yet: the system prompt goes first
    json::object session;
    if (name.empty()) {
      session = create_session(client, "");
    } else {
      bool created = false;
      session = find_or_create_session(client, name, created);
      if (!created) {
        std::fprintf(stderr, "continuing session %s (%.0f tokens)\n", name.c_str(), number_field(session, "tokens"));
      }
      fresh = number_field(session, "tokens") == 0;
    }
    std::string id = string_field(session, "id");
    const bool interactive = ::isatty(STDIN_FILENO) != 0;
    if (interactive) {
      std::fprintf(stderr,
                   "den chat: session %s on the daemon at %s. Type a message; /reset starts over, /exit or Ctrl-D "
                   "ends, Ctrl-C stops an answer.\n",
                   (name.empty() ? id : name).c_str(), path.c_str());
    }
    std::string line;
    while (next_chat_line(interactive, line)) {
      if (line == "/reset") {
        // A named session keeps its name: delete it and make an empty one under the same name.
        client.call("sessions/delete", {{"session", id}});
        id = string_field(create_session(client, name), "id");
        fresh = true;
        continue;
      }
      if (line.empty()) continue;

      json::array messages;
      if (fresh && !o.system.empty()) messages.push_back(json::object{{"role", "system"}, {"content", o.system}});
      messages.push_back(json::object{{"role", "user"}, {"content", line}});
      json::object params = sampling;
      params["session"] = id;
      params["messages"] = std::move(messages);
      params["max_tokens"] = o.n_tokens;
      json::object r;
      try {
        CancelOnInterrupt cancel(path, id);
        r = generate_streaming(client, params, true);
      } catch (const RpcCallError& e) {
        // A turn that does not fit, or a session busy elsewhere, ends the turn, not the chat.
        if (e.code() != -32004 && e.code() != -32002) throw;
        std::fprintf(stderr, "den chat: %s\n", describe_for_user(e).c_str());
        continue;
      }
      write_stdout("\n");
      fresh = false;
      if (o.verbose) report_daemon_timings(r);
      const std::string finish = string_field(r, "finish_reason");
      if (finish == "context_full") {
        std::fprintf(stderr, "den chat: the context is full; /reset to start a new conversation\n");
      } else if (finish == "cancelled") {
        std::fprintf(stderr, "(stopped)\n");
      }
    }
    if (name.empty()) {
      if (fresh) {
        client.call("sessions/delete", {{"session", id}});  // nothing was said: nothing to keep
      } else {
        std::fprintf(stderr, "session %s kept: continue with den chat --session %s\n", id.c_str(), id.c_str());
      }
    }
  } catch (const RpcCallError& e) {
    throw std::runtime_error(describe_for_user(e));
  }
}

void run_generate(GenerateOptions& o) {
  // --no-bos cannot be expressed to the daemon (it adds BOS as the model asks): run in-process.
  if (const auto path = daemon_to_use(o.daemon, o.no_bos)) return run_generate_daemon(o, *path);
  run_generate_local(o);
}

void run_chat(ChatOptions& o) {
  if (const auto path = daemon_to_use(o.daemon, false)) return run_chat_daemon(o, *path);
  run_chat_local(o);
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Continue a prompt with a model (stdout: the continuation only)");
  add_common(*cmd, o->common);
  add_daemon_options(*cmd, o->daemon,
                     "Generate on this daemon session (created when missing) and keep it; default: a temporary one");
  cmd->add_option("-p,--prompt", o->prompt, "Prompt text (tokenized as the model's tokenizer does)");
  cmd->add_option("-n,--n-tokens", o->n_tokens, "New tokens to generate at most")->check(CLI::Range(0, 1 << 24))
      ->capture_default_str();
  cmd->add_flag("--ids", o->ids, "Print the generated token ids instead of text");
  cmd->add_flag("--no-bos", o->no_bos, "Do not prepend BOS even if the model asks for it (runs in this process)");
  cmd->add_option("--stop", o->stop, "Stop when this text appears (repeatable)");
  cmd->add_option("--logprobs", o->logprobs, "Print each token's log-probability and the N most likely (stderr)")
      ->check(CLI::Range(0, 100));
  add_sampling_options(*cmd, o->sampling, o->seed_given);
  cmd->callback([o, cmd] {
    o->local_given = local_options_given(*cmd, {std::begin(kLocalOnlyOptions), std::end(kLocalOnlyOptions)});
    run_generate(*o);
  });
}

void add_chat_command(CLI::App& app) {
  auto o = std::make_shared<ChatOptions>();
  CLI::App* cmd = app.add_subcommand("chat", "Chat with a model in the terminal, using its chat template");
  add_common(*cmd, o->common);
  add_daemon_options(*cmd, o->daemon,
                     "Daemon session to continue (created when missing); default: a new one, kept at the end");
  cmd->add_option("--system", o->system, "System prompt (on a new session)");
  cmd->add_option("--template", o->template_name,
                  "Chat template: chatml, llama3, llama2 (default: the model's; in-process only)");
  cmd->add_option("-n,--n-tokens", o->n_tokens, "Longest answer in tokens")->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  cmd->add_flag("-v,--verbose", o->verbose, "Print timings after each answer (stderr)");
  add_sampling_options(*cmd, o->sampling, o->seed_given);
  cmd->callback([o, cmd] {
    std::vector<std::string> names(std::begin(kLocalOnlyOptions), std::end(kLocalOnlyOptions));
    names.push_back("--template");
    o->local_given = local_options_given(*cmd, names);
    run_chat(*o);
  });
}

}  // namespace den::runtime::cli
