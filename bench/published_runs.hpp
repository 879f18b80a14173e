// Published measured training runs (../shared/validation/published_runs.json and files of the same
// schema) turned into what the planner takes: the model, the cluster as the row describes it, the
// request with every dimension the source states pinned, and the measured step time.
//
// A row Parallax cannot model faithfully (context or expert parallelism, hybrid sharding, a GPU
// without a profile, no step time) is an InputError naming the row and field, so a runner can
// skip it with the reason instead of predicting a different training run.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/json_reader.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/models/model_config.hpp"
#include "parallax/planner/planner.hpp"

#include <optional>
#include <string>

namespace parallax {

struct PublishedCase {
  std::string id;
  std::string source;    // source.key
  std::string framework; // training.framework
  double measured_s = 0; // measured (or derived from measured throughput) iteration time
  ModelConfig model;
  Cluster cluster;
  PlanRequest request; // gpus, global batch, pins; top_k and simulate_top left at defaults
};

// `file` names the document in errors. Throws InputError when the row cannot be modelled.
PublishedCase published_case(const Json& row, const std::string& file);

// The recomputation a row's own figures imply where it does not state one: reported TFLOP/s ×
// GPUs × time is the FLOP count the source used, which includes a recomputed forward (4 forward
// passes' worth) only if the run recomputed. nullopt when the row lacks those figures.
std::optional<Recompute> published_recompute_from_flops(const Json& row, const LayerGraph& graph);

// The publication year from source.key ("narayanan2021"), source.title or source.location;
// nullopt when none names one.
std::optional<int> published_year(const Json& row);

} // namespace parallax
