// Failpoints: named places in the storage and commit paths where a test makes Den crash or
// fail on purpose, to prove that a crash or an error there loses nothing acknowledged.
// `failpoint("checkpoint.after_fsync")` costs one relaxed atomic load while nothing is armed.
//
// Arming: arm_failpoint() from a test in the same process, or DEN_FAILPOINTS in the
// environment of a whole daemon (read by arm_failpoints_from_env(), which `den serve` calls
// first thing):
//
//   DEN_FAILPOINTS="checkpoint.after_fsync=crash@3,sqlite.before_commit=error"
//
// `crash` kills the process with SIGKILL (no destructors, no flush: the state on disk is what
// a power-less crash at that instant leaves, page cache aside); `error` throws FailpointError
// (an IoError with EIO) for the code around it to handle as a failed I/O call. `@N` fires on
// the Nth hit of that point (1-based; default 1) and only then.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "den/memory/file_io.h"

namespace den::memory {

enum class FailAction { crash, error };

class FailpointError : public IoError {
 public:
  explicit FailpointError(std::string_view name);
};

// Every failpoint there is, in the order of the paths they sit on, with where each is.
// `errors`: whether an injected error means anything there. After a commit has succeeded, or
// where no I/O happens, nothing real can fail: those points only crash.
struct FailpointInfo {
  std::string_view name;
  std::string_view where;
  bool errors = true;
};
const std::vector<FailpointInfo>& known_failpoints();

// Hit a failpoint: crashes or throws when it is armed and this is the hit it waits for.
void failpoint(std::string_view name);

// Throws std::invalid_argument for a name that is not in known_failpoints(), on_hit < 1, or
// FailAction::error at a point that only crashes.
void arm_failpoint(std::string_view name, FailAction action, int64_t on_hit = 1);
void disarm_failpoints();
// Hits of `name` counted since it was armed (0 when it is not armed).
int64_t failpoint_hits(std::string_view name);

// Arms what DEN_FAILPOINTS says; throws std::invalid_argument naming the bad entry. Returns
// the armed names (empty when the variable is unset or empty).
std::vector<std::string> arm_failpoints_from_env();

}  // namespace den::memory
