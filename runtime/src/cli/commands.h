// The `den` subcommands. Each add_*_command registers its options and its action on the
// CLI11 application; main() only parses and reports errors. Private to runtime.
#pragma once

#include <CLI/CLI.hpp>

#include "den/engine/sampler.h"

namespace den::runtime::cli {

void add_generate_command(CLI::App& app);
void add_chat_command(CLI::App& app);
void add_tokenize_command(CLI::App& app);
void add_model_commands(CLI::App& app);
void add_bench_commands(CLI::App& app);
void add_bench_resume_command(CLI::App& bench);  // under `den bench`
void add_bench_abuse_command(CLI::App& bench);   // under `den bench`
void add_bench_agents_command(CLI::App& bench);  // under `den bench`
void add_serve_command(CLI::App& app);
// `den sessions ls|show|pin|unpin|checkpoint|hibernate|wake|rm` and `den stats`: clients of
// the daemon's socket.
void add_sessions_commands(CLI::App& app);
// `den agent spawn|send|attach|ps|logs|get|stop|rm`: the daemon's Lua agents.
void add_agent_commands(CLI::App& app);

// --temp, --top-k, --top-p, --min-p, --repeat-penalty, --repeat-last-n, --presence-penalty,
// --frequency-penalty, --seed. `seed_given` tells whether --seed was on the command line.
void add_sampling_options(CLI::App& command, engine::SamplingParams& params, bool& seed_given);
// Picks a random seed when none was given and says which on stderr, so a run can be repeated.
void finalize_seed(engine::SamplingParams& params, bool seed_given);

}  // namespace den::runtime::cli
