// Context parallelism by hand: the K/V block of a rank, ring attention's overlap of a 2- and a
// 4-rank CP step, the all-gather variant, the per-rank share of the work and memory, the
// gradient group, the feasibility rule, the plan file and the search.
#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/models/transformer_builder.hpp"
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

Plan cp_plan(int dp, int cp, std::int64_t micro = 1, CpComm comm = CpComm::p2p) {
  return {.dp = dp,
          .cp = cp,
          .cp_comm = comm,
          .micro_batch_size = micro,
          .global_batch_size = 4 * dp * micro,
          .precision = Precision::bf16};
}

const Layer& attention_core(const LayerGraph& g) {
  for (std::size_t v = 0; v < g.num_layers(); ++v) {
    if (g.layer(v).kind == LayerKind::attention) {
      return g.layer(v);
    }
  }
  throw std::logic_error("no attention layer");
}

// llama-tiny: s 32, 4 heads of 16, 2 key/value heads. A rank of cp = 2 holds 16 tokens, whose
// K and V are 2 heads × (16 + 16) values each: 16 · 64 · 2 bytes = 2048 bytes per sequence.
TEST(ContextParallel, KvBlockOfARankByHand) {
  const LayerGraph g = model_load("llama-tiny").graph;
  const Layer& core = attention_core(g);
  EXPECT_DOUBLE_EQ(cp_kv_bytes(core, g.info(), unit_cost_key(cp_plan(1, 2))), 2048.0);
  EXPECT_DOUBLE_EQ(cp_kv_bytes(core, g.info(), unit_cost_key(cp_plan(1, 4, 2))), 2048.0);
  Plan tp2 = cp_plan(1, 2);
  tp2.tp = 2; // each TP rank holds one of the two key/value heads
  EXPECT_DOUBLE_EQ(cp_kv_bytes(core, g.info(), unit_cost_key(tp2)), 1024.0);
  EXPECT_EQ(cp_kv_bytes(core, g.info(), unit_cost_key(cp_plan(2, 1))), 0.0);
  EXPECT_EQ(cp_kv_bytes(g.layer(0), g.info(), unit_cost_key(cp_plan(1, 2))), 0.0); // embedding
}

// The hand cluster's intra-node link: 100 GB/s at 50%, no latency. One hop of the 2048-byte
// block takes x = 2048 / 50e9 s.
TEST(ContextParallel, RingAttentionOverlapOfATwoRankStepByHand) {
  const LayerGraph g = model_load("llama-tiny").graph;
  const Cluster c = hand_cluster(2);
  const Layer& core = attention_core(g);
  const UnitCostKey key = unit_cost_key(cp_plan(1, 2));
  const double x = 2048.0 / 50e9;
  // Attention steps longer than a hop hide it; the backward's K/V and gradients (2x per hop)
  // too, but the accumulated gradients' hop home is exposed.
  const CpExchange slow = cp_exchange_s(core, g.info(), c, key, 4 * x, 8 * x);
  EXPECT_DOUBLE_EQ(slow.bytes, 2048.0);
  EXPECT_DOUBLE_EQ(slow.fwd_s, 0.0);
  EXPECT_DOUBLE_EQ(slow.bwd_s, x);
  // A step of half a hop (attention 1·x forward over 2 steps) leaves half a hop exposed; the
  // backward (2x per hop, 3x of attention over 2 steps) half a hop plus the last one.
  const CpExchange fast = cp_exchange_s(core, g.info(), c, key, x, 3 * x);
  EXPECT_NEAR(fast.fwd_s, 0.5 * x, 1e-18);
  EXPECT_NEAR(fast.bwd_s, 0.5 * x + x, 1e-18);
  // No attention work at all: every hop shows.
  const CpExchange bare = cp_exchange_s(core, g.info(), c, key, 0.0, 0.0);
  EXPECT_DOUBLE_EQ(bare.fwd_s, x);
  EXPECT_DOUBLE_EQ(bare.bwd_s, 3 * x);
}

