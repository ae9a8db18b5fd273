// AgentStore: every method, the journal's replay rules (idempotent store effects, divergence),
// complete_run as one transaction, durability across a reopen and across a killed process, the
// per-agent log bound, timers and replies. Driven only through the public header.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "den/runtime/agent_store.h"
#include "test_support.h"

using namespace den;
using runtime::AgentRecord;
using runtime::AgentStore;
using runtime::AgentStoreError;
using runtime::RunRecord;

namespace {

constexpr uint64_t kHighSession = 0xF00DFACE12345678ull;  // >= 2^63: negative once bit-cast

AgentRecord make_agent(const std::string& name) {
  AgentRecord a;
  a.name = name;
  a.source = "function on_message(ctx, m) ctx.reply('hi') end";
  a.script_path = "/agents/" + name + ".lua";
  a.state_json = R"({"count":0})";
  a.session = kHighSession;
  a.priority = 3;
  a.token_budget = 5000;
  a.tokens_used = 7;
  return a;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// A message queued for `agent` and a run begun for it.
struct MessageRun {
  int64_t message = 0;
  int64_t run = 0;
};

MessageRun begin_message_run(AgentStore& store, int64_t agent, const std::string& body = R"({"text":"hello"})") {
  MessageRun mr;
  mr.message = store.enqueue_message(agent, "client", body);
  mr.run = store.begin_run(agent, "message", mr.message, 0);
  return mr;
}

}  // namespace

TEST_CASE("agent store round-trips an agent and refuses a taken name") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  CHECK(store.schema_version() == AgentStore::kSchemaVersion);
  const double before = now_seconds();
  const int64_t a = store.create_agent(make_agent("alpha"));
  const int64_t b = store.create_agent(make_agent("beta"));
  CHECK(a > 0);
  CHECK(b > a);

  const auto found = store.find_agent("alpha");
  REQUIRE(found.has_value());
  CHECK(found->id == a);
  CHECK(found->name == "alpha");
  CHECK(found->source == make_agent("alpha").source);
  CHECK(found->script_path == "/agents/alpha.lua");
  CHECK(found->state_json == R"({"count":0})");
  CHECK(found->session == kHighSession);
  CHECK(found->priority == 3);
  CHECK(found->token_budget == 5000);
  CHECK(found->tokens_used == 7);
  CHECK(found->status == "active");
  CHECK(found->error.empty());
  CHECK(found->created_at >= before - 1);
  CHECK(found->created_at <= now_seconds() + 1);
  CHECK(store.agent(b)->name == "beta");
  CHECK_FALSE(store.find_agent("gamma").has_value());
  CHECK_FALSE(store.agent(b + 100).has_value());

  CHECK_THROWS_WITH_AS(store.create_agent(make_agent("alpha")), doctest::Contains("'alpha' is taken by agent"),
                       AgentStoreError);
  // The schema's invariants: state is JSON text, the status one of three.
  AgentRecord bad_state = make_agent("gamma");
  bad_state.state_json = "{count:";
  CHECK_THROWS_WITH_AS(store.create_agent(bad_state), doctest::Contains("CHECK constraint failed"), AgentStoreError);
  AgentRecord bad_status = make_agent("gamma");
  bad_status.status = "sleeping";
  CHECK_THROWS_AS(store.create_agent(bad_status), AgentStoreError);

  const auto all = store.agents();
  REQUIRE(all.size() == 2);
  CHECK(all[0].id == a);
  CHECK(all[1].id == b);
}

TEST_CASE("agent store updates status and tokens and refuses unknown agents") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  store.set_agent_status(a, "failed", "on_message: attempt to call a nil value");
  store.add_tokens_used(a, 100);
  store.add_tokens_used(a, 23);
  auto got = store.agent(a);
  CHECK(got->status == "failed");
  CHECK(got->error == "on_message: attempt to call a nil value");
  CHECK(got->tokens_used == 130);

  CHECK_THROWS_AS(store.set_agent_status(a, "paused", ""), AgentStoreError);
  CHECK(store.agent(a)->status == "failed");  // unchanged by the refused write
  CHECK_THROWS_WITH_AS(store.set_agent_status(a + 1, "active", ""), doctest::Contains("no agent"), AgentStoreError);
  CHECK_THROWS_AS(store.add_tokens_used(a + 1, 1), AgentStoreError);
  CHECK_THROWS_AS(store.enqueue_message(a + 1, "client", "{}"), AgentStoreError);
  CHECK_THROWS_AS(store.append_log(a + 1, "info", "x"), AgentStoreError);
  CHECK_THROWS_AS(store.begin_run(a + 1, "start", 0, 0), AgentStoreError);
  CHECK_THROWS_AS(store.delete_agent(a + 1), AgentStoreError);
}

