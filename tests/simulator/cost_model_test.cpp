#include "parallax/core/error.hpp"
#include "parallax/core/layer_graph_json.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/models/transformer_builder.hpp"
#include "parallax/simulator/collectives.hpp"
#include "parallax/simulator/compute_model.hpp"
#include "parallax/simulator/cost_model.hpp"

#include "hand_cluster.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <vector>

namespace parallax {
namespace {

using test_support::hand_cluster;

constexpr std::int64_t kSeq = 128;
constexpr std::int64_t kHidden = 1024;
constexpr double kParams = 1024.0 * 1024.0;

// `n` identical linear layers h → h in a chain, one per pipeline unit. Each keeps its (s, h)
// input for the weight gradient.
LayerGraph linear_chain(int n) {
  Json layers = Json::array();
  Json edges = Json::array();
  for (int i = 0; i < n; ++i) {
    layers.push_back({{"name", "fc" + std::to_string(i)},
                      {"kind", "linear"},
                      {"unit", i},
                      {"params", static_cast<std::int64_t>(kParams)},
                      {"gemms", {{{"m", kSeq}, {"n", kHidden}, {"k", kHidden}}}},
                      {"saved_act_elems", kSeq * kHidden}});
    if (i > 0) {
      edges.push_back({i - 1, i});
    }
  }
  Json doc = {{"name", "linear-chain"},
              {"seq_length", kSeq},
              {"hidden_size", kHidden},
              {"layers", layers},
              {"edges", edges}};
  return layer_graph_from_json(doc, "linear-chain.json");
}

Plan make_plan(int dp, int tp, int pp, std::int64_t global, std::int64_t micro = 1,
               Schedule schedule = Schedule::one_f_one_b, int v = 1) {
  Plan p;
  p.dp = dp;
  p.tp = tp;
  p.pp = pp;
  p.micro_batch_size = micro;
  p.global_batch_size = global;
  p.schedule = schedule;
  p.virtual_stages = v;
  return p;
}

double rel_diff(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(b), 1e-300);
}

// One stage's time per micro-batch on the critical path, from the estimate's own fields (dp = 1
// and no ZeRO-3, so no exposed per-micro-batch data-parallel part).
double stage_time(const PlanEstimate& e) {
  const auto m = static_cast<double>(e.plan.num_microbatches());
  return (e.breakdown.compute + e.breakdown.tp_comm + e.breakdown.pp_comm) / m;
}

// ---------------------------------------------------------------- one layer, hand-computed

TEST(CostModelOneLayer, ComputeIsForwardPlusTwiceForwardPerMicroBatch) {
  const LayerGraph g = linear_chain(1);
  const Cluster c = hand_cluster(1);
  CostModel model(g, c);
  // Forward: one GEMM of 128×1024×1024 plus a kernel launch; backward: the input and the weight
  // gradient GEMMs, each as large as the forward one.
  const double fwd = gemm_time_s(c, Precision::bf16, Gemm{1, kSeq, kHidden, kHidden}, false) +
                     kernel_overhead_s(c.device);
  // One micro-batch: nothing to accumulate.
  const Plan single = make_plan(1, 1, 1, 1);
  EXPECT_EQ(model.grad_accumulation_s(single, kParams), 0.0);
  const PlanEstimate e1 = model.estimate(single);
  EXPECT_NEAR(e1.breakdown.compute, 3 * fwd, 1e-12 * e1.breakdown.compute);

  const Plan p = make_plan(1, 1, 1, 8);
  const PlanEstimate e = model.estimate(p);
  // Eight micro-batches, each adding its gradients into the accumulation buffer.
  const double accumulate = model.grad_accumulation_s(p, kParams);
  EXPECT_GT(accumulate, 0.0);
  EXPECT_NEAR(e.breakdown.compute, 8 * (3 * fwd + accumulate), 1e-12 * e.breakdown.compute);
  EXPECT_EQ(e.breakdown.tp_comm, 0.0);
  EXPECT_EQ(e.breakdown.pp_comm, 0.0);
  EXPECT_EQ(e.breakdown.dp_comm, 0.0);
  EXPECT_NEAR(e.breakdown.bubble, 0.0, 1e-15);
  EXPECT_GT(e.breakdown.optimizer, 0.0);
  EXPECT_NEAR(e.iteration_time_s, e.breakdown.compute + e.breakdown.optimizer,
              1e-12 * e.iteration_time_s);
  // Micro-batches of 2 sequences: the GEMM's m doubles.
  const Plan p2 = make_plan(1, 1, 1, 8, 2);
  const PlanEstimate e2 = model.estimate(p2);
  const double fwd2 = gemm_time_s(c, Precision::bf16, Gemm{1, 2 * kSeq, kHidden, kHidden}, false) +
                      kernel_overhead_s(c.device);
  EXPECT_NEAR(e2.breakdown.compute, 4 * (3 * fwd2 + model.grad_accumulation_s(p2, kParams)),
              1e-12 * e2.breakdown.compute);
}

TEST(CostModelOneLayer, Fp8BlockLinearPaysItsCastsAndKeepsFp8Weights) {
  // The chain's layer inside transformer block 0, on the hand device with an FP8 peak.
  Json doc = layer_graph_to_json(linear_chain(1));
  doc["layers"][0]["block"] = 0;
  const LayerGraph g = layer_graph_from_json(doc, "fp8-block.json");
  Cluster c = hand_cluster(1);
  c.device.peak_tflops[Precision::fp8] = 200.0;
  CostModel model(g, c);
  Plan p = make_plan(1, 1, 1, 1);
  p.precision = Precision::fp8;
  const Gemm gemm{1, kSeq, kHidden, kHidden};
  // Casts: forward 4 bytes per element of the (s, h) input, backward 4 per element of the (s, h)
  // output gradient, at the attained 500 GB/s; the weight once per step, with the optimizer.
  const double cast_fwd = 4.0 * (kSeq * kHidden) / 500e9;
  const double cast_bwd = 4.0 * (kSeq * kHidden) / 500e9;
  const double gemm8 = gemm_time_s(c, Precision::fp8, gemm, false);
  const double launch = kernel_overhead_s(c.device);
  const PlanEstimate e = model.estimate(p);
  EXPECT_NEAR(e.breakdown.compute, 3 * (gemm8 + launch) + cast_fwd + cast_bwd,
              1e-12 * e.breakdown.compute);
  p.precision = Precision::bf16;
  const PlanEstimate e16 = model.estimate(p);
  EXPECT_NEAR(e.breakdown.optimizer - e16.breakdown.optimizer, 4.0 * kParams / 500e9, 1e-15);
  // Larger micro-batches (m = 8·128) are where FP8 pays: faster than bf16 despite the casts.
  p = make_plan(1, 1, 1, 8, 8);
  p.precision = Precision::fp8;
  const double fp8_compute = model.estimate(p).breakdown.compute;
  p.precision = Precision::bf16;
  EXPECT_LT(fp8_compute, model.estimate(p).breakdown.compute);
  // The FP8 weight and its transpose stay resident: 2 bytes per parameter more than bf16.
  EXPECT_NEAR(e.memory.buffers - e16.memory.buffers, 2.0 * kParams, 1e-6);
}

TEST(CostModelOneLayer, GradientAccumulationIsAMemoryPassOverLocalGradients) {
  const LayerGraph g = linear_chain(1);
  const Cluster c = hand_cluster(2);
  CostModel model(g, c);
  Plan p = make_plan(2, 1, 1, 16);
  const double full = model.grad_accumulation_s(p, kParams);
  // At least reading and writing the 16-bit gradient of every parameter.
  EXPECT_GE(full, memory_time_s(c, 4 * kParams));
  EXPECT_NEAR(model.grad_accumulation_s(p, 2 * kParams), 2 * full, 1e-12 * full);
  p.zero_stage = 1;
  EXPECT_DOUBLE_EQ(model.grad_accumulation_s(p, kParams), full);
  // ZeRO-2 reduce-scatters every micro-batch's gradients: only a 1/dp shard accumulates.
  p.zero_stage = 2;
  EXPECT_NEAR(model.grad_accumulation_s(p, kParams), full / 2, 1e-12 * full);
  p.zero_stage = 3;
  EXPECT_NEAR(model.grad_accumulation_s(p, kParams), full / 2, 1e-12 * full);
}

TEST(CostModelOneLayer, OptimizerStepIsAMemoryPassOverLocalState) {
  const LayerGraph g = linear_chain(1);
  const Cluster c = hand_cluster(2);
  CostModel model(g, c);
  Plan p = make_plan(2, 1, 1, 16);
  const std::vector<CostModel::RankLoad> loads = model.rank_loads(p, stages_even(1, 1));
  ASSERT_EQ(loads.size(), 1U);
  EXPECT_DOUBLE_EQ(loads[0].params, kParams);
  EXPECT_EQ(model.estimate(p).breakdown.optimizer, model.optimizer_time_s(p, loads[0]));
  // Adam reads at least the gradient, the master weight and both moments (2 + 4 + 4 + 4 bytes).
  CostModel::RankLoad big;
  big.params = 1e9;
  const double zero0 = model.optimizer_time_s(p, big);
  EXPECT_GE(zero0, memory_time_s(c, 14 * big.params));
  // ZeRO-1: each rank updates its 1/dp shard, half the bytes.
  p.zero_stage = 1;
  const double zero1 = model.optimizer_time_s(p, big);
  EXPECT_NEAR(zero1 / zero0, 0.5, 1e-3);
  // A calibrated optimizer rate replaces the element-wise one (0.5 in this cluster).
  Cluster measured = c;
  measured.device.optimizer_efficiency = 0.125;
  CostModel slow(g, measured);
  const double overhead = kernel_overhead_s(c.device);
  EXPECT_NEAR((slow.optimizer_time_s(p, big) - overhead) / (zero1 - overhead), 4.0, 1e-9);
}

TEST(CostModelOneLayer, DataParallelHalvesPerRankCompute) {
  const LayerGraph g = linear_chain(1);
  const Cluster c1 = hand_cluster(1);
  const Cluster c2 = hand_cluster(2);
  CostModel m1(g, c1);
  CostModel m2(g, c2);
  const PlanEstimate one = m1.estimate(make_plan(1, 1, 1, 16));
  const PlanEstimate two = m2.estimate(make_plan(2, 1, 1, 16));
  EXPECT_EQ(one.plan.num_microbatches(), 16);
  EXPECT_EQ(two.plan.num_microbatches(), 8);
  EXPECT_NEAR(two.breakdown.compute, 0.5 * one.breakdown.compute, 1e-12 * one.breakdown.compute);
  // Gradient synchronisation: positive, and at most one all-reduce of the bf16 gradients.
  const double allreduce = collective_time_s(c2, Collective::all_reduce, 2.0 * kParams,
                                             group_span(2, 1, c2.node.devices_per_node));
  EXPECT_GT(allreduce, 0.0);
  EXPECT_GE(two.breakdown.dp_comm, 0.0);
  EXPECT_GT(two.breakdown.dp_comm, 0.0); // a single bucket cannot hide behind the backward
  EXPECT_LE(two.breakdown.dp_comm, allreduce * (1 + 1e-12));
  EXPECT_EQ(one.breakdown.dp_comm, 0.0);
  // Twice the devices, same global batch: higher throughput, and tokens are counted globally.
  EXPECT_GT(two.tokens_per_s, one.tokens_per_s);
  EXPECT_NEAR(two.tokens_per_s, 16.0 * kSeq / two.iteration_time_s, 1e-9 * two.tokens_per_s);
}

TEST(CostModelOneLayer, MemoryIsTheZeroPapersMixedPrecisionAccounting) {
  const LayerGraph g = linear_chain(1);
  const Cluster c = hand_cluster(2);
  CostModel model(g, c);
  Plan p = make_plan(2, 1, 1, 8);
  const double act = static_cast<double>(kSeq * kHidden) * 2.0; // one micro-batch in flight
  std::map<int, MemoryBreakdown> mem;
  for (int zero = 0; zero <= 3; ++zero) {
    p.zero_stage = zero;
    mem[zero] = model.memory(p);
    EXPECT_EQ(model.estimate(p).memory, mem[zero]) << zero;
    EXPECT_NEAR(mem[zero].activations, act, 1e-9 * act) << zero;
    EXPECT_GE(mem[zero].buffers, 0.0);
  }
  // 2 bytes of bf16 weights, 2 of gradients, 12 of fp32 master weights and Adam moments.
  EXPECT_DOUBLE_EQ(mem[0].params, 2 * kParams);
  EXPECT_DOUBLE_EQ(mem[0].grads, 2 * kParams);
  EXPECT_DOUBLE_EQ(mem[0].optimizer, 12 * kParams);
  // ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the weights.
  EXPECT_DOUBLE_EQ(mem[1].params, 2 * kParams);
  EXPECT_DOUBLE_EQ(mem[1].grads, 2 * kParams);
  EXPECT_DOUBLE_EQ(mem[1].optimizer, 12 * kParams / 2);
  EXPECT_DOUBLE_EQ(mem[2].params, 2 * kParams);
  EXPECT_DOUBLE_EQ(mem[2].grads, 2 * kParams / 2);
  EXPECT_DOUBLE_EQ(mem[2].optimizer, 12 * kParams / 2);
  EXPECT_DOUBLE_EQ(mem[3].params, 2 * kParams / 2);
  EXPECT_DOUBLE_EQ(mem[3].grads, 2 * kParams / 2);
  EXPECT_DOUBLE_EQ(mem[3].optimizer, 12 * kParams / 2);
  // fp32 training: 4 + 4 bytes and Adam's two fp32 moments, no master copy.
  p.zero_stage = 0;
  p.precision = Precision::fp32;
  const MemoryBreakdown f = model.memory(p);
  EXPECT_DOUBLE_EQ(f.params, 4 * kParams);
  EXPECT_DOUBLE_EQ(f.grads, 4 * kParams);
  EXPECT_DOUBLE_EQ(f.optimizer, 8 * kParams);
  EXPECT_NEAR(f.activations, 2 * act, 1e-9 * act);
}

TEST(CostModelOneLayer, CapacityAndFits) {
  const LayerGraph g = linear_chain(1);
  Cluster c = hand_cluster(1);
  CostModel model(g, c);
  EXPECT_GT(model.memory_capacity_bytes(), 0.0);
  EXPECT_LE(model.memory_capacity_bytes(), c.memory_bytes());
  const PlanEstimate e = model.estimate(make_plan(1, 1, 1, 8));
  EXPECT_TRUE(e.fits);
  EXPECT_EQ(e.memory_capacity_bytes, model.memory_capacity_bytes());
  // A device with 8 MB left after the runtime's context: too small for 16 bytes per parameter.
  Cluster tiny = c;
  tiny.device.memory_gib = (Stack{}.memory.context_bytes + 8e6) / (1 << 30);
  CostModel small(g, tiny);
  const PlanEstimate s = small.estimate(make_plan(1, 1, 1, 8));
  EXPECT_EQ(s.fits, s.memory.total() <= s.memory_capacity_bytes);
  EXPECT_FALSE(s.fits);
  EXPECT_NEAR(s.memory_capacity_bytes, tiny.memory_bytes(), 1.0);
  EXPECT_NEAR(s.memory.runtime, Stack{}.memory.context_bytes, 1.0); // one GPU: no communicators
}

// ---------------------------------------------------------------- pipelines

TEST(CostModelPipeline, OneFOneBBubbleIsPMinusOneStageTimes) {
  const LayerGraph g = linear_chain(2);
  const Cluster c = hand_cluster(2);
  CostModel model(g, c);
  for (Schedule s : {Schedule::one_f_one_b, Schedule::gpipe}) {
    for (std::int64_t m : {1, 2, 8, 32}) {
      SCOPED_TRACE(testing::Message() << static_cast<int>(s) << " m=" << m);
      const PlanEstimate e = model.estimate(make_plan(1, 1, 2, m, 1, s));
      ASSERT_EQ(e.plan.stages, (std::vector<StageRange>{{0, 1}, {1, 2}}));
      const double t = stage_time(e);
      EXPECT_GT(t, 0.0);
      EXPECT_NEAR(e.breakdown.bubble, (2 - 1) * t, 1e-9 * t);
      // The bubble is (p − 1)/m of the steady-state pipeline time.
      EXPECT_NEAR(e.breakdown.bubble / (static_cast<double>(m) * t),
                  (2.0 - 1.0) / static_cast<double>(m), 1e-9);
    }
  }
}

TEST(CostModelPipeline, PipelineSendsAreActivationsBothWays) {
  const LayerGraph g = linear_chain(2);
  const Cluster c = hand_cluster(2);
  CostModel model(g, c);
  const PlanEstimate e = model.estimate(make_plan(1, 1, 2, 8));
  // Per micro-batch each stage sends an (s, h) bf16 activation forward and receives its
  // gradient back: two messages at the NVLink bus bandwidth (no latency in this cluster).
  const double bytes = static_cast<double>(kSeq * kHidden) * 2.0;
  const double per_message = bytes / (100e9 * 0.5);
  EXPECT_NEAR(e.breakdown.pp_comm, 8 * 2 * per_message, 1e-9 * e.breakdown.pp_comm);
  // Splitting a two-layer model over two stages halves the compute per rank.
  const Cluster c1 = hand_cluster(1);
  CostModel whole(g, c1);
  const PlanEstimate one = whole.estimate(make_plan(1, 1, 1, 8));
  EXPECT_NEAR(e.breakdown.compute, 0.5 * one.breakdown.compute, 1e-12 * one.breakdown.compute);
}

TEST(CostModelPipeline, InterleavingDividesTheBubbleByV) {
  const LayerGraph g = linear_chain(4);
  const Cluster c = hand_cluster(2);
  CostModel model(g, c);
  const PlanEstimate flat = model.estimate(make_plan(1, 1, 2, 8));
  const PlanEstimate inter = model.estimate(make_plan(1, 1, 2, 8, 1, Schedule::interleaved, 2));
  ASSERT_EQ(inter.plan.stages.size(), 4U);
  EXPECT_NEAR(flat.breakdown.bubble, stage_time(flat), 1e-9 * stage_time(flat));
  // Megatron-LM: (p − 1)/v stage times.
  EXPECT_NEAR(inter.breakdown.bubble, (2 - 1) * stage_time(inter) / 2, 1e-9 * stage_time(inter));
  EXPECT_LT(inter.breakdown.bubble, flat.breakdown.bubble);
  // The same work, but v times the pipeline messages.
  EXPECT_NEAR(inter.breakdown.compute, flat.breakdown.compute, 1e-12 * flat.breakdown.compute);
  EXPECT_NEAR(inter.breakdown.pp_comm, 2 * flat.breakdown.pp_comm, 1e-12 * flat.breakdown.pp_comm);
}

TEST(CostModelPipeline, UnevenStagesSlowTheSlowestStage) {
  const LayerGraph g = linear_chain(4);
  const Cluster c = hand_cluster(2);
  CostModel model(g, c);
  Plan even = make_plan(1, 1, 2, 8);
  Plan uneven = even;
  uneven.stages = {{0, 3}, {3, 4}};
  const PlanEstimate e = model.estimate(even);
  const PlanEstimate u = model.estimate(uneven);
  EXPECT_EQ(e.plan.stages, (std::vector<StageRange>{{0, 2}, {2, 4}}));
  EXPECT_EQ(u.plan.stages, uneven.stages);
  EXPECT_NEAR(u.breakdown.compute, 1.5 * e.breakdown.compute, 1e-12 * e.breakdown.compute);
  EXPECT_GT(u.iteration_time_s, e.iteration_time_s);
  // Explicit even stages are the default.
  Plan explicit_even = even;
  explicit_even.stages = stages_even(4, 2);
  EXPECT_EQ(model.estimate(explicit_even), e);
}

TEST(ActivationsInFlight, GPipeKeepsAllOneFOneBKeepsPMinusRank) {
  Plan p = make_plan(1, 1, 4, 8, 1, Schedule::gpipe);
  for (int r = 0; r < 4; ++r) {
    EXPECT_DOUBLE_EQ(activations_in_flight(p, r), 8.0) << r;
  }
  p.schedule = Schedule::one_f_one_b;
  for (int r = 0; r < 4; ++r) {
    EXPECT_DOUBLE_EQ(activations_in_flight(p, r), 4.0 - r) << r;
  }
  // Fewer micro-batches than stages: never more than m.
  p.global_batch_size = 2;
  EXPECT_DOUBLE_EQ(activations_in_flight(p, 0), 2.0);
  EXPECT_DOUBLE_EQ(activations_in_flight(p, 1), 2.0);
  EXPECT_DOUBLE_EQ(activations_in_flight(p, 2), 2.0);
  EXPECT_DOUBLE_EQ(activations_in_flight(p, 3), 1.0);
  p.schedule = Schedule::gpipe;
  EXPECT_DOUBLE_EQ(activations_in_flight(p, 3), 2.0);
  // Interleaved: positive, non-increasing along the pipeline, never beyond m.
  for (std::int64_t m : {4, 8, 64}) {
    for (int v : {2, 3, 4}) {
      Plan q = make_plan(1, 1, 4, m, 1, Schedule::interleaved, v);
      double previous = 1e300;
      for (int r = 0; r < 4; ++r) {
        const double a = activations_in_flight(q, r);
        EXPECT_GT(a, 0.0);
        EXPECT_LE(a, static_cast<double>(m));
        EXPECT_LE(a, previous);
        previous = a;
      }
    }
  }
}

TEST(CostModelPipeline, GPipeHoldsMoreActivationsThanOneFOneB) {
  const LayerGraph g = linear_chain(4);
  const Cluster c = hand_cluster(4);
  CostModel model(g, c);
  const double per_mb = static_cast<double>(kSeq * kHidden) * 2.0; // one layer per stage
  const MemoryBreakdown gpipe = model.memory(make_plan(1, 1, 4, 16, 1, Schedule::gpipe));
  const MemoryBreakdown ofob = model.memory(make_plan(1, 1, 4, 16, 1, Schedule::one_f_one_b));
  EXPECT_NEAR(gpipe.activations, 16 * per_mb, 1e-9 * per_mb);
  EXPECT_NEAR(ofob.activations, 4 * per_mb, 1e-9 * per_mb); // the first stage: p in flight
}

// ---------------------------------------------------------------- memory on real models

struct Gpt3 {
  LayerGraph graph = model_load("gpt3-175b").graph;
  Cluster cluster = cluster_load("dgx-a100-80g");
};

TEST(CostModelMemory, ZeroStagesOrderedAndDivided) {
  Gpt3 m;
  for (int pp : {1, 16}) {
    SCOPED_TRACE(pp);
    const Cluster c = m.cluster.with_devices(8 * 8 * pp);
    CostModel model(m.graph, c);
    Plan p = make_plan(8, 8, pp, 1536);
    std::map<int, MemoryBreakdown> mem;
    for (int zero = 0; zero <= 3; ++zero) {
      p.zero_stage = zero;
      mem[zero] = model.memory(p);
    }
    EXPECT_LE(mem[3].total(), mem[2].total());
    EXPECT_LE(mem[2].total(), mem[1].total());
    EXPECT_LE(mem[1].total(), mem[0].total());
    EXPECT_LT(mem[3].total(), mem[0].total());
    if (pp == 1) { // one rank: the fields compare exactly
      EXPECT_DOUBLE_EQ(mem[0].grads, mem[0].params);
      EXPECT_DOUBLE_EQ(mem[0].optimizer, 6 * mem[0].params); // 12 bytes vs 2 per parameter
      EXPECT_DOUBLE_EQ(mem[1].optimizer, mem[0].optimizer / 8);
      EXPECT_DOUBLE_EQ(mem[1].grads, mem[0].grads);
      EXPECT_DOUBLE_EQ(mem[2].grads, mem[0].grads / 8);
      EXPECT_DOUBLE_EQ(mem[2].params, mem[0].params);
      EXPECT_DOUBLE_EQ(mem[3].params, mem[0].params / 8);
      for (int zero = 1; zero <= 3; ++zero) {
        EXPECT_DOUBLE_EQ(mem[zero].activations, mem[0].activations);
      }
      // 175B parameters over tp = 8, in bf16 (the embedding and norms are not split 8 ways).
      const double params = static_cast<double>(m.graph.total_params());
      EXPECT_GE(mem[0].params, 2.0 * params / 8 * (1 - 1e-9));
      EXPECT_LT(mem[0].params, 2.0 * params / 8 * 1.01);
    }
  }
}

TEST(CostModelMemory, RecomputationOrdersActivations) {
  ModelConfig cfg = *model_load("gpt3-175b").config;
  cfg.attention_impl = "standard";
  const LayerGraph g = transformer_build_graph(cfg);
  const Cluster c = cluster_load("dgx-a100-80g").with_devices(8);
  CostModel model(g, c);
  Plan p = make_plan(1, 8, 1, 8);
  std::map<Recompute, PlanEstimate> e;
  for (Recompute r : {Recompute::none, Recompute::selective, Recompute::full}) {
    p.recompute = r;
    e[r] = model.estimate(p);
  }
  const auto act = [&](Recompute r) { return e[r].memory.activations; };
  EXPECT_LT(act(Recompute::full), act(Recompute::selective));
  EXPECT_LT(act(Recompute::selective), act(Recompute::none));
  // ... and pays for it in time: none ≤ selective ≤ full.
  const auto comp = [&](Recompute r) { return e[r].breakdown.compute; };
  EXPECT_LT(comp(Recompute::none), comp(Recompute::selective));
  EXPECT_LT(comp(Recompute::selective), comp(Recompute::full));
  // Full recomputation reruns every forward: less than 4/3 of the none time (forward ≤ 1/3 of it
  // would give exactly 4/3 when backward = 2·forward).
  EXPECT_LE(comp(Recompute::full), comp(Recompute::none) * (4.0 / 3.0) * (1 + 1e-9));
  // Everything else in the memory is unchanged by recomputation.
  EXPECT_EQ(e[Recompute::full].memory.params, e[Recompute::none].memory.params);
  EXPECT_EQ(e[Recompute::full].memory.optimizer, e[Recompute::none].memory.optimizer);

  // With flash attention the s² tensors are never stored: selective has nothing to drop.
  const LayerGraph flash = model_load("gpt3-175b").graph;
  CostModel fmodel(flash, c);
  p.recompute = Recompute::none;
  const double none = fmodel.memory(p).activations;
  p.recompute = Recompute::selective;
  EXPECT_DOUBLE_EQ(fmodel.memory(p).activations, none);
  p.recompute = Recompute::full;
  EXPECT_LT(fmodel.memory(p).activations, none);
}

TEST(CostModelMemory, SequenceParallelShardsActivations) {
  for (const char* name : {"gpt3-175b", "llama3-8b"}) {
    SCOPED_TRACE(name);
    const LayerGraph g = model_load(name).graph;
    const Cluster c = cluster_load("dgx-a100-80g").with_devices(8);
    CostModel model(g, c);
    for (int tp : {2, 4, 8}) {
      for (Recompute r : {Recompute::none, Recompute::selective, Recompute::full}) {
        Plan p = make_plan(8 / tp, tp, 1, 8 / tp * 2);
        p.recompute = r;
        const double without = model.memory(p).activations;
        p.sequence_parallel = true;
        const double with = model.memory(p).activations;
        EXPECT_LT(with, without) << tp << " " << static_cast<int>(r);
      }
    }
  }
}

TEST(UnitCosts, GptBlockActivationsFollowKorthikanti) {
  // Korthikanti et al. 2022, Table 2, per layer and sequence in bytes (B = 1):
  //   no parallelism          s·h·(34 + 5·a·s/h)
  //   tensor parallel         s·h·(10 + 24/t + 5·a·s/(h·t))
  //   + sequence parallel     s·h·(34 + 5·a·s/h)/t
  //   + selective recompute   s·h·34/t
  //   full recomputation      2·s·h (the block's input), /t with sequence parallel
  ModelConfig cfg = *model_load("gpt3-175b").config;
  cfg.attention_impl = "standard";
  const LayerGraph g = transformer_build_graph(cfg);
  const Cluster c = cluster_load("dgx-a100-80g");
  const double s = static_cast<double>(cfg.seq_length);
  const double h = static_cast<double>(cfg.hidden_size);
  const double a = cfg.num_attention_heads;
  const int mid = cfg.num_layers / 2; // a unit holding one block and nothing else
  for (int t : {1, 2, 8}) {
    SCOPED_TRACE(t);
    const UnitCost plain = unit_costs(g, c, {t, false, 1, Precision::bf16})[mid];
    const UnitCost sp = unit_costs(g, c, {t, true, 1, Precision::bf16})[mid];
    EXPECT_LT(rel_diff(plain.act_bytes, s * h * (10 + 24.0 / t + 5 * a * s / (h * t))), 1e-3);
    EXPECT_LT(rel_diff(sp.act_bytes, s * h * (34 + 5 * a * s / h) / t), 1e-3);
    EXPECT_LT(rel_diff(sp.act_selective_bytes, s * h * 34 / t), 1e-3);
    EXPECT_LT(rel_diff(plain.act_selective_bytes, s * h * (10 + 24.0 / t)), 1e-3);
    EXPECT_DOUBLE_EQ(plain.act_full_bytes, 2 * s * h);
    EXPECT_DOUBLE_EQ(sp.act_full_bytes, 2 * s * h / t);
    // Micro-batches of B sequences keep B times as much.
    const UnitCost b4 = unit_costs(g, c, {t, false, 4, Precision::bf16})[mid];
    EXPECT_NEAR(b4.act_bytes, 4 * plain.act_bytes, 1e-9 * b4.act_bytes);
  }
}

TEST(CostModel, ModelFlopsFollowNarayanan) {
  // Narayanan et al. 2021: 72·s·L·h²·(1 + s/(6h) + V/(16·L·h)) FLOPs per sequence, forward and
  // backward, no recomputation.
  const LoadedModel gpt = model_load("gpt3-175b");
  const Cluster c = cluster_load("dgx-a100-80g");
  CostModel model(gpt.graph, c);
  const double s = 2048;
  const double L = 96;
  const double h = 12288;
  const double V = 51200;
  const double expect = 72 * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h));
  EXPECT_LT(rel_diff(model.model_flops_per_sequence(), expect), 0.02);
  EXPECT_DOUBLE_EQ(model.model_flops_per_sequence(),
                   gpt.graph.total_fwd_flops() + gpt.graph.total_bwd_flops());
}

