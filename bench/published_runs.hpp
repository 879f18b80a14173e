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
#include "parallax/core/stack.hpp"
#include "parallax/models/model_config.hpp"
#include "parallax/planner/planner.hpp"

#include <array>
#include <optional>
#include <string>
#include <string_view>

namespace parallax {

// What a row's memory figure measured: torch.cuda.max_memory_allocated, max_memory_reserved, or
// the whole device (nvidia-smi).
enum class MemoryLevel { allocated, reserved, device };
inline constexpr std::array<std::string_view, 3> kMemoryLevelNames = {"allocated", "reserved",
                                                                      "device"};

struct MeasuredMemory {
  double bytes = 0;                 // of the rank the source reports (rank 0: the first stage)
  std::optional<MemoryLevel> level; // nullopt: the source does not say how it measured
  std::string definition;           // the row's own words
};

struct PublishedCase {
  std::string id;
  std::string source;    // source.key
  std::string framework; // training.framework
  double measured_s = 0; // measured (or derived from measured throughput) iteration time
  Stack stack;           // the zoo stack the framework text maps to (published_stack_name)
  std::optional<MeasuredMemory> memory;
  ModelConfig model;
  Cluster cluster;
  PlanRequest request; // gpus, global batch, pins; top_k and simulate_top left at defaults
};

// The rows of a document: an array of rows, or an object {"runs": [...]} with optional
// "defaults", a row that every row is merged onto (JSON merge patch: a row's own fields win), so
// a file states what all its rows share once. Throws InputError naming `file` otherwise.
Json published_rows(const Json& doc, const std::string& file);

// `file` names the document in errors. Throws InputError when the row cannot be modelled.
PublishedCase published_case(const Json& row, const std::string& file);

// The recomputation a row's own figures imply where it does not state one: reported TFLOP/s ×
// GPUs × time is the FLOP count the source used, which includes a recomputed forward (4 forward
// passes' worth) only if the run recomputed. nullopt when the row lacks those figures.
std::optional<Recompute> published_recompute_from_flops(const Json& row, const LayerGraph& graph);

// The zoo stack that ran a row, from its framework text and the year it names (else the
// publication year; one table in published_runs.cpp); nullopt when no entry names the framework.
std::optional<std::string> published_stack_name(const std::string& framework,
                                                std::optional<int> year);

// The publication year from source.key ("narayanan2021"), source.title or source.location;
// nullopt when none names one.
std::optional<int> published_year(const Json& row);

} // namespace parallax