TEST_CASE("agent store deletes an agent with everything of it") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const int64_t b = store.create_agent(make_agent("beta"));

  const auto mr = begin_message_run(store, a);
  store.journal_intent(mr.run, 0, "generate", "{}");
  const int64_t sent = store.journaled_send(mr.run, 1, a, "agent:alpha", R"("self")");
  const int64_t reply = store.journaled_reply(mr.run, 2, mr.message, a, "hi");
  store.journaled_timer(mr.run, 3, a, 100.0, "{}");
  store.append_log(a, "info", "alpha line");
  const auto done = begin_message_run(store, a);
  store.complete_run(done.run, "{}");
  // beta's things, some pointing at alpha's (a message alpha sent stays: it is beta's).
  const auto brun = begin_message_run(store, b);
  const int64_t to_beta = store.journaled_send(mr.run, 4, b, "agent:alpha", "{}");
  store.journaled_reply(brun.run, 0, brun.message, b, "from beta");
  store.append_log(b, "info", "beta line");

  const int64_t newest_message = store.enqueue_message(a, "client", "{}");  // the largest id, deleted below
  store.delete_agent(a);
  CHECK_FALSE(store.agent(a).has_value());
  CHECK_FALSE(store.message(newest_message).has_value());
  CHECK_FALSE(store.find_agent("alpha").has_value());
  CHECK_FALSE(store.message(mr.message).has_value());
  CHECK_FALSE(store.message(sent).has_value());
  CHECK_FALSE(store.run(mr.run).has_value());
  CHECK_FALSE(store.run(done.run).has_value());
  CHECK(store.journal(mr.run).empty());
  CHECK(store.runs(a, 0).empty());
  CHECK(store.timers(a).empty());
  CHECK_FALSE(store.next_timer_due().has_value());
  CHECK(store.replies_to(mr.message).empty());
  CHECK(store.replies_after(a, 0).empty());
  CHECK(store.logs(a, 0, 0).empty());
  CHECK(store.interrupt_running().size() == 1);  // beta's run only

  CHECK(store.message(to_beta).has_value());
  CHECK(store.replies_after(b, 0).size() == 1);
  CHECK(store.logs(b, 0, 0).size() == 1);
  CHECK(store.agents().size() == 1);

  // Ids are never handed out again, not even the largest one.
  const int64_t gamma = store.create_agent(make_agent("gamma"));
  store.delete_agent(gamma);
  const int64_t again = store.create_agent(make_agent("alpha"));
  CHECK(again > gamma);
  CHECK(store.enqueue_message(again, "client", "{}") > newest_message);
  CHECK(store.replies_after(b, 0).at(0).id > reply);
  CHECK_THROWS_AS(store.delete_agent(a), AgentStoreError);
}

TEST_CASE("agent store queues messages oldest first and skips those a live run handles") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const int64_t b = store.create_agent(make_agent("beta"));
  CHECK_FALSE(store.next_queued_message(a).has_value());
  CHECK(store.queued_messages(a) == 0);

  const int64_t m1 = store.enqueue_message(a, "client", R"({"n":1})");
  const int64_t m2 = store.enqueue_message(a, "agent:beta", R"([1,2,3])");
  const int64_t m3 = store.enqueue_message(a, "client", R"("three")");
  const int64_t other = store.enqueue_message(b, "client", "{}");
  CHECK(store.queued_messages(a) == 3);
  auto next = store.next_queued_message(a);
  REQUIRE(next.has_value());
  CHECK(next->id == m1);
  CHECK(next->agent == a);
  CHECK(next->sender == "client");
  CHECK(next->body_json == R"({"n":1})");
  CHECK(next->status == "queued");
  CHECK(next->created_at > 0);
  CHECK(store.message(m2)->sender == "agent:beta");

  // A run handling m1 hides it, running or interrupted, until it completes.
  const int64_t run = store.begin_run(a, "message", m1, 0);
  CHECK(store.next_queued_message(a)->id == m2);
  CHECK(store.queued_messages(a) == 2);
  CHECK(store.interrupt_running().size() == 1);
  CHECK(store.next_queued_message(a)->id == m2);
  store.mark_run_running(run);
  store.complete_run(run, "{}");
  CHECK(store.message(m1)->status == "done");
  CHECK(store.next_queued_message(a)->id == m2);
  CHECK(store.queued_messages(a) == 2);

  // A run needs a queued message of its own agent.
  CHECK_THROWS_WITH_AS(store.begin_run(a, "message", m1, 0), doctest::Contains("not a queued message"),
                       AgentStoreError);
  CHECK_THROWS_AS(store.begin_run(a, "message", other, 0), AgentStoreError);
  CHECK_THROWS_AS(store.begin_run(a, "message", m3 + 100, 0), AgentStoreError);
  CHECK(store.runs(a, 0).size() == 1);

  CHECK_THROWS_WITH_AS(store.enqueue_message(a, "client", "not json"), doctest::Contains("CHECK constraint failed"),
                       AgentStoreError);
  CHECK_THROWS_AS(store.enqueue_message(a, "client", ""), AgentStoreError);
  CHECK(store.queued_messages(a) == 2);
  CHECK(store.next_queued_message(b)->id == other);
}

