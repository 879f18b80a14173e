// The auto-parallel planner: searches dp × tp × pp, ZeRO stage, micro-batch size, schedule
// (GPipe, 1F1B, interleaved with each valid v), recomputation and sequence parallelism for a
// model on a cluster, prunes by memory before timing, and ranks the plans that fit.
//
// Pins fix dimensions (a user saying "TP must be 8"); the search covers the rest. When nothing
// fits, the result says which plan came closest and by how much. Pure: no clocks, files or
// globals.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/core/plan.hpp"
#include "parallax/core/stack.hpp"
#include "parallax/planner/goodput.hpp"
#include "parallax/simulator/cost_model.hpp"
#include "parallax/simulator/estimate.hpp"

#include <optional>
#include <string>
#include <vector>

namespace parallax {

// goodput: tokens/s net of checkpoints and of the work failures lose (planner/goodput.hpp).
enum class Objective { throughput, time_to_train, cost, goodput };

struct PlanPins {
  std::optional<int> tp;
  std::optional<int> pp;
  std::optional<int> dp;
  std::optional<int> ep;  // expert parallelism (mixture-of-experts models)
  std::optional<int> etp; // expert tensor parallelism: 0 (= tp) or 1
  std::optional<int> cp;  // context parallelism
  std::optional<CpComm> cp_comm;
  std::optional<int> zero_stage;
  std::optional<std::int64_t> micro_batch_size;
  std::optional<Schedule> schedule;
  std::optional<int> virtual_stages;
  std::optional<Recompute> recompute;
  std::optional<bool> sequence_parallel;
  std::optional<Precision> precision;
  std::optional<GradSync> grad_sync;
  // Try every gradient synchronisation (all-reduces and both parameter servers) instead of
  // the default all-reduce; the asynchronous server with max_staleness (its steps train on
  // stale parameters, so it is never chosen unasked).
  bool search_grad_sync = false;
  std::optional<int> max_staleness;
  // Dedicated parameter-server processes (Plan::parameter_servers) for parameter-server plans;
  // pinned above 0, only parameter-server plans are proposed.
  // Unpinned, the gradient-synchronisation search also tries dp/4, dp/2 and dp dedicated
  // servers beside the co-located shards (the shard count against the in-cast it relieves).
  std::optional<int> parameter_servers;
  // Gradient compression (lossy: changes convergence, so never chosen unless asked). Pinned,
  // or with search_compression tried beside none where the plan reduces whole gradients over
  // data-parallel ranks: bf16, powersgd:4 and topk:0.01.
  std::optional<GradCompression> grad_compression;
  bool search_compression = false;
  // A property of the training stack, never searched: overrides the stack's own.
  std::optional<bool> overlap_grad_reduce;
};

struct PlanRequest {
  int gpus = 1;                       // devices offered
  std::int64_t global_batch_size = 1; // sequences per iteration
  PlanPins pins;
  // The software stack the plans run on (its kernels, communication and memory behaviour).
  Stack stack;
  Objective objective = Objective::throughput;
  double train_tokens = 0;       // for Objective::time_to_train (reported in hours)
  double gpu_mtbf_hours = 0;     // for Objective::goodput: one GPU's mean time between failures
  bool allow_fewer_gpus = false; // also try 1/2, 1/4, ... of the devices offered
  int top_k = 20;
  // The best `simulate_top` plans of the analytic ranking are re-ranked by the discrete-event
  // simulator (0: analytic ranking only).
  int simulate_top = 20;
  // Keep every timed plan's figures in PlanSearchResult::points (for plots of the search).
  bool record_points = false;
};

struct RankedPlan {
  PlanEstimate estimate;                // from the simulator when the plan was re-ranked by it
  std::optional<PlanEstimate> analytic; // the analytic model's figures for the same plan
  int gpus = 0;
  // Seconds per million tokens (throughput; per million good tokens for goodput), hours to
  // train, or USD per million tokens: lower is better.
  double objective_value = 0;
  std::optional<Goodput> goodput; // with Objective::goodput
};

// One timed candidate of the search, by the analytic model.
struct PlanPoint {
  Plan plan;
  int gpus = 0;
  double tokens_per_s = 0;
  double memory_bytes = 0; // most loaded rank
};

struct PlanSearchResult {
  // Fitting plans, at most top_k: the first simulate_top re-ranked by the simulator (best
  // first), then the rest in the analytic model's order.
  std::vector<RankedPlan> plans;
  std::int64_t candidates = 0;    // plans generated
  std::int64_t pruned_memory = 0; // rejected by the memory model before timing
  std::int64_t evaluated = 0;     // timed
  // When nothing fits: the plan that came closest, and its memory over the capacity.
  std::optional<PlanEstimate> closest;
  std::string no_fit_reason;
  std::vector<PlanPoint> points; // every timed plan, when PlanRequest::record_points
};

PlanSearchResult plan_search(const LayerGraph& graph, const Cluster& cluster,
                             const PlanRequest& request);

// Fills plan.stages with the min-max partition for this plan (used by `simulate` on plans that
// omit stages, and by the search).
void plan_assign_stages(CostModel& model, Plan& plan);

// Text explaining where the time of `best` goes and why `other` loses to it.
std::string plan_explain(const RankedPlan& best, const RankedPlan* other);

std::string_view objective_name(Objective o);

} // namespace parallax