TEST(CostModelMemory, TiedEmbeddingsAreCopiedToTheLastStage) {
  // With pp > 1 the LM head on the last stage keeps its own copy of the tied embedding matrix.
  ModelConfig cfg = *model_load("gpt2-124m").config;
  ASSERT_TRUE(cfg.tied_embeddings);
  const Cluster c = cluster_load("dgx-a100-80g").with_devices(4);
  const double vh = static_cast<double>(cfg.vocab_size * cfg.hidden_size);
  for (bool tied : {true, false}) {
    SCOPED_TRACE(tied);
    cfg.tied_embeddings = tied;
    const LayerGraph g = transformer_build_graph(cfg);
    CostModel model(g, c);
    const auto total_params = [&](const Plan& p) {
      double sum = 0;
      for (const auto& r : model.rank_loads(p, stages_even(g.num_units(), p.pp))) {
        sum += r.params;
      }
      return sum;
    };
    const double all = static_cast<double>(g.total_params());
    EXPECT_NEAR(total_params(make_plan(1, 1, 1, 4)), all, 1e-9 * all);
    EXPECT_NEAR(total_params(make_plan(1, 1, 4, 4)), all + (tied ? vh : 0.0), 1e-9 * all);
    // Split 2 ways by tensor parallelism (norms and some biases stay replicated).
    const double tp2 = total_params(make_plan(1, 2, 2, 4));
    EXPECT_GE(tp2, (all + (tied ? vh : 0.0)) / 2);
    EXPECT_LT(tp2, (all + (tied ? vh : 0.0)) / 2 * 1.01);
  }
}