TEST_CASE("agent store journals intents and results and refuses a diverging replay") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const int64_t run = store.begin_run(a, "start", 0, 0);
  const auto r = store.run(run);
  REQUIRE(r.has_value());
  CHECK(r->agent == a);
  CHECK(r->trigger == "start");
  CHECK(r->message_id == 0);
  CHECK(r->timer_id == 0);
  CHECK(r->status == "running");
  CHECK(r->started_at > 0);
  CHECK(r->ended_at == 0);

  store.journal_intent(run, 0, "generate", R"({"history":3})");
  store.journal_intent(run, 1, "tool", R"({"name":"fetch"})");
  auto j = store.journal(run);
  REQUIRE(j.size() == 2);
  CHECK(j[0].seq == 0);
  CHECK(j[0].kind == "generate");
  CHECK(j[0].intent_json == R"({"history":3})");
  CHECK_FALSE(j[0].result_json.has_value());
  store.journal_result(run, 0, R"("once upon a time")");
  j = store.journal(run);
  CHECK(j[0].result_json == R"("once upon a time")");
  CHECK_FALSE(j[1].result_json.has_value());

  // A replay reaching a journaled step: the same kind changes nothing...
  store.journal_intent(run, 0, "generate", R"({"history":99})");
  j = store.journal(run);
  CHECK(j[0].intent_json == R"({"history":3})");
  CHECK(j[0].result_json == R"("once upon a time")");
  // ...another kind is a replay that went elsewhere.
  CHECK_THROWS_WITH_AS(store.journal_intent(run, 0, "tool", "{}"), doctest::Contains("diverged"), AgentStoreError);
  CHECK_THROWS_WITH_AS(store.journaled_send(run, 1, a, "agent:alpha", "{}"),
                       doctest::Contains("journaled as 'tool' but the handler now does 'send'"), AgentStoreError);
  CHECK(store.queued_messages(a) == 0);  // the refused send left no message

  CHECK_THROWS_WITH_AS(store.journal_result(run, 7, "1"), doctest::Contains("no journal entry"), AgentStoreError);
  CHECK_THROWS_AS(store.journal_intent(run, 2, "generate", "{oops"), AgentStoreError);
  CHECK_THROWS_AS(store.journal_result(run, 1, "{oops"), AgentStoreError);
  CHECK(store.journal(run).size() == 2);
  CHECK_FALSE(store.journal(run)[1].result_json.has_value());

  // Journal writes belong to a live run.
  CHECK_THROWS_AS(store.journal_intent(run + 1, 0, "generate", "{}"), AgentStoreError);
  store.complete_run(run, "{}");
  CHECK_THROWS_WITH_AS(store.journal_intent(run, 5, "generate", "{}"), doctest::Contains("not running"),
                       AgentStoreError);
  CHECK_THROWS_AS(store.journaled_send(run, 5, a, "x", "{}"), AgentStoreError);
}