TEST(ContextParallel, FourRankRingAndTheAllGatherVariantByHand) {
  const LayerGraph g = model_load("llama-tiny").graph;
  const Cluster c = hand_cluster(4);
  const Layer& core = attention_core(g);
  // cp = 4 with B = 2: 8 tokens of 2 sequences, the same 2048-byte block.
  const double x = 2048.0 / 50e9;
  const CpExchange ring = cp_exchange_s(core, g.info(), c, unit_cost_key(cp_plan(1, 4, 2)), 0, 0);
  EXPECT_NEAR(ring.fwd_s, 3 * x, 1e-18); // three hops
  EXPECT_NEAR(ring.bwd_s, 3 * 2 * x + x, 1e-18);
  // Attention of 2x per step (8x over 4 steps) hides each forward hop.
  const CpExchange hidden =
      cp_exchange_s(core, g.info(), c, unit_cost_key(cp_plan(1, 4, 2)), 8 * x, 8 * x);
  EXPECT_DOUBLE_EQ(hidden.fwd_s, 0.0);
  EXPECT_DOUBLE_EQ(hidden.bwd_s, x);
  // All-gather: the 4 blocks gathered ((n−1)/n of 8192 bytes over the link) before the
  // forward and again before the backward, their gradients reduce-scattered after it; however
  // long the attention runs.
  const CpExchange ag = cp_exchange_s(
      core, g.info(), c, unit_cost_key(cp_plan(1, 4, 2, CpComm::all_gather)), 8 * x, 8 * x);
  const double gather = 0.75 * 8192.0 / 50e9;
  EXPECT_NEAR(ag.fwd_s, gather, 1e-18);
  EXPECT_NEAR(ag.bwd_s, 2 * gather, 1e-18);
}

// A rank of cp = 2 with two sequences per micro-batch holds as many tokens as a rank of cp = 1
// with one: the same linear-layer work, activations and model FLOPs.
TEST(ContextParallel, ARankComputesAndKeepsItsShareOfTheTokens) {
  const LayerGraph g = model_load("llama-tiny").graph;
  const Cluster c = hand_cluster(2);
  const std::vector<UnitCost> one = unit_costs(g, c, unit_cost_key(cp_plan(2, 1, 1)));
  const std::vector<UnitCost> two = unit_costs(g, c, unit_cost_key(cp_plan(1, 2, 2)));
  ASSERT_EQ(one.size(), two.size());
  for (std::size_t u = 0; u < one.size(); ++u) {
    EXPECT_DOUBLE_EQ(two[u].act_bytes, one[u].act_bytes) << "unit " << u;
    EXPECT_DOUBLE_EQ(two[u].act_full_bytes, one[u].act_full_bytes) << "unit " << u;
    EXPECT_DOUBLE_EQ(two[u].model_flops, one[u].model_flops) << "unit " << u;
    EXPECT_DOUBLE_EQ(two[u].params, one[u].params) << "unit " << u;
  }
  // The block's attention exchanges K/V: hidden in the forward behind the tiny model's kernel
  // overheads, but the gradients' last hop home shows in the backward.
  EXPECT_EQ(two[1].cp_fwd_s, 0.0);
  EXPECT_GT(two[1].cp_bwd_s, 0.0);
  EXPECT_EQ(one[1].cp_bwd_s, 0.0);
  EXPECT_DOUBLE_EQ(two[1].tp_bwd_s, two[1].cp_bwd_s); // tp = 1: the exchange is all there is
}

