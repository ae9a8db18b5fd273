// StopStringFilter: nothing past a stop string, nothing held back needlessly.
#include "den/engine/stop_strings.h"
#include "test_support.h"

using den::engine::StopStringFilter;

TEST_CASE("text before a stop string split across pushes is released, the rest dropped") {
  StopStringFilter f({"\nUser:", "###"});
  std::string out = f.push("Hello");
  out += f.push(" world\nUs");
  CHECK(out == "Hello world");  // "\nUs" might start a stop string: held
  out += f.push("er: more");
  CHECK(f.stopped());
  CHECK(out == "Hello world");
  CHECK(f.push("ignored").empty());
}

TEST_CASE("held text comes back when no stop string completes") {
  StopStringFilter f({"STOP"});
  CHECK(f.push("ab ST") == "ab ");
  CHECK(f.push("AR") == "STAR");
  CHECK(f.push("S") == "");
  CHECK(f.flush() == "S");
  CHECK_FALSE(f.stopped());
}

TEST_CASE("no stop strings: everything passes through") {
  StopStringFilter f({});
  CHECK(f.push("abc") == "abc");
  CHECK(f.flush().empty());
}