TEST_CASE("agent store journaled send, reply and timer are idempotent under replay") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const int64_t b = store.create_agent(make_agent("beta"));
  const auto mr = begin_message_run(store, a);

  const int64_t sent = store.journaled_send(mr.run, 1, b, "agent:alpha", R"({"ask":"weather"})");
  const int64_t reply = store.journaled_reply(mr.run, 2, mr.message, a, "it rains");
  const int64_t timer = store.journaled_timer(mr.run, 3, a, 1234.5, R"({"wake":true})");
  const int64_t free_reply = store.journaled_reply(mr.run, 4, 0, a, "to nobody in particular");

  // The replay: same steps, same ids, nothing added.
  for (int pass = 0; pass < 2; ++pass) {
    CAPTURE(pass);
    CHECK(store.journaled_send(mr.run, 1, b, "agent:alpha", R"({"ask":"weather"})") == sent);
    CHECK(store.journaled_reply(mr.run, 2, mr.message, a, "it rains") == reply);
    CHECK(store.journaled_timer(mr.run, 3, a, 1234.5, R"({"wake":true})") == timer);
    CHECK(store.journaled_reply(mr.run, 4, 0, a, "to nobody in particular") == free_reply);
  }
  CHECK(store.queued_messages(b) == 1);
  const auto msg = store.message(sent);
  REQUIRE(msg.has_value());
  CHECK(msg->agent == b);
  CHECK(msg->sender == "agent:alpha");
  CHECK(msg->body_json == R"({"ask":"weather"})");
  const auto replies = store.replies_to(mr.message);
  REQUIRE(replies.size() == 1);
  CHECK(replies[0].id == reply);
  CHECK(replies[0].agent == a);
  CHECK(replies[0].message_id == mr.message);
  CHECK(replies[0].text == "it rains");
  const auto all_replies = store.replies_after(a, 0);
  REQUIRE(all_replies.size() == 2);
  CHECK(all_replies[1].message_id == 0);
  const auto timers = store.timers(a);
  REQUIRE(timers.size() == 1);
  CHECK(timers[0].id == timer);
  CHECK(timers[0].due_at == 1234.5);
  CHECK(timers[0].payload_json == R"({"wake":true})");
  CHECK(timers[0].status == "pending");

  const auto j = store.journal(mr.run);
  REQUIRE(j.size() == 4);
  CHECK(j[0].kind == "send");
  CHECK(j[0].result_json == std::to_string(sent));
  CHECK(j[1].kind == "reply");
  CHECK(j[1].result_json == std::to_string(reply));
  CHECK(j[2].kind == "timer");
  CHECK(j[2].result_json == std::to_string(timer));
  CHECK(j[3].kind == "reply");

  // The same steps as other effects: the replay diverged; nothing is written.
  CHECK_THROWS_WITH_AS(store.journaled_reply(mr.run, 1, mr.message, a, "x"), doctest::Contains("diverged"),
                       AgentStoreError);
  CHECK_THROWS_WITH_AS(store.journaled_timer(mr.run, 2, a, 1.0, "{}"), doctest::Contains("diverged"),
                       AgentStoreError);
  CHECK_THROWS_WITH_AS(store.journaled_send(mr.run, 3, b, "x", "{}"), doctest::Contains("diverged"),
                       AgentStoreError);
  // An effect whose write fails is not journaled either: one transaction.
  CHECK_THROWS_AS(store.journaled_send(mr.run, 5, b, "agent:alpha", "{bad"), AgentStoreError);
  CHECK_THROWS_AS(store.journaled_send(mr.run, 5, b + 100, "agent:alpha", "{}"), AgentStoreError);
  CHECK_THROWS_AS(store.journaled_reply(mr.run, 5, mr.message + 100, a, "x"), AgentStoreError);
  CHECK_THROWS_AS(store.journaled_timer(mr.run, 5, a, 1.0, ""), AgentStoreError);
  CHECK_THROWS_AS(store.journaled_timer(mr.run, 5, a, std::nan(""), "{}"), AgentStoreError);
  CHECK(store.journal(mr.run).size() == 4);
  CHECK(store.queued_messages(b) == 1);
  CHECK(store.replies_after(a, 0).size() == 2);
  CHECK(store.timers(a).size() == 1);
  // An intent-only entry of a store kind has no id to return.
  store.journal_intent(mr.run, 6, "send", "{}");
  CHECK_THROWS_WITH_AS(store.journaled_send(mr.run, 6, b, "x", "{}"), doctest::Contains("without the id"),
                       AgentStoreError);
}

