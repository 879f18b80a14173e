// The analytic cost model: a pure function of (LayerGraph, Cluster, Plan) → PlanEstimate.
//
// Step time = pipeline time (compute + tensor-parallel collectives + pipeline sends per
// micro-batch on the slowest stage, times m, plus the fill/drain bubble: (p−1)/m of it for
// GPipe and 1F1B, divided by v when interleaved) + data-parallel communication not hidden behind
// the backward + the optimizer step. Memory follows the ZeRO paper's mixed-precision accounting
// (2 + 2 + 12 bytes per parameter, divided as ZeRO-1/2/3 divide them) and Korthikanti et al.
// 2022 for activations, times the micro-batches the schedule keeps in flight.
//
// CostModel caches per-unit costs per (t, sequence parallel, B, precision), so the planner can
// evaluate thousands of plans sharing them cheaply. Not thread-safe.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/core/plan.hpp"
#include "parallax/core/stack.hpp"
#include "parallax/simulator/estimate.hpp"
#include "parallax/simulator/unit_cost.hpp"

#include <initializer_list>
#include <map>
#include <vector>

namespace parallax {

// Documented constants of the memory model. Allocator slack, the CUDA context and communicator
// buffers are properties of the software stack (core/stack.hpp).
struct MemoryModelConstants {
  static constexpr double kGradBucketBytes = 50e6; // DP gradient bucket (overlap granularity)
};

// A step under the asynchronous parameter server (stale synchronous parallel, bound k): a
// worker computes for `compute_s` and its gradients take `round_trip_s` to come back as
// parameters. With k = 0 each step waits for the previous one's (the synchronous step,
// without a barrier); with k >= 1 a worker keeps k steps in flight, so the step is
// max(compute, round trip / k), and it computes on parameters min(k, ⌈round trip / step⌉)
// steps old. Homogeneous workers; a persistent straggler sets every worker's pace through
// the bound.
struct AsyncServerStep {
  double step_s = 0;
  double staleness = 0;
};
AsyncServerStep async_server_step(double compute_s, double round_trip_s, int max_staleness);

class CostModel {
public:
  // Keeps references: `graph` and `cluster` must outlive the model; the stack is copied.
  CostModel(const LayerGraph& graph, const Cluster& cluster, Stack stack = {});
  CostModel(const LayerGraph&, Cluster&&, Stack = {}) = delete;
  CostModel(LayerGraph&&, const Cluster&, Stack = {}) = delete;
  CostModel(LayerGraph&&, Cluster&&, Stack = {}) = delete;

  // Estimates `plan` on the cluster. The plan's stages are used when given, else an even split.
  // The plan must be valid for the model and the cluster's device count (plan_validate).
  // With dp_shares every replica is estimated on its own devices with its own micro-batches and
  // the slowest sets the step (the gradient reduction waits for it).
  PlanEstimate estimate(const Plan& plan);
  // Only the memory of the most loaded rank (cheap: the planner prunes with it before timing).
  MemoryBreakdown memory(const Plan& plan);
  double memory_capacity_bytes() const;

  // Unit costs on node group `group`'s devices (heterogeneous clusters; 0 otherwise).
  const std::vector<UnitCost>& units(const UnitCostKey& key, int group = 0);
  // The node group whose devices set pipeline rank `pp_rank`'s pace: the slowest (lowest peak
  // in the plan's precision) among the groups its ranks sit in; 0 on a homogeneous cluster.
  // With `replica` >= 0 only that data-parallel replica's ranks count (uneven dp_shares).
  int stage_group(const Plan& plan, int pp_rank, int replica = -1) const;
  // Group g's view of the cluster (its device and node kind).
  const Cluster& group_cluster(int g) const { return groups_[static_cast<std::size_t>(g)]; }
  const LayerGraph& graph() const { return *graph_; }
  const Cluster& cluster() const { return *cluster_; }
  const Stack& stack() const { return stack_; }
  // Model FLOPs (forward + backward, no recomputation) of one sequence through the whole graph.
  double model_flops_per_sequence() const { return model_flops_per_sequence_; }

