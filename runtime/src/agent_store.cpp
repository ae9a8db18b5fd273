// AgentStore: the agents' durable state in SQLite (see agent_store.h for the protocol).
// Private here: the schema migrations and the checks that keep a replayed run from repeating its
// effects; the connection, statements, transaction guard and open sequence are memory's shared
// ones (den/memory/sqlite_db.h).
#include "den/runtime/agent_store.h"

#include "den/memory/sqlite_db.h"

#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <chrono>
#include <cmath>
#include <mutex>
#include <utility>

namespace den::runtime {
namespace {

// PRAGMA application_id of the agent store: 'DENA'. Not the memory store's 'DEN1': a metadata
// database opened here by mistake must be refused, not taken for a migrated agent store.
constexpr int32_t kApplicationId = 0x44454E41;

// Schema migrations, applied in order inside one transaction on open. Entry i takes the schema
// from version i to version i + 1; a version 2 is one more entry (and kSchemaVersion + 1).
constexpr std::array kMigrations = {
    // v0 -> v1. Ids are AUTOINCREMENT so that a deleted row's id is never handed out again: a
    // client holding a message id or an after_id cursor can never be confused by a newer row.
    // Optional references (a run's message or timer, a reply's message) are NULL when absent.
    R"sql(
CREATE TABLE agents (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  source TEXT NOT NULL,
  script_path TEXT NOT NULL,
  state_json TEXT NOT NULL CHECK (json_valid(state_json)),
  session INTEGER NOT NULL,           -- uint64 bit-cast to int64
  priority INTEGER NOT NULL,
  token_budget INTEGER NOT NULL,
  tokens_used INTEGER NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('active', 'stopped', 'failed')),
  error TEXT NOT NULL,
  created_at REAL NOT NULL
);
CREATE TABLE messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  agent INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
  sender TEXT NOT NULL,
  body_json TEXT NOT NULL CHECK (json_valid(body_json)),
  status TEXT NOT NULL CHECK (status IN ('queued', 'done', 'failed')),
  created_at REAL NOT NULL
);
-- next queued message of an agent, the queue length, and the agent foreign key.
CREATE INDEX messages_by_agent ON messages(agent, status, id);
CREATE TABLE timers (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  agent INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
  due_at REAL NOT NULL,
  payload_json TEXT NOT NULL CHECK (json_valid(payload_json)),
  status TEXT NOT NULL CHECK (status IN ('pending', 'fired'))
);
CREATE INDEX timers_pending ON timers(due_at, id) WHERE status = 'pending';
CREATE INDEX timers_by_agent ON timers(agent, due_at);
CREATE TABLE runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  agent INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
  trigger_kind TEXT NOT NULL,         -- start | message | timer | context_full
  message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
  timer_id INTEGER REFERENCES timers(id) ON DELETE CASCADE,
  status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
  error TEXT NOT NULL,
  started_at REAL NOT NULL,
  ended_at REAL NOT NULL              -- 0 until the run completed or failed
);
CREATE INDEX runs_by_agent ON runs(agent, id);
CREATE INDEX runs_by_status ON runs(status, id);
-- "is this message / timer being handled", and the foreign keys.
CREATE INDEX runs_by_message ON runs(message_id) WHERE message_id IS NOT NULL;
CREATE INDEX runs_by_timer ON runs(timer_id) WHERE timer_id IS NOT NULL;
CREATE TABLE journal (
  run INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  seq INTEGER NOT NULL,
  kind TEXT NOT NULL,
  intent_json TEXT NOT NULL CHECK (json_valid(intent_json)),
  result_json TEXT CHECK (result_json IS NULL OR json_valid(result_json)),  -- NULL: not finished
  PRIMARY KEY (run, seq)
) WITHOUT ROWID;
CREATE TABLE replies (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
  agent INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
  text TEXT NOT NULL,
  created_at REAL NOT NULL
);
CREATE INDEX replies_by_message ON replies(message_id, id);
CREATE INDEX replies_by_agent ON replies(agent, id);
-- seq numbers an agent's lines 1, 2, 3...: the bound is one range delete on (agent, seq).
CREATE TABLE logs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  agent INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
  seq INTEGER NOT NULL,
  at REAL NOT NULL,
  level TEXT NOT NULL,
  text TEXT NOT NULL
);
CREATE UNIQUE INDEX logs_by_agent ON logs(agent, seq);
)sql",
};
static_assert(kMigrations.size() == AgentStore::kSchemaVersion, "one migration step per schema version");

