// `den bench agents` end to end on the CPU backend, the CI smoke test of issue #8: every policy
// runs the same seeded agent population against its own `den serve` on stories260K with a fast
// pool far smaller than the agents' histories. Checks that each policy completed turns, that
// results.json holds them, that the workload was the same for all, that recomputing costs what
// the tiered hierarchy saves, and that the ratios are printed. Also: bad options are refused.
#include <chrono>
#include <map>

#include <boost/json.hpp>

#include "test_support.h"

namespace json = boost::json;
using den::test::run_den;
using den::test::TempDir;

namespace {

const json::object* find_policy(const json::array& policies, const std::string& name) {
  for (const json::value& p : policies) {
    if (p.at("policy").as_string() == name) return &p.as_object();
  }
  return nullptr;
}

int64_t integer(const json::value& v) { return v.to_number<int64_t>(); }

// (agent, turn) -> tokens appended: what the seeded workload sent, whatever the timing.
std::map<std::pair<int64_t, int64_t>, int64_t> appended_by_turn(const json::object& policy) {
  const json::array& fields = policy.at("turns").at("fields").as_array();
  size_t agent = 0, turn = 0, appended = 0;
  for (size_t i = 0; i < fields.size(); ++i) {
    if (fields[i].as_string() == "agent") agent = i;
    if (fields[i].as_string() == "turn") turn = i;
    if (fields[i].as_string() == "appended") appended = i;
  }
  std::map<std::pair<int64_t, int64_t>, int64_t> out;
  for (const json::value& r : policy.at("turns").at("records").as_array()) {
    const json::array& record = r.as_array();
    out[{integer(record[agent]), integer(record[turn])}] = integer(record[appended]);
  }
  return out;
}

}  // namespace

TEST_CASE("bench agents: five policies run the same agents on the CPU backend, recompute recomputes most") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::stories_model()), "../shared/models/stories260K is absent");
  TempDir dir;
  const auto started = std::chrono::steady_clock::now();
  // A fast pool of 1 MiB (816 tokens of stories260K's KV) against six agents whose histories
  // grow to a few hundred tokens each; a DRAM tier of host memory, so that `tiered` differs
  // from `hbm-only` on the CPU backend too (kv.dram auto is 0 there).
  const auto r = run_den({"bench", "agents", "-m", den::test::stories_model(), "--backend", "cpu", "-t", "1",
                          "--ctx", "512", "--hbm", "1MiB", "--dram", "4MiB", "--ssd", "64MiB", "--agents", "6",
                          "--turns", "8", "--system-tokens", "64", "--first-tokens", "96", "--user-tokens", "24",
                          "--response-tokens", "24", "--tool-result-tokens", "48", "--time-scale", "0.01",
                          "--duration", "15", "--drain", "5", "--state-root", dir.path().string(), "--out",
                          dir.file("out")});
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  MESSAGE("den bench agents took " << seconds << " s; its table:\n" << r.out);
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  CHECK(seconds < 120);
  CHECK(r.out.find("ratios: recompute/tiered TTFT p50") != std::string::npos);
  CHECK(r.out.find("hbm-only/tiered TTFT p50") != std::string::npos);
  CHECK(r.out.find("STUCK") == std::string::npos);

  const json::value results = json::parse(den::test::read_file(dir.file("out/results.json")));
  const json::array& policies = results.at("policies").as_array();
  CHECK(policies.size() == 5);
  const json::object* tiered = find_policy(policies, "tiered");
  REQUIRE(tiered != nullptr);
  const auto reference = appended_by_turn(*tiered);
  for (const char* name : {"recompute", "hbm-only", "tiered", "tiered-no-cost-model", "tiered-no-layerwise"}) {
    CAPTURE(name);
    const json::object* p = find_policy(policies, name);
    REQUIRE(p != nullptr);
    const json::object& m = p->at("metrics").as_object();
    CHECK(integer(m.at("turns_completed")) > 0);
    CHECK(integer(m.at("turns_failed")) == 0);
    CHECK_FALSE(m.at("daemon_stuck").as_bool());
    CHECK(m.at("ttft_ms").at("p50").to_number<double>() > 0);
    CHECK(!p->at("occupancy").at("samples").as_array().empty());
    // The seeded workload: every turn both runs have appended the same number of tokens.
    for (const auto& [key, appended] : appended_by_turn(*p)) {
      const auto other = reference.find(key);
      if (other != reference.end()) CHECK(other->second == appended);
    }
  }
  const auto tokens = [&](const char* policy, const char* kind) {
    return integer(find_policy(policies, policy)->at("metrics").at("tokens").at(kind));
  };
  CHECK(tokens("recompute", "recomputed") > tokens("tiered", "recomputed"));
  CHECK(tokens("recompute", "recomputed_client") > tokens("tiered", "recomputed_client"));
  CHECK(tokens("recompute", "loaded") == 0);
  CHECK(tokens("tiered", "loaded") > 0);  // the DRAM tier brought KV back
  CHECK(results.at("ratios").as_object().contains("recompute_over_tiered_ttft_p50"));
}

TEST_CASE("bench agents: bad options are refused with a message that names them") {
  const auto unknown = run_den({"bench", "agents", "--policies", "tiered,lru"});
  CHECK(unknown.exit_code != 0);
  CHECK(unknown.err.find("unknown policy 'lru'") != std::string::npos);
  CHECK(unknown.err.find("hbm-only") != std::string::npos);  // the known ones are listed

  const auto both = run_den({"bench", "agents", "--socket", "/nonexistent/den.sock", "--policies", "tiered"});
  CHECK(both.exit_code != 0);
  CHECK(both.err.find("--policies") != std::string::npos);
  CHECK(both.err.find("--socket") != std::string::npos);

  const auto size = run_den({"bench", "agents", "--hbm", "8 gigs"});
  CHECK(size.exit_code != 0);
  CHECK(size.err.find("--hbm expects a size") != std::string::npos);

  const auto nobody = run_den({"bench", "agents", "--socket", "/nonexistent/den.sock"});
  CHECK(nobody.exit_code != 0);
  CHECK(nobody.err.find("no daemon at /nonexistent/den.sock") != std::string::npos);
}
