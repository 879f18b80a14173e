// Expert parallelism by hand: the all-to-all of one MoE layer, expert parameters and their
// ZeRO shards, the expert-data-parallel reduction, the feasibility rule and the search.
#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/simulator/collectives.hpp"
#include "parallax/simulator/cost_model.hpp"
#include "parallax/simulator/iteration_simulator.hpp"
#include "parallax/simulator/unit_cost.hpp"

#include "hand_cluster.hpp"

#include <gtest/gtest.h>

namespace parallax {
namespace {

using test_support::hand_cluster;

Plan moe_plan(int dp, int ep, int zero = 0) {
  return {.dp = dp,
          .ep = ep,
          .zero_stage = zero,
          .micro_batch_size = 1,
          .global_batch_size = 4 * dp,
          .precision = Precision::bf16};
}

// moe-tiny: s 64, h 64, 8 experts of width 32, top-2: 16 token copies per expert and sequence.
TEST(ExpertParallel, AllToAllOfOneMoeLayerByHand) {
  const LayerGraph g = model_load("moe-tiny").graph;
  const Cluster c = hand_cluster(4);
  const Plan p = moe_plan(4, 2);
  const std::vector<UnitCost> units = unit_costs(g, c, unit_cost_key(p));
  // Dispatch before the experts' up-projection and combine after their down-projection: each
  // moves the micro-batch's 8·16 token copies of 64 bf16 values, (n − 1)/n of them to the other
  // rank of the pair over the 50 GB/s link.
  const double bytes = 8.0 * 16 * 64 * 2;
  const double one = 0.5 * bytes / 50e9;
  EXPECT_DOUBLE_EQ(units[1].ep_fwd_s, 2 * one);
  EXPECT_DOUBLE_EQ(units[1].ep_bwd_s, 2 * one);
  EXPECT_EQ(units[0].ep_fwd_s, 0.0); // the dense first layer
  // Without expert parallelism nothing is exchanged.
  EXPECT_EQ(unit_costs(g, c, unit_cost_key(moe_plan(4, 1)))[1].ep_fwd_s, 0.0);
}

TEST(ExpertParallel, ExpertsAreSplitOverEpAndShardedOverTheExpertDataParallelRanks) {
  const LayerGraph g = model_load("moe-tiny").graph;
  const Cluster c = hand_cluster(4);
  const double experts = 8.0 * 3 * 64 * 32; // one MoE layer's routed experts
  const UnitCost one = unit_costs(g, c, unit_cost_key(moe_plan(4, 1)))[1];
  const UnitCost two = unit_costs(g, c, unit_cost_key(moe_plan(4, 2)))[1];
  EXPECT_DOUBLE_EQ(one.expert_params, experts);
  EXPECT_DOUBLE_EQ(two.expert_params, experts / 2);
  EXPECT_DOUBLE_EQ(one.params - two.params, experts / 2);
  // ZeRO-1 shards the optimizer state of an expert over the dp / ep = 2 ranks that hold it, of
  // the rest over all 4: (dense + experts/2 · 2) / 4 · 12 bytes (fp32 master and moments).
  CostModel model(g, c);
  const Plan z1 = moe_plan(4, 2, 1);
  const std::vector<CostModel::RankLoad> loads = model.rank_loads(z1, {{0, 4}});
  const MemoryBreakdown m = model.rank_memory(z1, loads[0], 0);
  const double dense = loads[0].params - loads[0].expert_params;
  EXPECT_NEAR(m.optimizer, (dense + 2 * loads[0].expert_params) / 4 * 12.0, 1e-6);
  EXPECT_NEAR(loads[0].expert_params, 3 * experts / 2, 1e-9); // 3 MoE layers
}

TEST(ExpertParallel, ExpertGradientsReduceOverTheirOwnGroup) {
  const Cluster c = hand_cluster(8);
  const Plan p = moe_plan(8, 4);
  EXPECT_EQ(ep_span(p, c), (GroupSpan{4, 4, 1, 1}));
  EXPECT_EQ(expert_dp_span(p, c), (GroupSpan{2, 2, 1, 4}));
  const CollectiveCost both = data_parallel_cost(c, p, Collective::all_reduce, 1000.0, 400.0);
  const double dense = collective_time_s(c, Collective::all_reduce, 600.0, dp_span(p, c));
  const double expert = collective_time_s(c, Collective::all_reduce, 400.0, expert_dp_span(p, c));
  EXPECT_DOUBLE_EQ(both.total_s(), dense + expert);
  // ep = 1: the plain data-parallel collective.
  EXPECT_DOUBLE_EQ(
      data_parallel_cost(c, moe_plan(8, 1), Collective::all_reduce, 1000.0, 400.0).total_s(),
      collective_time_s(c, Collective::all_reduce, 1000.0, dp_span(p, c)));
}

TEST(ExpertParallel, FeasibilityAndPlanFile) {
  const LayerGraph moe = model_load("moe-tiny").graph;
  const LayerGraph dense = model_load("llama-tiny").graph;
  EXPECT_FALSE(plan_problem(moe_plan(4, 2), moe, 4));
  EXPECT_EQ(plan_problem(moe_plan(4, 2), dense, 4)->field, "/ep"); // no experts
  EXPECT_EQ(plan_problem(moe_plan(6, 3), moe, 6)->field, "/ep");   // 3 does not divide 8 experts
  Json doc = plan_to_json(moe_plan(4, 2));
  EXPECT_EQ(doc.at("ep"), 2);
  EXPECT_EQ(plan_from_json(doc, "p.json").ep, 2);
  EXPECT_FALSE(plan_to_json(moe_plan(4, 1)).contains("ep")); // dense plans' files unchanged
  doc["ep"] = 3;                                             // does not divide dp = 4
  try {
    plan_validate(plan_from_json(doc, "p.json"), moe, 4, "p.json");
    ADD_FAILURE() << "accepted";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "/ep");
  }
}

TEST(ExpertParallel, TheSearchProposesOnlyFeasibleEpAndHonoursThePin) {
  const LayerGraph g = model_load("moe-tiny").graph;
  const Cluster c = hand_cluster(8);
  PlanRequest req{.gpus = 8, .global_batch_size = 32};
  req.top_k = 1000;
  req.simulate_top = 0;
  const PlanSearchResult all = plan_search(g, c, req);
  bool some_ep = false;
  bool some_whole = false;
  for (const RankedPlan& r : all.plans) {
    EXPECT_EQ(r.estimate.plan.expert_ranks() % r.estimate.plan.ep, 0);
    EXPECT_EQ(8 % r.estimate.plan.ep, 0);
    some_ep = some_ep || r.estimate.plan.ep > 1;
    some_whole = some_whole || r.estimate.plan.expert_tp() != r.estimate.plan.tp;
  }
  EXPECT_TRUE(some_ep);
  EXPECT_TRUE(some_whole); // etp 1 is searched
  req.pins.ep = 4;
  const PlanSearchResult pinned = plan_search(g, c, req);
  ASSERT_FALSE(pinned.plans.empty());
  for (const RankedPlan& r : pinned.plans) {
    EXPECT_EQ(r.estimate.plan.ep, 4);
  }
}

// Expert tensor parallelism 1 (Megatron-Core's MoE parallel folding): with tp 2, each TP rank
// holds whole experts, computes them on its half of the tokens with no TP collective, and the
// EP group runs over consecutive ranks; the experts' state shards over the tp·dp / ep ranks.
TEST(ExpertParallel, WholeExpertsPerTensorParallelRank) {
  const LayerGraph g = model_load("moe-tiny").graph;
  const Cluster c = hand_cluster(8);
  Plan split = moe_plan(4, 4);
  split.tp = 2;
  split.sequence_parallel = true;
  Plan whole = split;
  whole.etp = 1;
  whole.ep = 8;
  EXPECT_FALSE(plan_problem(whole, g, 8)); // ep 8 divides tp·dp = 8
  EXPECT_EQ(plan_problem(split, g, 8), std::nullopt);
  Plan too_wide = split;
  too_wide.ep = 8; // experts split over TP: ep must divide dp = 4
  EXPECT_EQ(plan_problem(too_wide, g, 8)->field, "/ep");
  const UnitCost us = unit_costs(g, c, unit_cost_key(split))[1];
  const UnitCost uw = unit_costs(g, c, unit_cost_key(whole))[1];
  const double experts = 8.0 * 3 * 64 * 32;                        // one MoE layer's routed experts
  EXPECT_DOUBLE_EQ(us.expert_params, experts / (2 * 4));           // 1/tp of each of E/ep experts
  EXPECT_DOUBLE_EQ(uw.expert_params, experts / 8);                 // whole experts, E/ep of them
  EXPECT_LT(uw.tp_fwd_s - uw.ep_fwd_s, us.tp_fwd_s - us.ep_fwd_s); // no TP collective in them
  EXPECT_EQ(ep_group(whole, 5), (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(expert_dp_group(whole, 5), (std::vector<int>{5}));
  Plan whole4 = whole;
  whole4.ep = 4;
  EXPECT_EQ(ep_group(whole4, 5), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(expert_dp_group(whole4, 5), (std::vector<int>{1, 5})); // across a TP pair too
  EXPECT_EQ(ep_span(whole4, c), (GroupSpan{4, 4, 1, 1}));
  // ZeRO-1: the experts' optimizer state over the tp·dp / ep = 2 ranks holding them.
  whole4.zero_stage = 1;
  CostModel model(g, c);
  const std::vector<CostModel::RankLoad> loads = model.rank_loads(whole4, {{0, 4}});
  const MemoryBreakdown m = model.rank_memory(whole4, loads[0], 0);
  const double dense = loads[0].params - loads[0].expert_params;
  EXPECT_NEAR(m.optimizer, (dense / 4 + loads[0].expert_params / 2) * 12.0, 1e-6);
  // The rule and the plan file.
  Plan no_sp = whole;
  no_sp.sequence_parallel = false;
  EXPECT_EQ(plan_problem(no_sp, g, 8)->field, "/etp");
  Plan odd = whole;
  odd.etp = 3;
  EXPECT_EQ(plan_problem(odd, g, 8)->field, "/etp");
  Plan dense_whole = whole;
  dense_whole.ep = 1;
  EXPECT_EQ(plan_problem(dense_whole, model_load("llama-tiny").graph, 8)->field, "/etp");
  EXPECT_EQ(plan_to_json(whole).at("etp"), 1);
  EXPECT_EQ(plan_from_json(plan_to_json(whole), "p.json"), whole);
  EXPECT_FALSE(plan_to_json(split).contains("etp"));
}

// An EP group spanning nodes sends its all-to-alls through the NICs, as flows sharing them with
// the data-parallel traffic: a separate in-layer event of the op, as long as the cost model's
// all-to-all when nothing else uses the link. Inside a node it stays with the TP collectives.
TEST(ExpertParallel, AllToAllAcrossNodesIsAFlowOnTheNetwork) {
  const LayerGraph g = model_load("moe-tiny").graph;
  const auto tp_events = [&](int gpus, int ep) {
    const Cluster c = hand_cluster(gpus);
    CostModel model(g, c);
    Plan p = moe_plan(gpus, ep);
    p.overlap_grad_reduce = false; // nothing else on the links during the forward
    const SimulationResult r = simulate_iteration(model, p);
    std::vector<double> durations;
    for (const Event& e : r.timeline.events) {
      if (e.rank == 0 && e.category == Category::tp_comm && e.name.starts_with("forward u1 mb0"))
        durations.push_back(e.duration_s());
    }
    return std::pair{durations, unit_costs(g, c, unit_cost_key(p))[1].ep_fwd_s};
  };
  const auto [inside, inside_ep] = tp_events(8, 8);
  ASSERT_EQ(inside.size(), 1u);
  EXPECT_NEAR(inside[0], inside_ep, 1e-12);
  const auto [across, across_ep] = tp_events(16, 16);
  ASSERT_EQ(across.size(), 1u); // tp = 1: the all-to-all is the layer's only collective
  EXPECT_NEAR(across[0], across_ep, 1e-9 * across_ep);
  EXPECT_GT(across_ep, inside_ep); // the NIC is slower than the node's links
}

// With the data-parallel reductions overlapping the backward, an all-to-all on the NICs
// shares them with a reduction and takes longer than alone; one on the node's links does not.
TEST(ExpertParallel, AllToAllAcrossNodesSharesTheNicWithGradientReductions) {
  const LayerGraph g = model_load("moe-tiny").graph;
  const auto slowest = [&](int ep) {
    // 4 GPUs per node: 4 NICs (32 GB/s attained) are slower than the node's links (50 GB/s),
    // so the data-parallel ring is bound by the NICs.
    Cluster c = hand_cluster(16);
    c.node.devices_per_node = 4;
    c.network.num_nodes = 4;
    CostModel model(g, c);
    const Plan p = moe_plan(16, ep); // ZeRO-0: reductions after the last micro-batch
    const SimulationResult r = simulate_iteration(model, p);
    const double alone = unit_costs(g, c, unit_cost_key(p))[1].ep_bwd_s;
    double worst = 0;
    for (const Event& e : r.timeline.events) {
      if (e.rank == 0 && e.category == Category::tp_comm && e.name.starts_with("backward u1 mb3"))
        worst = std::max(worst, e.duration_s() / alone);
    }
    return worst;
  };
  EXPECT_NEAR(slowest(4), 1.0, 1e-9);
  EXPECT_GT(slowest(16), 1.0 + 1e-3);
}

} // namespace
} // namespace parallax