using memory::sqlite::Connection;
using memory::sqlite::pragma_int;
using memory::sqlite::Statement;
using memory::sqlite::Transaction;
namespace sqlite = memory::sqlite;

[[noreturn]] void throw_agent_store_error(const std::string& message) { throw AgentStoreError(message); }

// A run's trigger is "being handled" while such a run exists; see the header.
constexpr const char* kLiveRunStatuses = "('running', 'interrupted')";

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Shortest text that reads back as the same double; finite values only (JSON has no NaN).
std::string json_number(double value) {
  char text[32];
  const auto [end, ec] = std::to_chars(text, text + sizeof(text), value);
  return ec == std::errc{} ? std::string(text, end) : std::string("0");
}

std::string id_text(int64_t id) { return std::to_string(id); }

// ---- row readers: each SELECT lists its columns in the order its reader expects ----

constexpr const char* kAgentColumns =
    "id, name, source, script_path, state_json, session, priority, token_budget, tokens_used, status, error, "
    "created_at FROM agents";

AgentRecord read_agent(const Statement& st) {
  AgentRecord a;
  a.id = st.column_int(0);
  a.name = st.column_text(1);
  a.source = st.column_text(2);
  a.script_path = st.column_text(3);
  a.state_json = st.column_text(4);
  a.session = std::bit_cast<uint64_t>(st.column_int(5));
  a.priority = static_cast<int32_t>(st.column_int(6));
  a.token_budget = st.column_int(7);
  a.tokens_used = st.column_int(8);
  a.status = st.column_text(9);
  a.error = st.column_text(10);
  a.created_at = st.column_double(11);
  return a;
}

constexpr const char* kMessageColumns = "m.id, m.agent, m.sender, m.body_json, m.status, m.created_at FROM messages m";

MessageRecord read_message(const Statement& st) {
  MessageRecord m;
  m.id = st.column_int(0);
  m.agent = st.column_int(1);
  m.sender = st.column_text(2);
  m.body_json = st.column_text(3);
  m.status = st.column_text(4);
  m.created_at = st.column_double(5);
  return m;
}

constexpr const char* kRunColumns =
    "id, agent, trigger_kind, coalesce(message_id, 0), coalesce(timer_id, 0), status, error, started_at, ended_at "
    "FROM runs";

RunRecord read_run(const Statement& st) {
  RunRecord r;
  r.id = st.column_int(0);
  r.agent = st.column_int(1);
  r.trigger = st.column_text(2);
  r.message_id = st.column_int(3);
  r.timer_id = st.column_int(4);
  r.status = st.column_text(5);
  r.error = st.column_text(6);
  r.started_at = st.column_double(7);
  r.ended_at = st.column_double(8);
  return r;
}

constexpr const char* kTimerColumns = "t.id, t.agent, t.due_at, t.payload_json, t.status FROM timers t";

TimerRecord read_timer(const Statement& st) {
  TimerRecord t;
  t.id = st.column_int(0);
  t.agent = st.column_int(1);
  t.due_at = st.column_double(2);
  t.payload_json = st.column_text(3);
  t.status = st.column_text(4);
  return t;
}

constexpr const char* kReplyColumns = "id, coalesce(message_id, 0), agent, text, created_at FROM replies";