TEST_CASE("agent store complete_run commits state, run, trigger and journal together") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const auto mr = begin_message_run(store, a);
  store.journal_intent(mr.run, 0, "generate", "{}");
  store.journal_result(mr.run, 0, R"("hi")");
  store.journaled_reply(mr.run, 1, mr.message, a, "hi");

  store.complete_run(mr.run, R"({"count":1})");
  CHECK(store.agent(a)->state_json == R"({"count":1})");
  const auto r = store.run(mr.run);
  CHECK(r->status == "completed");
  CHECK(r->error.empty());
  CHECK(r->ended_at >= r->started_at);
  CHECK(r->ended_at > 0);
  CHECK(store.message(mr.message)->status == "done");
  CHECK(store.journal(mr.run).empty());
  CHECK(store.replies_to(mr.message).size() == 1);  // the effects stay, only the journal goes
  CHECK_THROWS_WITH_AS(store.complete_run(mr.run, "{}"), doctest::Contains("is completed, not running"),
                       AgentStoreError);
  CHECK_THROWS_AS(store.complete_run(mr.run + 100, "{}"), AgentStoreError);

  // A timer's run fires the timer.
  const int64_t start = store.begin_run(a, "start", 0, 0);
  const int64_t timer = store.journaled_timer(start, 0, a, 10.0, "{}");
  store.complete_run(start, R"({"count":2})");
  const int64_t timer_run = store.begin_run(a, "timer", 0, timer);
  CHECK(store.run(timer_run)->timer_id == timer);
  store.complete_run(timer_run, R"({"count":3})");
  CHECK(store.timers(a).empty());
  CHECK(store.due_timers(1e12).empty());
  CHECK(store.agent(a)->state_json == R"({"count":3})");
  CHECK_THROWS_WITH_AS(store.begin_run(a, "timer", 0, timer), doctest::Contains("not a pending timer"),
                       AgentStoreError);

  const auto runs = store.runs(a, 0);
  REQUIRE(runs.size() == 3);
  CHECK(runs[0].id == timer_run);  // newest first
  CHECK(runs[2].id == mr.run);
  CHECK(store.runs(a, 2).size() == 2);
}

// complete_run writes the run, the message and the journal before the state; a state that breaks
// CHECK(json_valid(state_json)) fails the last statement, so only a real transaction leaves no trace.
TEST_CASE("agent store complete_run rolls back entirely when the state is not JSON") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const auto mr = begin_message_run(store, a);
  store.journal_intent(mr.run, 0, "generate", "{}");
  store.journal_result(mr.run, 0, R"("hi")");
  const int64_t reply = store.journaled_reply(mr.run, 1, mr.message, a, "hi");
  const int64_t timer = store.journaled_timer(mr.run, 2, a, 5.0, "{}");
  const int64_t timer_run = store.begin_run(a, "timer", 0, timer);

  for (const std::string bad : {"{count:", "", "undefined"}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(store.complete_run(mr.run, bad), doctest::Contains("CHECK constraint failed"),
                         AgentStoreError);
    CHECK_THROWS_AS(store.complete_run(timer_run, bad), AgentStoreError);
  }
  const auto r = store.run(mr.run);
  CHECK(r->status == "running");
  CHECK(r->ended_at == 0);
  CHECK(store.message(mr.message)->status == "queued");
  CHECK(store.journal(mr.run).size() == 3);
  CHECK(store.agent(a)->state_json == R"({"count":0})");
  CHECK(store.timers(a).size() == 1);  // not fired
  CHECK(store.run(timer_run)->status == "running");

  // The same run then completes, and replays of its effects still find their ids until then.
  CHECK(store.journaled_reply(mr.run, 1, mr.message, a, "hi") == reply);
  store.complete_run(mr.run, R"({"count":1})");
  CHECK(store.agent(a)->state_json == R"({"count":1})");
  CHECK(store.message(mr.message)->status == "done");
  CHECK(store.journal(mr.run).empty());
}

TEST_CASE("agent store fail_run keeps the state and ends the trigger") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const auto mr = begin_message_run(store, a);
  store.journal_intent(mr.run, 0, "generate", "{}");
  const int64_t timer = store.journaled_timer(mr.run, 1, a, 5.0, "{}");

  store.fail_run(mr.run, "on_message: boom");
  const auto r = store.run(mr.run);
  CHECK(r->status == "failed");
  CHECK(r->error == "on_message: boom");
  CHECK(r->ended_at > 0);
  CHECK(store.message(mr.message)->status == "failed");
  CHECK(store.journal(mr.run).empty());
  CHECK(store.agent(a)->state_json == R"({"count":0})");
  CHECK_FALSE(store.next_queued_message(a).has_value());  // not retried forever
  CHECK(store.timers(a).size() == 1);  // its effects stay
  CHECK_THROWS_AS(store.fail_run(mr.run, "again"), AgentStoreError);

  const int64_t timer_run = store.begin_run(a, "timer", 0, timer);
  store.fail_run(timer_run, "on_timer: boom");
  CHECK(store.timers(a).empty());

  // An interrupted run can be failed without being re-run (its script no longer loads).
  const auto stuck = begin_message_run(store, a);
  store.interrupt_running();
  store.fail_run(stuck.run, "script does not load");
  CHECK(store.run(stuck.run)->status == "failed");
  CHECK(store.message(stuck.message)->status == "failed");
  CHECK(store.interrupted_runs().empty());
}