// The cp ranks hold the same parameters: gradients reduce, and ZeRO shards, over dp·cp.
TEST(ContextParallel, GradientsReduceAndZeroShardsOverDpTimesCp) {
  const LayerGraph g = model_load("llama-tiny").graph;
  const Cluster c = hand_cluster(8);
  Plan p = cp_plan(2, 4);
  p.zero_stage = 1;
  EXPECT_EQ(dp_span(p, c), (GroupSpan{8, 8, 1, 1}));
  EXPECT_EQ(cp_span(p, c), (GroupSpan{4, 4, 1, 1}));
  CostModel model(g, c);
  const std::vector<CostModel::RankLoad> loads = model.rank_loads(p, {{0, g.num_units()}});
  const MemoryBreakdown m = model.rank_memory(p, loads[0], 0);
  EXPECT_NEAR(m.optimizer, loads[0].params / 8 * 12.0, 1e-6);
  // The step program reduces gradients although dp = 1.
  Plan solo = cp_plan(1, 2);
  EXPECT_EQ(data_parallel_comm(solo, false).gradients, StepCollective::all_reduce);
}

TEST(ContextParallel, TheSequenceMustSplitInto2CpChunks) {
  const LoadedModel m = model_load("llama-tiny"); // 32 tokens
  EXPECT_FALSE(cp_problem(m.graph.info(), 16));
  const auto bad = cp_problem(m.graph.info(), 32);
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->field, "/cp");
  Plan p = cp_plan(1, 32);
  p.global_batch_size = 4;
  ASSERT_TRUE(plan_problem(p, m.graph, 32));
  EXPECT_EQ(plan_problem(p, m.graph, 32)->field, "/cp");
  EXPECT_EQ(plan_problem(cp_plan(2, 2), m.graph, 8)->field, "/dp"); // 2·2 ranks, not 8
}

TEST(ContextParallel, PlanFileCarriesCpAndItsExchange) {
  Plan p = cp_plan(2, 4, 1, CpComm::all_gather);
  const Json doc = plan_to_json(p);
  EXPECT_EQ(doc.at("cp"), 4);
  EXPECT_EQ(doc.at("cp_comm"), "all_gather");
  EXPECT_EQ(plan_from_json(doc, "p.json"), p);
  EXPECT_FALSE(plan_to_json(cp_plan(2, 1)).contains("cp")); // the default is not written
  Json bad = doc;
  bad["cp_comm"] = "a2a";
  try {
    plan_from_json(bad, "p.json");
    FAIL() << "accepted cp_comm a2a";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "/cp_comm");
    EXPECT_NE(std::string(e.what()).find("all_gather"), std::string::npos);
  }
  bad = doc;
  bad["cp"] = 0;
  EXPECT_THROW(plan_from_json(bad, "p.json"), InputError);
}

// A long sequence does not fit without splitting it: the search chooses cp > 1, and a pin
// holds.
TEST(ContextParallel, TheSearchSplitsALongSequence) {
  ModelConfig cfg = model_load("llama3-8b").config.value();
  cfg.seq_length = 131072;
  cfg.max_position_embeddings = 131072;
  const LayerGraph g = transformer_build_graph(cfg);
  const Cluster c = cluster_load("dgx-h100");
  PlanRequest req{.gpus = 64, .global_batch_size = 64, .top_k = 5};
  const PlanSearchResult all = plan_search(g, c, req);
  ASSERT_FALSE(all.plans.empty());
  for (const RankedPlan& r : all.plans) {
    EXPECT_GT(r.estimate.plan.cp, 1) << plan_label(r.estimate.plan);
    EXPECT_TRUE(r.estimate.fits);
  }
  req.pins.cp = 8;
  const PlanSearchResult pinned = plan_search(g, c, req);
  ASSERT_FALSE(pinned.plans.empty());
  for (const RankedPlan& r : pinned.plans) {
    EXPECT_EQ(r.estimate.plan.cp, 8);
    EXPECT_FALSE(plan_problem(r.estimate.plan, g, 64));
    // The simulator ran it (the re-ranking) and agrees with the analytic model.
    ASSERT_TRUE(r.analytic);
    EXPECT_NEAR(r.estimate.iteration_time_s, r.analytic->iteration_time_s,
                0.1 * r.analytic->iteration_time_s);
  }
}

} // namespace
} // namespace parallax
