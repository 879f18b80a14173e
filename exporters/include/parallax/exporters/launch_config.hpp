// Launch configurations for the stacks users train with: a plan as Megatron-LM arguments, a
// torchtitan job TOML, a DeepSpeed config JSON, an sbatch script or a Kubeflow MPIJob manifest
// running Parallax's own executor. Where a plan uses something the target cannot express, the
// export throws InputError naming the plan field instead of writing a wrong configuration.
//
// Flag and key names follow Megatron-LM core_r0.10 (2025), torchtitan main of mid-2025
// (training.local_batch_size, parallelism.*), DeepSpeed 0.16 and Kubeflow MPI Operator v2beta1
// (docs/ARCHITECTURE.md, "Launch configurations").
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/core/plan.hpp"

#include <array>
#include <string>
#include <string_view>

namespace parallax {

enum class LaunchFormat { megatron, torchtitan, deepspeed, slurm, mpijob };
inline constexpr std::array<std::string_view, 5> kLaunchFormatNames = {
    "megatron", "torchtitan", "deepspeed", "slurm", "mpijob"};

struct LaunchInput {
  const Plan* plan = nullptr;
  const GraphInfo* model = nullptr;
  const Cluster* cluster = nullptr; // devices_per_node sets the node layout
  std::string source = "plan";      // the plan's file, for error messages
  // slurm / mpijob: how Parallax's executor is started.
  std::string model_arg;                      // train's --model
  std::string plan_path = "plan.json";        // where the job finds the plan
  std::string image = "parallax:latest";      // mpijob container image
  std::string checkpoint_dir = "checkpoints"; // train's --checkpoint-dir
  int steps = 1000;
};

// The configuration text; InputError (source, the plan field, what the target accepts).
std::string launch_config(LaunchFormat format, const LaunchInput& in);

// Nodes and devices per node of a plan on `cluster` (one partial node below a node's size).
struct NodeLayout {
  int nodes = 1;
  int per_node = 1;
};
NodeLayout node_layout(const Plan& plan, const Cluster& cluster);

} // namespace parallax