TEST_CASE("agent store interrupts running runs and marks them running again") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const int64_t b = store.create_agent(make_agent("beta"));
  CHECK(store.interrupt_running().empty());
  const int64_t first = store.begin_run(b, "start", 0, 0);
  const int64_t done = store.begin_run(a, "start", 0, 0);
  const int64_t second = store.begin_run(a, "context_full", 0, 0);
  store.complete_run(done, "{}");
  store.journal_intent(second, 0, "generate", "{}");

  const auto interrupted = store.interrupt_running();
  REQUIRE(interrupted.size() == 2);
  CHECK(interrupted[0].id == first);  // oldest first
  CHECK(interrupted[1].id == second);
  CHECK(interrupted[1].trigger == "context_full");
  for (const auto& r : interrupted) CHECK(r.status == "interrupted");
  CHECK(store.run(second)->status == "interrupted");
  CHECK(store.run(second)->ended_at == 0);
  CHECK(store.run(done)->status == "completed");
  CHECK(store.journal(second).size() == 1);  // kept for the replay
  CHECK(store.interrupt_running().empty());

  const auto pending = store.interrupted_runs();
  REQUIRE(pending.size() == 2);
  CHECK(pending[0].id == first);
  CHECK(pending[1].id == second);

  // An interrupted run is still live: its replay may journal before (or without) being marked.
  store.journal_intent(second, 0, "generate", "{}");
  store.journal_intent(second, 1, "tool", "{}");
  CHECK(store.journal(second).size() == 2);
  store.complete_run(first, R"({"replayed":true})");
  CHECK(store.agent(b)->state_json == R"({"replayed":true})");
  CHECK(store.interrupted_runs().size() == 1);
  store.mark_run_running(second);
  store.mark_run_running(second);  // already running: nothing to do
  CHECK(store.run(second)->status == "running");
  CHECK(store.interrupted_runs().empty());
  store.journal_intent(second, 0, "generate", "{}");  // the replay reaches step 0 again
  CHECK(store.journal(second).size() == 2);
  store.complete_run(second, "{}");
  CHECK_THROWS_WITH_AS(store.mark_run_running(done), doctest::Contains("only an interrupted run"), AgentStoreError);
  CHECK_THROWS_AS(store.mark_run_running(second + 100), AgentStoreError);
}

TEST_CASE("agent store keeps everything across a reopen") {
  test::TempDir dir;
  const auto path = dir.file("agents.sqlite");
  int64_t a = 0, b = 0, queued = 0, running_run = 0, done_run = 0, timer = 0, reply = 0;
  {
    AgentStore store(path);
    a = store.create_agent(make_agent("alpha"));
    b = store.create_agent(make_agent("beta"));
    store.set_agent_status(b, "stopped", "by the operator");
    store.add_tokens_used(a, 10);
    const auto done = begin_message_run(store, a);
    done_run = done.run;
    reply = store.journaled_reply(done.run, 0, done.message, a, "answer");
    timer = store.journaled_timer(done.run, 1, a, 42.0, R"({"t":1})");
    store.complete_run(done.run, R"({"count":5})");
    queued = store.enqueue_message(a, "client", R"({"later":true})");
    running_run = store.begin_run(b, "start", 0, 0);
    store.journal_intent(running_run, 0, "generate", R"({"history":0})");
    store.append_log(a, "warn", "low budget");
  }
  AgentStore store(path);
  CHECK(store.schema_version() == AgentStore::kSchemaVersion);
  const auto alpha = store.agent(a);
  REQUIRE(alpha.has_value());
  CHECK(alpha->state_json == R"({"count":5})");
  CHECK(alpha->tokens_used == 17);
  CHECK(alpha->session == kHighSession);
  CHECK(store.agent(b)->status == "stopped");
  CHECK(store.agent(b)->error == "by the operator");
  CHECK(store.next_queued_message(a)->id == queued);
  CHECK(store.run(done_run)->status == "completed");
  CHECK(store.replies_after(a, 0).at(0).id == reply);
  CHECK(store.timers(a).at(0).id == timer);
  CHECK(store.next_timer_due() == 42.0);
  const auto logs = store.logs(a, 0, 0);
  REQUIRE(logs.size() == 1);
  CHECK(logs[0].level == "warn");
  CHECK(logs[0].text == "low budget");
  CHECK(logs[0].at > 0);
  // The unfinished run: still running in the file, until the host interrupts it.
  CHECK(store.run(running_run)->status == "running");
  const auto interrupted = store.interrupt_running();
  REQUIRE(interrupted.size() == 1);
  CHECK(interrupted[0].id == running_run);
  const auto j = store.journal(running_run);
  REQUIRE(j.size() == 1);
  CHECK(j[0].intent_json == R"({"history":0})");
}