// ---------------------------------------------------------------- derived figures

void expect_consistent(const PlanEstimate& e, const Cluster& c, const CostModel& model,
                       const LayerGraph& g) {
  const Plan& p = e.plan;
  const double iter = e.iteration_time_s;
  ASSERT_GT(iter, 0.0);
  ASSERT_TRUE(std::isfinite(iter));
  const auto& b = e.breakdown;
  for (double part : {b.compute, b.tp_comm, b.pp_comm, b.dp_comm, b.bubble, b.optimizer}) {
    EXPECT_GE(part, 0.0);
    EXPECT_TRUE(std::isfinite(part));
  }
  EXPECT_LE(rel_diff(b.total(), iter), 1e-9);
  EXPECT_GT(b.compute, 0.0);
  EXPECT_GE(iter, b.compute * (1 - 1e-12));
  EXPECT_GE(iter, (b.compute + b.tp_comm + b.pp_comm) * (1 - 1e-12));
  const double tokens = static_cast<double>(p.global_batch_size * g.info().seq_length);
  EXPECT_LE(rel_diff(e.tokens_per_s, tokens / iter), 1e-12);
  const double flops = static_cast<double>(p.global_batch_size) * model.model_flops_per_sequence();
  EXPECT_LE(rel_diff(e.tflops_per_gpu, flops / (iter * p.world_size()) / 1e12), 1e-12);
  EXPECT_LE(rel_diff(e.mfu, e.tflops_per_gpu * 1e12 / c.peak_flops(p.precision)), 1e-12);
  // No plan beats the hardware's peak.
  EXPECT_GT(e.mfu, 0.0);
  EXPECT_LE(e.mfu, 1.0);
  const auto& m = e.memory;
  for (double part : {m.params, m.grads, m.optimizer, m.activations, m.buffers}) {
    EXPECT_GE(part, 0.0);
    EXPECT_TRUE(std::isfinite(part));
  }
  EXPECT_GT(m.params, 0.0);
  EXPECT_GT(m.activations, 0.0);
  EXPECT_EQ(e.fits, m.total() <= e.memory_capacity_bytes);
  EXPECT_EQ(static_cast<int>(p.stages.size()), p.pp * p.virtual_stages);
  // The bottleneck names the largest share.
  const std::map<std::string, double> parts = {{"compute", b.compute}, {"tp_comm", b.tp_comm},
                                               {"pp_comm", b.pp_comm}, {"dp_comm", b.dp_comm},
                                               {"bubble", b.bubble},   {"optimizer", b.optimizer}};
  ASSERT_TRUE(parts.contains(e.bottleneck)) << e.bottleneck;
  for (const auto& [name, value] : parts) {
    EXPECT_LE(value, parts.at(e.bottleneck)) << name << " vs " << e.bottleneck;
  }
}

