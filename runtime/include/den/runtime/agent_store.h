// Durable agent state in SQLite (state_dir/agents.sqlite, WAL, synchronous=FULL): agents, their
// message queues, handler runs, the journal of each run's effects, timers, replies and logs.
//
// The durable-actor protocol it supports:
//   - a message is acknowledged to its sender only after enqueue_message() returned;
//   - a handler run is begun (status running) and every effect it makes is journaled with its
//     result under (run, seq) — effects that touch the store (send, reply, timer) are written in
//     the same transaction as their journal entry, so a replay never repeats them;
//   - complete_run() commits the agent's new state, the run's status, the message's ack or the
//     timer's firing, and the journal's removal in ONE transaction;
//   - at startup, interrupt_running() turns every run left `running` into `interrupted` and
//     returns them: the host runs their handler again with the same journal.
// Every method throws AgentStoreError (a std::runtime_error naming the statement and SQLite's
// message) and leaves the store unchanged when it fails. Thread-safe (one connection, a mutex).
//
// Invariants the schema enforces (a violation throws): every *_json argument is valid JSON text
// (CHECK json_valid: "{}", "42", "\"text\"", never ""); agent status is active | stopped |
// failed. Ids are never reused (AUTOINCREMENT), so an id seen once names one row forever and
// "after_id" cursors never skip. Timestamps are unix seconds from the system clock, stamped by
// the store (the created_at, started_at... fields of the records passed in are ignored).
// A message or timer that is the trigger of a run that is running or interrupted is "being
// handled": next_queued_message(), queued_messages(), due_timers() and next_timer_due() skip it,
// so the host never begins a second run for it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace den::runtime {

class AgentStoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct AgentRecord {
  int64_t id = 0;
  std::string name;          // unique
  std::string source;        // the Lua script
  std::string script_path;   // where it came from (informational)
  std::string state_json = "{}";  // ctx.state after the last completed run
  uint64_t session = 0;      // the memory manager's session id of its conversation
  int32_t priority = 0;      // higher runs first
  int64_t token_budget = 0;  // 0: unlimited; generated + prefilled tokens it may use
  int64_t tokens_used = 0;
  std::string status = "active";  // active | stopped | failed (script does not load)
  std::string error;         // why it failed or stopped
  double created_at = 0;     // unix seconds
};

struct MessageRecord {
  int64_t id = 0;
  int64_t agent = 0;         // recipient
  std::string sender;        // "client", or "agent:<name>"
  std::string body_json;     // the message (any JSON value)
  std::string status = "queued";  // queued | done | failed
  double created_at = 0;
};

struct RunRecord {
  int64_t id = 0;
  int64_t agent = 0;
  std::string trigger;       // start | message | timer | context_full
  int64_t message_id = 0;    // trigger == message
  int64_t timer_id = 0;      // trigger == timer
  std::string status;        // running | completed | failed | interrupted
  std::string error;
  double started_at = 0, ended_at = 0;
};

struct JournalEntry {
  int32_t seq = 0;
  std::string kind;          // generate | tool | send | reply | timer | sleep | ...
  std::string intent_json;   // what the effect was about to do (e.g. history length before a generate)
  std::optional<std::string> result_json;  // nullopt while the effect has not finished
};

struct TimerRecord {
  int64_t id = 0;
  int64_t agent = 0;
  double due_at = 0;         // unix seconds
  std::string payload_json;
  std::string status = "pending";  // pending | fired
};

struct ReplyRecord {
  int64_t id = 0;
  int64_t message_id = 0;    // the message it answers
  int64_t agent = 0;
  std::string text;
  double created_at = 0;
};

struct LogRecord {
  int64_t id = 0;
  int64_t agent = 0;
  double at = 0;
  std::string level;         // info | warn | error
  std::string text;
};

class AgentStore {
 public:
  explicit AgentStore(const std::filesystem::path& path);
  ~AgentStore();
  AgentStore(const AgentStore&) = delete;
  AgentStore& operator=(const AgentStore&) = delete;

  static constexpr int kSchemaVersion = 1;  // PRAGMA user_version this build writes
  int schema_version() const;
  static constexpr int kLogLinesPerAgent = 1000;  // append_log keeps the newest ones
  // Write methods that name an agent, message or run throw when it does not exist (readers
  // answer nullopt or nothing).