ReplyRecord read_reply(const Statement& st) {
  ReplyRecord r;
  r.id = st.column_int(0);
  r.message_id = st.column_int(1);
  r.agent = st.column_int(2);
  r.text = st.column_text(3);
  r.created_at = st.column_double(4);
  return r;
}

template <typename Record, typename Reader>
std::vector<Record> read_all(Statement& st, Reader read) {
  std::vector<Record> out;
  while (st.step()) out.push_back(read(st));
  return out;
}

// ---- checks shared by the write methods ----

std::optional<RunRecord> find_run(const Connection& c, int64_t run) {
  Statement st(c, std::string("SELECT ") + kRunColumns + " WHERE id = ?1");
  st.bind_int(1, run);
  if (!st.step()) return std::nullopt;
  return read_run(st);
}

RunRecord require_run(const Connection& c, int64_t run, std::string_view operation) {
  auto found = find_run(c, run);
  if (!found) c.fail_plain(std::string(operation) + ": no run " + id_text(run));
  return *std::move(found);
}

// Journal writes and complete_run belong to a live run: running, or interrupted and being
// replayed (mark_run_running is advised, not required). A finished run has no journal any more;
// writing one would orphan it and make an effect outside any run.
RunRecord require_live(const Connection& c, int64_t run, std::string_view operation) {
  RunRecord r = require_run(c, run, operation);
  if (r.status != "running" && r.status != "interrupted") {
    c.fail_plain(std::string(operation) + ": run " + id_text(run) + " is " + r.status + ", not running or interrupted");
  }
  return r;
}

void require_agent(const Connection& c, int64_t agent, std::string_view operation) {
  Statement st(c, "SELECT 1 FROM agents WHERE id = ?1");
  st.bind_int(1, agent);
  if (!st.step()) c.fail_plain(std::string(operation) + ": no agent " + id_text(agent));
}

struct JournalRow {
  std::string kind;
  std::optional<std::string> result_json;
};

std::optional<JournalRow> find_journal_entry(const Connection& c, int64_t run, int32_t seq) {
  Statement st(c, "SELECT kind, result_json FROM journal WHERE run = ?1 AND seq = ?2");
  st.bind_int(1, run).bind_int(2, seq);
  if (!st.step()) return std::nullopt;
  JournalRow row{st.column_text(0), std::nullopt};
  if (!st.is_null(1)) row.result_json = st.column_text(1);
  return row;
}

// A replayed handler must make the same effects in the same order; a different kind at a
// journaled step means its script or its inputs changed, and the journal cannot be trusted.
void check_same_kind(const Connection& c, const JournalRow& row, int64_t run, int32_t seq, std::string_view kind,
                     std::string_view operation) {
  if (row.kind != kind) {
    c.fail_plain(std::string(operation) + ": the replay of run " + id_text(run) + " diverged: step " +
                 std::to_string(seq) + " was journaled as '" + row.kind + "' but the handler now does '" +
                 std::string(kind) + "' there");
  }
}

// The id a journaled store effect recorded at (run, seq), or nullopt when the step is new.
std::optional<int64_t> recorded_effect(const Connection& c, int64_t run, int32_t seq, std::string_view kind,
                                       std::string_view operation) {
  const auto row = find_journal_entry(c, run, seq);
  if (!row) return std::nullopt;
  check_same_kind(c, *row, run, seq, kind, operation);
  int64_t id = 0;
  const std::string& text = row->result_json.value_or("");
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), id);
  if (ec != std::errc{} || end != text.data() + text.size()) {
    c.fail_plain(std::string(operation) + ": run " + id_text(run) + " step " + std::to_string(seq) + " is a '" +
                 std::string(kind) + "' journaled without the id it created (result " +
                 (row->result_json ? "'" + text + "'" : std::string("NULL")) + ")");
  }
  return id;
}