// A child process begins a run, journals a generate and a send, and is SIGKILLed before
// complete_run. The parent reopens: the run comes back interrupted with its journal, the send
// happened exactly once, and the replayed send returns the same message.
TEST_CASE("agent store recovers a run whose process was killed mid-handler") {
  test::TempDir dir;
  const auto path = dir.file("agents.sqlite");
  int64_t a = 0, b = 0, trigger = 0;
  {
    AgentStore store(path);
    a = store.create_agent(make_agent("alpha"));
    b = store.create_agent(make_agent("beta"));
    trigger = store.enqueue_message(a, "client", R"({"text":"ping beta"})");
  }  // closed before fork: no SQLite connection crosses it

  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    try {
      AgentStore store(path);
      const int64_t run = store.begin_run(a, "message", trigger, 0);
      store.journal_intent(run, 0, "generate", R"({"history":1})");
      store.journal_result(run, 0, R"("I will ask beta")");
      store.journaled_send(run, 1, b, "agent:alpha", R"({"text":"ping"})");
      raise(SIGKILL);  // mid-handler: no complete_run, no destructor, no close
    } catch (...) {
    }
    _exit(3);  // the kill never came
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);

  AgentStore store(path);
  const auto interrupted = store.interrupt_running();
  REQUIRE(interrupted.size() == 1);
  const RunRecord& run = interrupted[0];
  CHECK(run.agent == a);
  CHECK(run.message_id == trigger);
  CHECK(run.status == "interrupted");
  const auto j = store.journal(run.id);
  REQUIRE(j.size() == 2);
  CHECK(j[0].kind == "generate");
  CHECK(j[0].result_json == R"("I will ask beta")");
  CHECK(j[1].kind == "send");
  REQUIRE(j[1].result_json.has_value());
  CHECK(store.queued_messages(b) == 1);
  const auto sent = store.next_queued_message(b);
  REQUIRE(sent.has_value());
  CHECK(std::to_string(sent->id) == *j[1].result_json);
  CHECK(sent->body_json == R"({"text":"ping"})");
  CHECK(store.message(trigger)->status == "queued");
  CHECK_FALSE(store.next_queued_message(a).has_value());  // its trigger is being handled

  // The host re-runs the handler: the journaled steps replay without repeating.
  store.mark_run_running(run.id);
  store.journal_intent(run.id, 0, "generate", R"({"history":1})");
  CHECK(store.journaled_send(run.id, 1, b, "agent:alpha", R"({"text":"ping"})") == sent->id);
  CHECK(store.queued_messages(b) == 1);
  store.complete_run(run.id, R"({"asked":true})");
  CHECK(store.message(trigger)->status == "done");
  CHECK(store.journal(run.id).empty());
  CHECK(store.interrupted_runs().empty());
}

TEST_CASE("agent store keeps the newest 1000 log lines per agent") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const int64_t b = store.create_agent(make_agent("beta"));
  constexpr int kLines = AgentStore::kLogLinesPerAgent + 25;
  for (int i = 0; i < kLines; ++i) {
    store.append_log(a, i % 2 == 0 ? "info" : "warn", "line " + std::to_string(i));
    if (i % 400 == 0) store.append_log(b, "error", "beta " + std::to_string(i));
  }
  const auto logs = store.logs(a, 0, 0);
  REQUIRE(logs.size() == static_cast<size_t>(AgentStore::kLogLinesPerAgent));
  CHECK(logs.front().text == "line 25");
  CHECK(logs.back().text == "line " + std::to_string(kLines - 1));
  CHECK(logs.back().level == "info");
  for (size_t i = 1; i < logs.size(); ++i) REQUIRE(logs[i].id > logs[i - 1].id);
  for (const auto& l : logs) REQUIRE(l.agent == a);
  const auto beta = store.logs(b, 0, 0);
  REQUIRE(beta.size() == 3);
  CHECK(beta[0].text == "beta 0");
  CHECK(beta[2].text == "beta 800");

  // Paging with after_id and limit.
  const auto page = store.logs(a, logs[10].id, 5);
  REQUIRE(page.size() == 5);
  CHECK(page[0].id == logs[11].id);
  CHECK(page[4].id == logs[15].id);
  CHECK(store.logs(a, logs.back().id, 10).empty());
  CHECK(store.logs(a, beta[1].id, 0).size() < logs.size());
}