  // One pipeline rank's load for one micro-batch.
  struct RankLoad {
    double compute_s = 0; // forward + backward + recomputation
    double bwd_s = 0;     // the backward part (window for overlapping gradient reduction)
    double tp_s = 0;
    double p2p_s = 0;
    double zero3_exposed_s = 0;
    int group = 0; // the node group whose devices run it (heterogeneous clusters)
    double params = 0;
    double expert_params = 0; // of params, the routed experts' (sharded over dp / ep by ZeRO)
    double max_layer_params = 0;
    double matrix_params = 0; // of params, in weight matrices (gradient compression)
    double matrix_dims = 0;   // Σ (rows + cols) of those matrices
    double act_per_mb = 0;    // activations kept per micro-batch over all this rank's chunks
    double act_working = 0;   // transient activations of one unit's blocks (full recomputation)
    double act_outside_blocks = 0; // per micro-batch, kept under full recomputation
    double act_transient = 0;      // working memory of the rank's largest transient (the loss)
    double step_s() const { return compute_s + tp_s + p2p_s + zero3_exposed_s; }
    // Activations rebuilt at once under full recomputation: one unit's blocks during the
    // backward, when that micro-batch's head and loss activations have already been freed.
    double recompute_working_bytes() const {
      return act_working > act_outside_blocks ? act_working - act_outside_blocks : 0.0;
    }
  };

  // Per pipeline rank: the load of one micro-batch, and the memory the analytic model predicts.
  std::vector<RankLoad> rank_loads(const Plan& plan, const std::vector<StageRange>& stages,
                                   int replica = -1);
  std::vector<MemoryBreakdown> memory_per_stage(const Plan& plan);
  // The optimizer step of pipeline rank `load` (a memory-bound pass over its local state).
  double optimizer_time_s(const Plan& plan, const RankLoad& load) const;
  // The asynchronous parameter server's round trip of one step: the push of the gradients,
  // the server's update of its shard and the pull of the new version.
  double server_round_trip_s(const Plan& plan, const RankLoad& load) const;
  // Gradient-accumulation pass per micro-batch over `params` local parameters (0 when m = 1).
  double grad_accumulation_s(const Plan& plan, double params, int group = 0) const;
  // Memory of pipeline rank `pp_rank` carrying `load`, at the three levels of MemoryBreakdown.
  MemoryBreakdown rank_memory(const Plan& plan, const RankLoad& load, int pp_rank) const;
  // The allocator's slack over `activations` bytes of live activations on top of the long-lived
  // buffers (weights, gradients, optimizer state, gathered layers), each one allocation.
  double allocator_slack_bytes(std::initializer_list<double> static_buffers,
                               double activations) const;

private:
  // One replica's view (replica_plan) on its own devices; -1: the slowest of every replica.
  PlanEstimate estimate_replica(const Plan& plan, int replica);
  const LayerGraph* graph_;
  const Cluster* cluster_;
  Stack stack_;
  double model_flops_per_sequence_ = 0;
  std::vector<Cluster> groups_; // per node group: the cluster as if all its nodes were that kind
  std::map<std::pair<UnitCostKey, int>, std::vector<UnitCost>> cache_;
};

// Bytes one rank keeps per parameter it holds (after the TP split): working weights, gradients,
// and optimizer state (fp32 master weights in mixed precision, Adam's two moments), each divided
// among the data-parallel ranks as the plan's ZeRO stage divides it.
struct ParamStateBytes {
  double params = 0;
  double grads = 0;
  double optimizer = 0;
  double total() const { return params + grads + optimizer; }
};
ParamStateBytes param_state_bytes(const Plan& plan, const Stack& stack = {});
// Bytes per gradient element the stack keeps and reduces: 4 when it accumulates fp32 main
// gradients under bf16 / FP8 mixed precision, else the plan's storage precision.
double grad_element_bytes(const Plan& plan, const Stack& stack);

// Bytes one pipeline hop sends per micro-batch (activations forward, their gradient backward).
double p2p_bytes(const Plan& plan, const LayerGraph& graph);

// Micro-batches (in units of whole-stage activations) pipeline rank `pp_rank` keeps in flight.
double activations_in_flight(const Plan& plan, int pp_rank);

} // namespace parallax