void insert_journal_entry(const Connection& c, int64_t run, int32_t seq, std::string_view kind,
                          std::string_view intent_json, std::optional<int64_t> result_id) {
  Statement st(c, "INSERT INTO journal (run, seq, kind, intent_json, result_json) VALUES (?1, ?2, ?3, ?4, ?5)");
  st.bind_int(1, run).bind_int(2, seq).bind_text(3, kind).bind_text(4, intent_json);
  if (result_id) {
    st.bind_text(5, id_text(*result_id));
  } else {
    st.bind_null(5);
  }
  st.run();
}

int64_t insert_message(const Connection& c, int64_t agent, std::string_view sender, std::string_view body_json) {
  Statement st(c,
               "INSERT INTO messages (agent, sender, body_json, status, created_at) VALUES (?1, ?2, ?3, 'queued', ?4)");
  st.bind_int(1, agent).bind_text(2, sender).bind_text(3, body_json).bind_double(4, now_seconds());
  st.run();
  return c.last_insert_id();
}

// The end of a run: its status, its trigger's, and the journal's removal. The caller's
// transaction makes it one commit with whatever else the end changes (the state).
void finish_run(const Connection& c, const RunRecord& run, std::string_view run_status, std::string_view error,
                std::string_view message_status) {
  {
    Statement st(c, "UPDATE runs SET status = ?2, error = ?3, ended_at = ?4 WHERE id = ?1");
    st.bind_int(1, run.id).bind_text(2, run_status).bind_text(3, error).bind_double(4, now_seconds());
    st.run();
  }
  if (run.message_id != 0) {
    Statement st(c, "UPDATE messages SET status = ?2 WHERE id = ?1");
    st.bind_int(1, run.message_id).bind_text(2, message_status);
    st.run();
  }
  if (run.timer_id != 0) {
    Statement st(c, "UPDATE timers SET status = 'fired' WHERE id = ?1");
    st.bind_int(1, run.timer_id);
    st.run();
  }
  Statement st(c, "DELETE FROM journal WHERE run = ?1");
  st.bind_int(1, run.id);
  st.run();
}

}  // namespace

// One connection; the mutex keeps one method's transaction from interleaving with another
// thread's statements (the runtime's threads and the socket handlers all call in).
struct AgentStore::Impl {
  // FULL synchronous (set by open_versioned): a commit is on disk when COMMIT returns, which is
  // what "acknowledged after enqueue_message() returned" and "complete_run() is the commit of a
  // handler" promise. NOMUTEX: every use is under `mutex` already.
  explicit Impl(const std::filesystem::path& path)
      : conn(sqlite::open_versioned(path, {.name = "agent store",
                                           .thrower = throw_agent_store_error,
                                           .threading = sqlite::Threading::caller_locked,
                                           .application_id = kApplicationId,
                                           .schema_version = kSchemaVersion,
                                           .migrations = kMigrations,
                                           .not_sqlite_refusal =
                                               " is not a Den agent store: the file is not an SQLite database",
                                           .foreign_refusal = ": is not a Den agent store"})) {}
  Connection conn;
  std::mutex mutex;
};

AgentStore::AgentStore(const std::filesystem::path& path) : impl_(std::make_unique<Impl>(path)) {}

AgentStore::~AgentStore() = default;

int AgentStore::schema_version() const {
  std::lock_guard lock(impl_->mutex);
  return static_cast<int>(pragma_int(impl_->conn, "user_version"));
}

// ---- agents ----

int64_t AgentStore::create_agent(const AgentRecord& agent) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  {
    Statement st(c, "SELECT id FROM agents WHERE name = ?1");
    st.bind_text(1, agent.name);
    if (st.step()) {
      c.fail_plain("create_agent: the name '" + agent.name + "' is taken by agent " + id_text(st.column_int(0)));
    }
  }
  Statement st(c,
               "INSERT INTO agents (name, source, script_path, state_json, session, priority, token_budget, "
               "tokens_used, status, error, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)");
  st.bind_text(1, agent.name)
      .bind_text(2, agent.source)
      .bind_text(3, agent.script_path)
      .bind_text(4, agent.state_json)
      .bind_int(5, std::bit_cast<int64_t>(agent.session))
      .bind_int(6, agent.priority)
      .bind_int(7, agent.token_budget)
      .bind_int(8, agent.tokens_used)
      .bind_text(9, agent.status)
      .bind_text(10, agent.error)
      .bind_double(11, now_seconds());
  st.run();
  const int64_t id = c.last_insert_id();
  tx.commit();
  return id;
}

