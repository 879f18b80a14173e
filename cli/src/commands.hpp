// The parallax subcommands: each registers its flags on a CLI11 app and returns the function
// that runs it. main.cpp maps InputError to exit code 2 and a one-line message.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/core/plan.hpp"
#include "parallax/core/stack.hpp"
#include "parallax/models/model_loader.hpp"

#include <CLI/CLI.hpp>

#include <functional>

namespace parallax::cli {

using Run = std::function<int()>;

Run register_models(CLI::App& app);
Run register_clusters(CLI::App& app);
Run register_stacks(CLI::App& app);
Run register_plan(CLI::App& app);
Run register_simulate(CLI::App& app);
Run register_train(CLI::App& app);
Run register_calibrate(CLI::App& app);
Run register_compare(CLI::App& app);
Run register_export(CLI::App& app);
Run register_launch(CLI::App& app);

// The process's own command line (main stores it), for `train --backend cuda`, which hands
// itself over to the CUDA-linked twin binary.
void set_command_line(int argc, char** argv);

// --model, --cluster (required) and --gpus, as plan, simulate and export take them.
void add_model_cluster(CLI::App* cmd, std::string& model, std::string& cluster, int& gpus);

// --stack NAME|file.json, as plan, simulate, export and compare take it.
void add_stack(CLI::App* cmd, std::string& stack);

// The stack a command assumes: --stack when given, else the one the plan recorded, else the
// default for the cluster (`parallax` on CPU profiles, `megatron-core` on GPU profiles).
Stack stack_for(const std::string& flag, const Cluster& cluster, const std::string& recorded = "");

// "stack megatron-core (hardware_profiles/stacks/megatron-core.json)": what a command assumed.
std::string stack_line(const Stack& stack);

// `s` in single quotes for /bin/sh (an embedded quote as '\'').
inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (const char c : s)
    q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// "12.3": bytes in GiB, one decimal.
std::string gib(double bytes);

// Reads and validates a plan file for the model; `cluster` is resized to the plan's world size
// unless --gpus was given. The plan then runs on `stack` (set here): --stack when given, else the
// one the plan recorded, else the cluster's default. The model takes the stack's kernels where its
// file names none, the plan the stack's gradient-reduction timing unless the file states
// overlap_grad_reduce, and the plan records the stack's name.
Plan plan_load_on_stack(const std::string& file, const std::string& stack_flag, LoadedModel& model,
                        Cluster& cluster, int gpus, Stack& stack);

} // namespace parallax::cli