TEST(CostModel, DerivedFiguresAgreeOnTheContractPlan) {
  Gpt3 m;
  const Cluster c = m.cluster.with_devices(1024);
  CostModel model(m.graph, c);
  Plan p = make_plan(8, 8, 16, 1536, 1, Schedule::interleaved, 2);
  p.zero_stage = 1;
  p.recompute = Recompute::selective;
  p.sequence_parallel = true;
  const PlanEstimate e = model.estimate(p);
  expect_consistent(e, c, model, m.graph);
  EXPECT_EQ(e.plan.stages, stages_even(96, 32));
  // A fresh model (no cached unit costs) gives the same estimate; so does asking twice.
  CostModel fresh(m.graph, c);
  EXPECT_EQ(fresh.estimate(p), e);
  EXPECT_EQ(model.estimate(p), e);
  EXPECT_EQ(model.memory(p), e.memory);
}

TEST(CostModel, RandomValidPlansAreConsistent) {
  Gpt3 gpt;
  std::map<int, std::unique_ptr<Cluster>> clusters;
  std::map<int, std::unique_ptr<CostModel>> models;
  std::mt19937 rng(20240607);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int units = gpt.graph.num_units();
  int checked = 0;
  for (int iter = 0; iter < 200; ++iter) {
    const int gpus = 1 << pick(0, 10); // 1 … 1024
    const int tp = std::min(gpus, 1 << pick(0, 3));
    std::vector<int> pps;
    for (int d = 1; d <= gpus / tp && d <= units; ++d) {
      if ((gpus / tp) % d == 0) {
        pps.push_back(d);
      }
    }
    const int pp = pps[static_cast<std::size_t>(pick(0, static_cast<int>(pps.size()) - 1))];
    const int dp = gpus / (tp * pp);
    Plan p = make_plan(dp, tp, pp, 1);
    p.micro_batch_size = 1 << pick(0, 2);
    std::int64_t m = pick(1, 48);
    if (pp > 1) {
      p.schedule = static_cast<Schedule>(pick(0, 2));
    } else {
      p.schedule = static_cast<Schedule>(pick(0, 1));
    }
    if (p.schedule == Schedule::interleaved) {
      const int max_v = std::min(8, units / pp);
      if (max_v < 2) {
        p.schedule = Schedule::one_f_one_b;
      } else {
        p.virtual_stages = pick(2, max_v);
        m = pp * pick(1, 4);
      }
    }
    p.global_batch_size = dp * p.micro_batch_size * m;
    p.zero_stage = pick(0, 3);
    p.recompute = static_cast<Recompute>(pick(0, 2));
    p.sequence_parallel = tp > 1 && pick(0, 1) == 1;
    p.grad_sync = static_cast<GradSync>(pick(0, 3));
    if (p.grad_sync == GradSync::parameter_server && dp > 1) {
      p.zero_stage = 0; // a parameter server holds the whole optimizer state
    }
    SCOPED_TRACE(plan_to_json(p).dump());
    ASSERT_NO_THROW(plan_validate(p, gpt.graph, gpus, "random"));
    auto& cluster = clusters[gpus];
    if (!cluster) {
      cluster = std::make_unique<Cluster>(gpt.cluster.with_devices(gpus));
      models[gpus] = std::make_unique<CostModel>(gpt.graph, *cluster);
    }
    CostModel& model = *models[gpus];
    const PlanEstimate e = model.estimate(p);
    expect_consistent(e, *cluster, model, gpt.graph);
    EXPECT_EQ(model.memory(p), e.memory);
    // ZeRO-3 and data parallelism with dp = 1 have nothing to synchronise.
    if (dp == 1) {
      EXPECT_EQ(e.breakdown.dp_comm, 0.0);
    }
    if (pp == 1) {
      EXPECT_NEAR(e.breakdown.bubble, 0.0, 1e-12 * e.iteration_time_s);
      EXPECT_EQ(e.breakdown.pp_comm, 0.0);
    }
    if (tp == 1) {
      EXPECT_EQ(e.breakdown.tp_comm, 0.0);
    }
    ++checked;
  }
  EXPECT_EQ(checked, 200);
}