std::optional<AgentRecord> AgentStore::find_agent(std::string_view name) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kAgentColumns + " WHERE name = ?1");
  st.bind_text(1, name);
  if (!st.step()) return std::nullopt;
  return read_agent(st);
}

std::optional<AgentRecord> AgentStore::agent(int64_t id) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kAgentColumns + " WHERE id = ?1");
  st.bind_int(1, id);
  if (!st.step()) return std::nullopt;
  return read_agent(st);
}

std::vector<AgentRecord> AgentStore::agents() const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kAgentColumns + " ORDER BY id");
  return read_all<AgentRecord>(st, read_agent);
}

void AgentStore::set_agent_status(int64_t id, std::string_view status, std::string_view error) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  Statement st(c, "UPDATE agents SET status = ?2, error = ?3 WHERE id = ?1");
  st.bind_int(1, id).bind_text(2, status).bind_text(3, error);
  if (st.run() == 0) c.fail_plain("set_agent_status: no agent " + id_text(id));
  tx.commit();
}

void AgentStore::add_tokens_used(int64_t id, int64_t tokens) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  Statement st(c, "UPDATE agents SET tokens_used = tokens_used + ?2 WHERE id = ?1");
  st.bind_int(1, id).bind_int(2, tokens);
  if (st.run() == 0) c.fail_plain("add_tokens_used: no agent " + id_text(id));
  tx.commit();
}

void AgentStore::delete_agent(int64_t id) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  // ON DELETE CASCADE takes its messages, runs (and their journal), timers, replies and logs.
  Statement st(c, "DELETE FROM agents WHERE id = ?1");
  st.bind_int(1, id);
  if (st.run() == 0) c.fail_plain("delete_agent: no agent " + id_text(id));
  tx.commit();
}

// ---- messages ----

int64_t AgentStore::enqueue_message(int64_t agent, std::string_view sender, std::string_view body_json) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  require_agent(c, agent, "enqueue_message");
  const int64_t id = insert_message(c, agent, sender, body_json);
  tx.commit();
  return id;
}

std::optional<MessageRecord> AgentStore::next_queued_message(int64_t agent) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kMessageColumns +
                                " WHERE m.agent = ?1 AND m.status = 'queued' AND NOT EXISTS (SELECT 1 FROM runs r "
                                "WHERE r.message_id = m.id AND r.status IN " + kLiveRunStatuses +
                                ") ORDER BY m.id LIMIT 1");
  st.bind_int(1, agent);
  if (!st.step()) return std::nullopt;
  return read_message(st);
}

std::optional<MessageRecord> AgentStore::message(int64_t id) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kMessageColumns + " WHERE m.id = ?1");
  st.bind_int(1, id);
  if (!st.step()) return std::nullopt;
  return read_message(st);
}

int64_t AgentStore::queued_messages(int64_t agent) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT count(*) FROM messages m WHERE m.agent = ?1 AND m.status = 'queued' "
                                        "AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.message_id = m.id AND "
                                        "r.status IN ") + kLiveRunStatuses + ")");
  st.bind_int(1, agent);
  return st.step() ? st.column_int(0) : 0;
}

// ---- runs and the journal ----