TEST_CASE("agent store lists due timers and the next one, skipping those being handled") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const int64_t b = store.create_agent(make_agent("beta"));
  CHECK_FALSE(store.next_timer_due().has_value());
  CHECK(store.due_timers(1e12).empty());
  const int64_t run = store.begin_run(a, "start", 0, 0);
  const int64_t t200 = store.journaled_timer(run, 0, a, 200.0, R"({"at":200})");
  const int64_t t50 = store.journaled_timer(run, 1, b, 50.0, "{}");
  const int64_t t100 = store.journaled_timer(run, 2, a, 100.0, "{}");
  const int64_t t100b = store.journaled_timer(run, 3, b, 100.0, "{}");
  store.complete_run(run, "{}");

  CHECK(store.next_timer_due() == 50.0);
  const auto due = store.due_timers(100.0);
  REQUIRE(due.size() == 3);
  CHECK(due[0].id == t50);
  CHECK(due[1].id == t100);  // same due time: creation order
  CHECK(due[2].id == t100b);
  CHECK(due[0].agent == b);
  CHECK(store.due_timers(49.9).empty());
  const auto of_a = store.timers(a);
  REQUIRE(of_a.size() == 2);
  CHECK(of_a[0].id == t100);
  CHECK(of_a[1].id == t200);
  CHECK(of_a[1].payload_json == R"({"at":200})");

  // A timer whose run is in progress is not due again; timers() still lists it.
  const int64_t fire = store.begin_run(b, "timer", 0, t50);
  CHECK(store.next_timer_due() == 100.0);
  CHECK(store.due_timers(100.0).size() == 2);
  CHECK(store.timers(b).size() == 2);
  store.complete_run(fire, "{}");
  CHECK(store.timers(b).size() == 1);
  CHECK(store.due_timers(1e12).size() == 3);
}

TEST_CASE("agent store orders replies by id per message and per agent") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  const int64_t a = store.create_agent(make_agent("alpha"));
  const int64_t b = store.create_agent(make_agent("beta"));
  const auto ma = begin_message_run(store, a);
  const auto mb = begin_message_run(store, b);
  std::vector<int64_t> of_a, of_b;
  for (int32_t i = 0; i < 4; ++i) {
    of_a.push_back(store.journaled_reply(ma.run, i, ma.message, a, "a" + std::to_string(i)));
    of_b.push_back(store.journaled_reply(mb.run, i, mb.message, b, "b" + std::to_string(i)));
  }
  const auto to_a = store.replies_to(ma.message);
  REQUIRE(to_a.size() == 4);
  for (size_t i = 0; i < 4; ++i) {
    CHECK(to_a[i].id == of_a[i]);
    CHECK(to_a[i].text == "a" + std::to_string(i));
    CHECK(to_a[i].created_at > 0);
  }
  const auto after = store.replies_after(a, of_a[1]);
  REQUIRE(after.size() == 2);
  CHECK(after[0].id == of_a[2]);
  CHECK(after[1].id == of_a[3]);
  // A cursor taken from another agent's ids still works: ids are global and increasing.
  const auto after_b = store.replies_after(b, of_a[2]);
  REQUIRE(after_b.size() == 2);
  CHECK(after_b[0].id == of_b[2]);
  CHECK(store.replies_after(a, of_a[3]).empty());
  CHECK(store.replies_to(ma.message + 1000).empty());
}

TEST_CASE("agent store refuses a file that is not an SQLite database") {
  test::TempDir dir;
  const auto path = dir.file("agents.sqlite");
  test::write_file(path, "these are not the pages you are looking for, at least sixteen bytes");
  CHECK_THROWS_WITH_AS(AgentStore{path}, doctest::Contains("not an SQLite database"), AgentStoreError);
  CHECK(test::read_file(path).starts_with("these are not"));  // left untouched
}

TEST_CASE("agent store serves several threads at once") {
  test::TempDir dir;
  AgentStore store(dir.file("agents.sqlite"));
  constexpr int kThreads = 4, kEach = 25;
  std::vector<int64_t> agents;
  for (int t = 0; t < kThreads; ++t) agents.push_back(store.create_agent(make_agent("agent" + std::to_string(t))));
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&store, &agents, t] {
      const int64_t run = store.begin_run(agents[t], "start", 0, 0);
      for (int i = 0; i < kEach; ++i) {
        store.journaled_send(run, i, agents[(t + 1) % kThreads], "agent", "{}");
        store.append_log(agents[t], "info", std::to_string(i));
      }
      store.complete_run(run, "{}");
    });
  }
  for (auto& th : threads) th.join();
  for (int64_t id : agents) {
    CHECK(store.queued_messages(id) == kEach);
    CHECK(store.logs(id, 0, 0).size() == static_cast<size_t>(kEach));
  }
}