// ---------------------------------------------------------------- stack terms, by hand

TEST(StackTerms, FsdpGatherScheduleOfTwoLayers) {
  // Two equal layers, ZeRO-3 over two ranks: each rank holds half of every layer and gathers
  // whole layers. Gathered buffers live for the layer in use plus the stack's prefetched and
  // retained ones, or for the whole rank when the forward keeps them for the backward.
  const LayerGraph g = linear_chain(2);
  const Cluster c = hand_cluster(2);
  Plan p = make_plan(2, 1, 1, 8);
  p.zero_stage = 3;
  const double layer_bytes = 2.0 * kParams; // bf16
  auto gathered = [&](Stack stack) { return CostModel(g, c, stack).memory(p).buffers; };
  Stack fsdp2;
  fsdp2.sharding.prefetch_layers = 0;
  fsdp2.sharding.retained_layers = 0;
  EXPECT_DOUBLE_EQ(gathered(fsdp2), 1 * layer_bytes);
  Stack prefetch = fsdp2;
  prefetch.sharding.prefetch_layers = 1;
  EXPECT_DOUBLE_EQ(gathered(prefetch), 2 * layer_bytes);
  Stack fsdp1 = prefetch;
  fsdp1.sharding.retained_layers = 1; // recordStream keeps one more unit reserved
  EXPECT_DOUBLE_EQ(gathered(fsdp1), 3 * layer_bytes);
  Stack keep = fsdp2;
  keep.sharding.reshard_after_forward = false; // both layers stay gathered until the backward
  EXPECT_DOUBLE_EQ(gathered(keep), 2 * layer_bytes);
  // Resharding after the forward gathers every layer twice per micro-batch, keeping them once:
  // with nothing else to hide them, the exposed gathers halve.
  Cluster slow = c;
  slow.node.intra_bandwidth_gbps = 0.01; // gathers dwarf compute
  const double twice = CostModel(g, slow, fsdp2).estimate(p).iteration_time_s;
  const double once = CostModel(g, slow, keep).estimate(p).iteration_time_s;
  EXPECT_LT(once, twice);
  EXPECT_GT(once, 0.4 * twice);
}