int64_t AgentStore::begin_run(int64_t agent, std::string_view trigger, int64_t message_id, int64_t timer_id) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  require_agent(c, agent, "begin_run");
  if (message_id != 0) {
    Statement st(c, "SELECT agent, status FROM messages WHERE id = ?1");
    st.bind_int(1, message_id);
    if (!st.step() || st.column_int(0) != agent || st.column_text(1) != "queued") {
      c.fail_plain("begin_run: message " + id_text(message_id) + " is not a queued message of agent " +
                   id_text(agent));
    }
  }
  if (timer_id != 0) {
    Statement st(c, "SELECT agent, status FROM timers WHERE id = ?1");
    st.bind_int(1, timer_id);
    if (!st.step() || st.column_int(0) != agent || st.column_text(1) != "pending") {
      c.fail_plain("begin_run: timer " + id_text(timer_id) + " is not a pending timer of agent " + id_text(agent));
    }
  }
  Statement st(c,
               "INSERT INTO runs (agent, trigger_kind, message_id, timer_id, status, error, started_at, ended_at) "
               "VALUES (?1, ?2, ?3, ?4, 'running', '', ?5, 0)");
  st.bind_int(1, agent)
      .bind_text(2, trigger)
      .bind_id_or_null(3, message_id)
      .bind_id_or_null(4, timer_id)
      .bind_double(5, now_seconds());
  st.run();
  const int64_t id = c.last_insert_id();
  tx.commit();
  return id;
}

std::optional<RunRecord> AgentStore::run(int64_t id) const {
  std::lock_guard lock(impl_->mutex);
  return find_run(impl_->conn, id);
}

std::vector<RunRecord> AgentStore::runs(int64_t agent, int32_t limit) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kRunColumns + " WHERE agent = ?1 ORDER BY id DESC LIMIT ?2");
  st.bind_int(1, agent).bind_int(2, limit > 0 ? limit : -1);  // a negative LIMIT is none
  return read_all<RunRecord>(st, read_run);
}

std::vector<JournalEntry> AgentStore::journal(int64_t run) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, "SELECT seq, kind, intent_json, result_json FROM journal WHERE run = ?1 ORDER BY seq");
  st.bind_int(1, run);
  return read_all<JournalEntry>(st, [](const Statement& row) {
    JournalEntry e;
    e.seq = static_cast<int32_t>(row.column_int(0));
    e.kind = row.column_text(1);
    e.intent_json = row.column_text(2);
    if (!row.is_null(3)) e.result_json = row.column_text(3);
    return e;
  });
}

void AgentStore::journal_intent(int64_t run, int32_t seq, std::string_view kind, std::string_view intent_json) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  require_live(c, run, "journal_intent");
  if (const auto row = find_journal_entry(c, run, seq)) {
    check_same_kind(c, *row, run, seq, kind, "journal_intent");
    return;  // a replay reaching a step it journaled before: the first intent stands
  }
  insert_journal_entry(c, run, seq, kind, intent_json, std::nullopt);
  tx.commit();
}

void AgentStore::journal_result(int64_t run, int32_t seq, std::string_view result_json) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  require_live(c, run, "journal_result");
  Statement st(c, "UPDATE journal SET result_json = ?3 WHERE run = ?1 AND seq = ?2");
  st.bind_int(1, run).bind_int(2, seq).bind_text(3, result_json);
  if (st.run() == 0) {
    c.fail_plain("journal_result: run " + id_text(run) + " has no journal entry at step " + std::to_string(seq) +
                 " (journal_intent comes first)");
  }
  tx.commit();
}

int64_t AgentStore::journaled_send(int64_t run, int32_t seq, int64_t to_agent, std::string_view sender,
                                   std::string_view body_json) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  require_live(c, run, "journaled_send");
  if (const auto recorded = recorded_effect(c, run, seq, "send", "journaled_send")) return *recorded;
  require_agent(c, to_agent, "journaled_send");
  const int64_t id = insert_message(c, to_agent, sender, body_json);
  insert_journal_entry(c, run, seq, "send", "{\"to\":" + id_text(to_agent) + "}", id);
  tx.commit();
  return id;
}

