// Plan ⇄ JSON (the contract in ARCHITECTURE.md) and validation of a plan against a model and a
// world size.
#pragma once

#include "parallax/core/json_reader.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/core/plan.hpp"

#include <optional>
#include <string>

namespace parallax {

// Parses and checks what a plan can check alone (ranges, names, batch divisibility, schedule
// and virtual stages agreeing, stage ranges contiguous).
Plan plan_from_json(const Json& doc, const std::string& source);
Json plan_to_json(const Plan& plan);

// What makes a plan infeasible: the field, what it must be, what it is, and a hint.
struct PlanProblem {
  std::string field;
  std::string expected;
  std::string found;
  std::string hint;
};

// The one feasibility rule of a plan for a model on `world_size` ranks — what the planner
// proposes, plan loading accepts, the trainer trains and compare sweeps: dp·cp·tp·pp = world; tp
// divides the attention heads, the key/value heads and the MLP width (the vocabulary need not
// divide: the executor pads it, as Megatron-LM's make-vocab-size-divisible-by does); enough
// units for pp × v chunks; stage ranges cover the model; interleaving's micro-batch rule;
// sequence parallelism splits micro-batch × sequence rows evenly over tp; a parameter server
// holds the whole optimizer state (no ZeRO). Nothing when feasible.
std::optional<PlanProblem> plan_problem(const Plan& plan, const LayerGraph& graph, int world_size);
// Of that rule, the part about tp alone (the planner prunes with it before enumerating more).
std::optional<PlanProblem> tp_problem(const GraphInfo& info, int tp);
// Expert parallelism: ep divides the ranks the experts are spread over (`dp_cp`: dp·cp, or
// tp·dp·cp with etp 1) and the model's experts (1 for dense models).
std::optional<PlanProblem> ep_problem(const GraphInfo& info, int dp_cp, int ep);
// Context parallelism: the sequence splits into 2·cp equal chunks.
std::optional<PlanProblem> cp_problem(const GraphInfo& info, int cp);
// Gradient compression where the plan reduces gradients some other way than one all-reduce.
std::optional<PlanProblem> compression_problem(const Plan& plan);

// plan_problem as an input error naming `source`.
void plan_validate(const Plan& plan, const LayerGraph& graph, int world_size,
                   const std::string& source);

} // namespace parallax