TEST(StackTerms, ReservedMemoryRoundsAKnownAllocationSequence) {
  Stack s;
  s.memory.segment_bytes = 2 << 20;
  const double mib = 1 << 20;
  const std::vector<double> sequence = {3 * mib, 1000, 5 * mib + 1, 2 * mib};
  // 3 MiB → 4 MiB, 1000 B → 1024 B (small pool), 5 MiB + 1 → 6 MiB, 2 MiB stays.
  EXPECT_DOUBLE_EQ(allocator_reserved_bytes(s, sequence), 4 * mib + 1024 + 6 * mib + 2 * mib);

  // In the cost model: one layer of 2^20 parameters on one rank holds 2 MiB of weights, 2 MiB
  // of gradients and 12 MiB of optimizer state. With 3 MiB segments the first two reserve
  // 3 MiB each and the optimizer 12 MiB; activations add the fragmentation share.
  const LayerGraph g = linear_chain(1);
  const Cluster c = hand_cluster(1);
  Stack seg3;
  seg3.memory.segment_bytes = 3 * mib;
  seg3.memory.fragmentation = 0.25;
  const MemoryBreakdown m = CostModel(g, c, seg3).memory(make_plan(1, 1, 1, 8));
  EXPECT_DOUBLE_EQ(m.params, 2 * mib);
  EXPECT_NEAR(m.allocator, 1 * mib + 1 * mib + 0 + 0.25 * m.activations, 1.0);
  EXPECT_DOUBLE_EQ(m.reserved(), m.allocated() + m.allocator);
  EXPECT_DOUBLE_EQ(m.total(), m.reserved() + seg3.memory.context_bytes); // one GPU
}