  // Agents. create_agent throws AgentStoreError when the name is taken.
  int64_t create_agent(const AgentRecord& agent);
  std::optional<AgentRecord> find_agent(std::string_view name) const;
  std::optional<AgentRecord> agent(int64_t id) const;
  std::vector<AgentRecord> agents() const;  // by id
  void set_agent_status(int64_t id, std::string_view status, std::string_view error);
  void add_tokens_used(int64_t id, int64_t tokens);
  // Deletes the agent and everything of it (messages, runs, journal, timers, replies, logs).
  void delete_agent(int64_t id);

  // Messages.
  int64_t enqueue_message(int64_t agent, std::string_view sender, std::string_view body_json);
  // The oldest queued message that no running or interrupted run is handling.
  std::optional<MessageRecord> next_queued_message(int64_t agent) const;  // oldest queued
  std::optional<MessageRecord> message(int64_t id) const;
  int64_t queued_messages(int64_t agent) const;  // the waiting ones: queued, not being handled

  // Runs and the journal.
  // message_id / timer_id: 0 when none; a given one must be the agent's queued message /
  // pending timer. The run starts `running`. Journal writes, complete_run and fail_run need a
  // live run (running or interrupted); on a finished one they throw.
  int64_t begin_run(int64_t agent, std::string_view trigger, int64_t message_id, int64_t timer_id);
  std::optional<RunRecord> run(int64_t id) const;
  std::vector<RunRecord> runs(int64_t agent, int32_t limit) const;  // newest first; limit <= 0: all
  std::vector<JournalEntry> journal(int64_t run) const;             // by seq
  // An effect with no store side: its intent before it starts, its result once it has one.
  // journal_intent on a (run, seq) journaled with the same kind changes nothing (a replay); with
  // another kind it throws (the replay diverged). journal_result needs the entry.
  void journal_intent(int64_t run, int32_t seq, std::string_view kind, std::string_view intent_json);
  void journal_result(int64_t run, int32_t seq, std::string_view result_json);
  // Effects on the store, each in one transaction with its journal entry (result = the new id);
  // when (run, seq) is journaled already they change nothing and return the recorded id; when it
  // is journaled with another kind they throw (the replay diverged). reply's message_id may be 0.
  int64_t journaled_send(int64_t run, int32_t seq, int64_t to_agent, std::string_view sender, std::string_view body_json);
  int64_t journaled_reply(int64_t run, int32_t seq, int64_t message_id, int64_t agent, std::string_view text);
  int64_t journaled_timer(int64_t run, int32_t seq, int64_t agent, double due_at, std::string_view payload_json);
  // The commit of a finished handler: state, run completed, message done / timer fired,
  // journal removed. One transaction.
  void complete_run(int64_t run, std::string_view state_json);
  // A handler that failed: the run failed with `error`, its message failed / timer fired (a
  // failing handler is not retried forever), the journal removed, the state unchanged.
  void fail_run(int64_t run, std::string_view error);
  // At startup: runs left `running` become `interrupted`; returned oldest first.
  std::vector<RunRecord> interrupt_running();
  // The runs still to finish after a restart (interrupted ones are re-run until they complete).
  std::vector<RunRecord> interrupted_runs() const;
  // An interrupted run being re-run: its status says so again and interrupted_runs() no longer
  // lists it. A running one stays; any other status throws.
  void mark_run_running(int64_t run);

  // Timers.
  // due_timers and next_timer_due skip timers being handled (see the top).
  std::vector<TimerRecord> due_timers(double now) const;  // pending with due_at <= now, oldest first
  std::optional<double> next_timer_due() const;           // earliest pending
  std::vector<TimerRecord> timers(int64_t agent) const;   // pending ones (handled or not), by due_at

  // Replies (what agents answered to messages).
  std::vector<ReplyRecord> replies_to(int64_t message_id) const;                   // by id
  std::vector<ReplyRecord> replies_after(int64_t agent, int64_t after_id) const;  // for subscribers, by id

  // Logs: kept per agent up to a bound (older lines are dropped).
  void append_log(int64_t agent, std::string_view level, std::string_view text);
  std::vector<LogRecord> logs(int64_t agent, int64_t after_id, int32_t limit) const;  // by id; limit <= 0: all

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace den::runtime