int64_t AgentStore::journaled_reply(int64_t run, int32_t seq, int64_t message_id, int64_t agent,
                                    std::string_view text) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  require_live(c, run, "journaled_reply");
  if (const auto recorded = recorded_effect(c, run, seq, "reply", "journaled_reply")) return *recorded;
  require_agent(c, agent, "journaled_reply");
  if (message_id != 0) {
    Statement st(c, "SELECT 1 FROM messages WHERE id = ?1");
    st.bind_int(1, message_id);
    if (!st.step()) c.fail_plain("journaled_reply: no message " + id_text(message_id));
  }
  Statement st(c, "INSERT INTO replies (message_id, agent, text, created_at) VALUES (?1, ?2, ?3, ?4)");
  st.bind_id_or_null(1, message_id).bind_int(2, agent).bind_text(3, text).bind_double(4, now_seconds());
  st.run();
  const int64_t id = c.last_insert_id();
  insert_journal_entry(c, run, seq, "reply", "{\"message\":" + id_text(message_id) + "}", id);
  tx.commit();
  return id;
}

int64_t AgentStore::journaled_timer(int64_t run, int32_t seq, int64_t agent, double due_at,
                                    std::string_view payload_json) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  require_live(c, run, "journaled_timer");
  if (const auto recorded = recorded_effect(c, run, seq, "timer", "journaled_timer")) return *recorded;
  require_agent(c, agent, "journaled_timer");
  if (!std::isfinite(due_at)) c.fail_plain("journaled_timer: due_at is not a finite time");
  Statement st(c, "INSERT INTO timers (agent, due_at, payload_json, status) VALUES (?1, ?2, ?3, 'pending')");
  st.bind_int(1, agent).bind_double(2, due_at).bind_text(3, payload_json);
  st.run();
  const int64_t id = c.last_insert_id();
  insert_journal_entry(c, run, seq, "timer", "{\"due_at\":" + json_number(due_at) + "}", id);
  tx.commit();
  return id;
}

void AgentStore::complete_run(int64_t run, std::string_view state_json) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  const RunRecord r = require_live(c, run, "complete_run");
  finish_run(c, r, "completed", "", "done");
  // The state is written in the same transaction as the run's end: a crash either keeps the
  // old state with the journal (the handler is replayed) or the new one without it.
  Statement st(c, "UPDATE agents SET state_json = ?2 WHERE id = ?1");
  st.bind_int(1, r.agent).bind_text(2, state_json);
  st.run();
  tx.commit();
}

void AgentStore::fail_run(int64_t run, std::string_view error) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  const RunRecord r = require_live(c, run, "fail_run");
  finish_run(c, r, "failed", error, "failed");
  tx.commit();
}

std::vector<RunRecord> AgentStore::interrupt_running() {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  std::vector<RunRecord> runs;
  {
    Statement st(c, std::string("SELECT ") + kRunColumns + " WHERE status = 'running' ORDER BY id");
    runs = read_all<RunRecord>(st, read_run);
  }
  Statement st(c, "UPDATE runs SET status = 'interrupted' WHERE status = 'running'");
  st.run();
  tx.commit();
  for (auto& r : runs) r.status = "interrupted";
  return runs;
}

std::vector<RunRecord> AgentStore::interrupted_runs() const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kRunColumns + " WHERE status = 'interrupted' ORDER BY id");
  return read_all<RunRecord>(st, read_run);
}

void AgentStore::mark_run_running(int64_t run) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  const RunRecord r = require_run(c, run, "mark_run_running");
  if (r.status == "running") return;
  if (r.status != "interrupted") {
    c.fail_plain("mark_run_running: run " + id_text(run) + " is " + r.status + "; only an interrupted run is re-run");
  }
  Statement st(c, "UPDATE runs SET status = 'running' WHERE id = ?1");
  st.bind_int(1, run);
  st.run();
  tx.commit();
}

// ---- timers ----