TEST(StackTerms, RuntimeMemoryIsContextPlusOneBufferSetPerCommunicator) {
  const LayerGraph g = linear_chain(2);
  const Cluster c = hand_cluster(8);
  Stack s;
  s.memory.context_bytes = 100;
  s.memory.communicator_bytes = 10;
  // dp2 tp2 pp2: a DP, a TP and a pipeline communicator (the chain has no tied embedding).
  EXPECT_DOUBLE_EQ(CostModel(g, c, s).memory(make_plan(2, 2, 2, 8)).runtime, 130);
  EXPECT_DOUBLE_EQ(CostModel(g, c, s).memory(make_plan(8, 1, 1, 8)).runtime, 110);
  // A CPU profile has neither.
  Cluster cpu = c;
  cpu.device.kind = "cpu";
  EXPECT_DOUBLE_EQ(CostModel(g, cpu, s).memory(make_plan(8, 1, 1, 8)).runtime, 0);
}

TEST(StackTerms, Fp32GradientReductionDoublesGradientBytes) {
  Plan p = make_plan(2, 1, 1, 8);
  Stack bf16_reduce;
  Stack fp32_reduce;
  fp32_reduce.data_parallel.fp32_grad_reduce = true;
  EXPECT_EQ(grad_element_bytes(p, bf16_reduce), 2.0);
  EXPECT_EQ(grad_element_bytes(p, fp32_reduce), 4.0);
  EXPECT_EQ(param_state_bytes(p, fp32_reduce).grads, 4.0);
  p.precision = Precision::fp32; // nothing to widen
  EXPECT_EQ(grad_element_bytes(p, fp32_reduce), 4.0);
  // On the wire: a data-parallel step that cannot hide its all-reduce takes about twice as
  // long in it.
  const LayerGraph g = linear_chain(1);
  Cluster slow = hand_cluster(2);
  slow.node.intra_bandwidth_gbps = 0.01;
  Plan q = make_plan(2, 1, 1, 2);
  q.overlap_grad_reduce = false;
  const double two = CostModel(g, slow, bf16_reduce).estimate(q).breakdown.dp_comm;
  const double four = CostModel(g, slow, fp32_reduce).estimate(q).breakdown.dp_comm;
  EXPECT_GT(two, 0);
  EXPECT_NEAR(four / two, 2.0, 0.01);
}

