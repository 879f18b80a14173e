// Plan ⇄ JSON (the contract in ARCHITECTURE.md) and validation of a plan against a model and a
// world size.
#pragma once

#include "parallax/core/json_reader.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/core/plan.hpp"

namespace parallax {

// Parses and checks what a plan can check alone (ranges, names, batch divisibility, schedule
// and virtual stages agreeing, stage ranges contiguous).
Plan plan_from_json(const Json& doc, const std::string& source);
Json plan_to_json(const Plan& plan);

// Checks a plan against a model and a world size: dp·tp·pp = world, tp divides the attention
// and key/value heads, enough units for pp × v chunks, stage ranges cover the model, and
// interleaving's micro-batch rule. `source` names the plan in errors.
void plan_validate(const Plan& plan, const LayerGraph& graph, int world_size,
                   const std::string& source);

} // namespace parallax