std::vector<TimerRecord> AgentStore::due_timers(double now) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kTimerColumns +
                                " WHERE t.status = 'pending' AND t.due_at <= ?1 AND NOT EXISTS (SELECT 1 FROM runs r "
                                "WHERE r.timer_id = t.id AND r.status IN " + kLiveRunStatuses +
                                ") ORDER BY t.due_at, t.id");
  st.bind_double(1, now);
  return read_all<TimerRecord>(st, read_timer);
}

std::optional<double> AgentStore::next_timer_due() const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT t.due_at FROM timers t WHERE t.status = 'pending' AND NOT EXISTS "
                                        "(SELECT 1 FROM runs r WHERE r.timer_id = t.id AND r.status IN ") +
                                kLiveRunStatuses + ") ORDER BY t.due_at, t.id LIMIT 1");
  if (!st.step()) return std::nullopt;
  return st.column_double(0);
}

std::vector<TimerRecord> AgentStore::timers(int64_t agent) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kTimerColumns +
                                " WHERE t.agent = ?1 AND t.status = 'pending' ORDER BY t.due_at, t.id");
  st.bind_int(1, agent);
  return read_all<TimerRecord>(st, read_timer);
}

// ---- replies ----

std::vector<ReplyRecord> AgentStore::replies_to(int64_t message_id) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kReplyColumns + " WHERE message_id = ?1 ORDER BY id");
  st.bind_int(1, message_id);
  return read_all<ReplyRecord>(st, read_reply);
}

std::vector<ReplyRecord> AgentStore::replies_after(int64_t agent, int64_t after_id) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, std::string("SELECT ") + kReplyColumns + " WHERE agent = ?1 AND id > ?2 ORDER BY id");
  st.bind_int(1, agent).bind_int(2, after_id);
  return read_all<ReplyRecord>(st, read_reply);
}

// ---- logs ----

void AgentStore::append_log(int64_t agent, std::string_view level, std::string_view text) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  require_agent(c, agent, "append_log");
  int64_t seq = 1;
  {
    Statement st(c, "SELECT max(seq) FROM logs WHERE agent = ?1");  // one index seek
    st.bind_int(1, agent);
    if (st.step() && !st.is_null(0)) seq = st.column_int(0) + 1;
  }
  {
    Statement st(c, "INSERT INTO logs (agent, seq, at, level, text) VALUES (?1, ?2, ?3, ?4, ?5)");
    st.bind_int(1, agent).bind_int(2, seq).bind_double(3, now_seconds()).bind_text(4, level).bind_text(5, text);
    st.run();
  }
  // Lines are numbered without gaps, so the bound drops the line kLogLinesPerAgent behind
  // (one row in the steady state): no count, no scan.
  Statement st(c, "DELETE FROM logs WHERE agent = ?1 AND seq <= ?2");
  st.bind_int(1, agent).bind_int(2, seq - kLogLinesPerAgent);
  st.run();
  tx.commit();
}

std::vector<LogRecord> AgentStore::logs(int64_t agent, int64_t after_id, int32_t limit) const {
  std::lock_guard lock(impl_->mutex);
  // Within an agent, seq and id grow together: the (agent, seq) index gives id order, and the
  // id filter reads the rowid stored in the index (at most kLogLinesPerAgent entries).
  Statement st(impl_->conn,
               "SELECT id, agent, at, level, text FROM logs WHERE agent = ?1 AND id > ?2 ORDER BY seq LIMIT ?3");
  st.bind_int(1, agent).bind_int(2, after_id).bind_int(3, limit > 0 ? limit : -1);
  return read_all<LogRecord>(st, [](const Statement& row) {
    LogRecord l;
    l.id = row.column_int(0);
    l.agent = row.column_int(1);
    l.at = row.column_double(2);
    l.level = row.column_text(3);
    l.text = row.column_text(4);
    return l;
  });
}

}  // namespace den::runtime