TEST(StackTerms, HostDispatchBoundsShortLayers) {
  // One GEMM and one other kernel per layer; 1 s of host time each makes the layer host-bound:
  // 2 s forward, 4 s backward.
  const LayerGraph g = linear_chain(1);
  const Cluster c = hand_cluster(1);
  Stack eager;
  eager.host_dispatch_us = 1e6;
  const PlanEstimate e = CostModel(g, c, eager).estimate(make_plan(1, 1, 1, 1));
  EXPECT_NEAR(e.breakdown.compute, 6.0, 1e-9);
  // Without dispatch cost the device's own time stands.
  EXPECT_LT(CostModel(g, c).estimate(make_plan(1, 1, 1, 1)).breakdown.compute, 1e-3);
}

TEST(StackTerms, TransientWorkingMemorySitsOnTopOfTheActivationsInFlight) {
  // The chain's layer with a working set of half its saved activations (a loss forming its
  // softmax beside the logits): the peak is the saved activations in flight plus one working set.
  Json doc = layer_graph_to_json(linear_chain(1));
  doc["layers"][0]["working_act_elems"] = kSeq * kHidden / 2;
  const LayerGraph g = layer_graph_from_json(doc, "working.json");
  const Cluster c = hand_cluster(1);
  const Plan p = make_plan(1, 1, 1, 8, 2);
  const LayerGraph plain = linear_chain(1);
  const double saved = CostModel(plain, c).memory(p).activations;
  const double with_working = CostModel(g, c).memory(p).activations;
  EXPECT_NEAR(with_working - saved, 2.0 * (kSeq * kHidden / 2) * 2 /* bytes */, 1.0);
  // Built models: eager cross-entropy has three working elements per logit, a fused kernel none.
  ModelConfig m = model_load("gpt2-124m").config.value();
  m.loss_impl = "unfused";
  const LayerGraph eager = transformer_build_graph(m);
  m.loss_impl = "fused";
  const LayerGraph fused = transformer_build_graph(m);
  const auto loss_working = [](const LayerGraph& graph) {
    return graph.layer(graph.num_layers() - 1).working_act_elems;
  };
  EXPECT_DOUBLE_EQ(loss_working(eager), 3.0 * static_cast<double>(m.seq_length * m.vocab_size));
  EXPECT_DOUBLE_EQ(loss_working(fused), 0.0);
}

TEST(StackTerms, AsyncTensorParallelHidesItsShareAtTheSlowdown) {
  Json doc = layer_graph_to_json(linear_chain(1));
  doc["layers"][0]["tp_fwd_comm_elems"] = kSeq * kHidden;
  doc["layers"][0]["tp_bwd_comm_elems"] = kSeq * kHidden;
  const LayerGraph g = layer_graph_from_json(doc, "tp.json");
  const Cluster c = hand_cluster(2);
  Stack none;
  none.tp_comm_overlap = 0;
  Stack async = none;
  async.tp_comm_overlap = 0.5;
  async.overlap_compute_slowdown = 0.2;
  const Plan p = make_plan(1, 2, 1, 4);
  const double exposed = CostModel(g, c, none).estimate(p).breakdown.tp_comm;
  const double hidden = CostModel(g, c, async).estimate(p).breakdown.tp_comm;
  ASSERT_GT(exposed, 0);
  // Half stays exposed; the hidden half costs its 20% slowdown: 0.5 + 0.5 × 0.2.
  EXPECT_NEAR(hidden / exposed, 0.6, 1e-9);
}

} // namespace
} // namespace parallax
