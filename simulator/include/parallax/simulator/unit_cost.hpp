// Per-unit costs on one tensor-parallel rank for one micro-batch: the building blocks the cost
// model and the planner assemble into stages. Computed once per (t, sequence parallel, B,
// precision) and reused across every plan that shares them.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/core/plan.hpp"
#include "parallax/core/stack.hpp"

#include <vector>

namespace parallax {

struct UnitCost {
  double fwd_s = 0;       // forward compute
  double bwd_s = 0;       // backward compute (with a fused attention's recompute)
  double selective_s = 0; // forward of the layers selective recomputation reruns
  // Forward (and its TP collectives) that full recomputation reruns: the transformer blocks;
  // embedding, final norm, head and loss keep their activations and are not rerun.
  double full_recompute_s = 0;
  double full_recompute_tp_s = 0;
  double tp_fwd_s = 0;      // tensor-parallel collectives in the forward (critical path)
  double tp_bwd_s = 0;      // the same in the backward
  double params = 0;        // parameters held by one TP rank (routed experts: by one EP rank too)
  double expert_params = 0; // of those, the routed experts' (reduced over the expert-DP group)
  double ep_fwd_s = 0;      // of tp_fwd_s, the expert-parallel all-to-alls (dispatch, combine)
  double ep_bwd_s = 0;      // the same in the backward
  double cp_fwd_s = 0;      // of tp_fwd_s, the context-parallel K/V exchange left exposed
  double cp_bwd_s = 0;      // the same in the backward (K/V and their gradients)
  // Of those, the ones every TP rank holds whole (norms): under sequence parallelism their
  // gradients are summed over the tensor-parallel group.
  double replicated_params = 0;
  double max_layer_params = 0;
  // Of params, those in weight matrices, and Σ (rows + cols) of those matrices as this rank
  // holds them (PowerSGD factorises each into rows·r + cols·r values).
  double matrix_params = 0;
  double matrix_dims = 0;
  double act_bytes = 0;           // activations kept per micro-batch without recomputation
  double act_selective_bytes = 0; // with selective recomputation
  // With full recomputation: the unit's input, plus the activations of its layers outside
  // transformer blocks (embedding, final norm, LM head, loss), which are not recomputed.
  double act_full_bytes = 0;
  double act_outside_blocks_bytes = 0; // that second part alone
  double act_transient_bytes = 0;      // the largest working_act_elems of its layers, in bytes
  double model_flops = 0;              // forward + backward model FLOPs on this rank

  // The recomputation rule, for the cost model, the simulator, the planner and the reports:
  // the forward work a recomputation reruns (selective inside the backward, full as its own
  // step-program op) and the activations kept per micro-batch.
  double recompute_s(Recompute r) const {
    return r == Recompute::full ? full_recompute_s : r == Recompute::selective ? selective_s : 0.0;
  }
  double recompute_tp_s(Recompute r) const {
    return r == Recompute::full ? full_recompute_tp_s : 0.0;
  }
  double kept_act_bytes(Recompute r) const {
    return r == Recompute::full        ? act_full_bytes
           : r == Recompute::selective ? act_selective_bytes
                                       : act_bytes;
  }
  bool operator==(const UnitCost&) const = default;
};

struct UnitCostKey {
  int tp = 1;
  bool sequence_parallel = false;
  std::int64_t micro_batch_size = 1;
  Precision precision = Precision::bf16;
  int ep = 1; // expert parallelism (experts over ep dp·cp ranks, at stride tp)
  int cp = 1; // context parallelism (each rank holds 1/cp of every sequence; CP peers at stride tp)
  CpComm cp_comm = CpComm::p2p;
  // Expert tensor parallelism 1 with tp > 1: each TP rank computes whole experts on its 1/tp of
  // the tokens (no TP split or collective inside the routed experts; EP peers at stride 1).
  bool whole_experts = false;
  // Sequences' worth of tokens a rank computes per micro-batch: B / cp.
  double local_sequences() const { return static_cast<double>(micro_batch_size) / cp; }
  auto operator<=>(const UnitCostKey&) const = default;
};

// The key of a plan's unit costs.
inline UnitCostKey unit_cost_key(const Plan& plan) {
  UnitCostKey k{plan.tp,
                plan.sequence_parallel,
                plan.micro_batch_size,
                plan.precision,
                plan.ep,
                plan.cp,
                plan.cp > 1 ? plan.cp_comm : CpComm::p2p};
  k.whole_experts = plan.tp > 1 && plan.expert_tp() == 1;
  return k;
}

// Costs of every unit of `graph` (index = unit) under the software stack `stack` (its host
// dispatch time, FP8 recipe and tensor-parallel overlap).
std::vector<UnitCost> unit_costs(const LayerGraph& graph, const Cluster& cluster,
                                 const UnitCostKey& key, const Stack& stack = {});

// Activation bytes `layer` keeps from its forward for its backward, per micro-batch on one TP
// rank, under recomputation `r`: everything; without the s² attention tensors (selective); or
// nothing (full) — except layers outside transformer blocks (embedding, final norm, LM head,
// loss) in a unit that holds blocks, which full recomputation does not rerun and so keep theirs.
// A unit under full recomputation also keeps its input (full_recompute_input_bytes).
// A layer's weight matrices as one rank holds them: {Σ rows·cols, Σ (rows + cols)}.
std::pair<double, double> layer_matrices(const Layer& layer, const GraphInfo& info,
                                         const UnitCostKey& key);
double layer_kept_act_bytes(const Layer& layer, const UnitCostKey& key, Recompute r,
                            bool unit_has_blocks);
double full_recompute_input_bytes(const GraphInfo& info, const UnitCostKey& key);

// Context parallelism on an attention core, per micro-batch on one rank: the bytes of the
// rank's K/V block, and the exchange time left on the critical path (forward, backward) given
// the core's own compute times on the rank. Ring (p2p): cp − 1 hops hidden behind cp equal
// attention steps, max(0, hop − step) each, the backward passing K/V and their gradients (twice
// the bytes) plus one last hop of the gradients; all_gather: the gather before the forward and
// before the backward, the reduce-scatter of the gradients after it. Zero for other layers.
struct CpExchange {
  double bytes = 0;
  double fwd_s = 0;
  double bwd_s = 0;
};
double cp_kv_bytes(const Layer& layer, const GraphInfo& info, const UnitCostKey& key);
CpExchange cp_exchange_s(const Layer& layer, const GraphInfo& info, const Cluster& cluster,
                         const UnitCostKey& key, double attn_fwd_s, double attn_bwd_s);

// How many ways a layer's saved activations / its FLOPs are divided among t ranks.
double layer_flop_divisor(const Layer& layer, int tp, bool sequence_parallel);
double layer_activation_divisor(const Layer& layer, int tp, bool sequence_parallel);
// Routed experts: also / ep, and not / tp when whole_experts.
double layer_param_divisor(const Layer& layer, int tp, int ep = 1, bool whole_experts = false);

} // namespace parallax
