#include "parallax/core/layer_graph_json.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/core/step_program.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/transformer_builder.hpp"
#include "parallax/simulator/collectives.hpp"
#include "parallax/simulator/iteration_simulator.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

namespace parallax {
namespace {

// A device whose GEMMs run at a flat efficiency, with fast memory and no latencies, so a chain
// of identical units has hand-computable timelines.
Cluster flat_cluster(int devices, double intra_gbps) {
  Cluster c;
  c.name = "flat";
  c.device.name = "flat";
  c.device.kind = "cpu";
  c.device.peak_tflops = {{Precision::fp32, 1.0}, {Precision::bf16, 1.0}};
  c.device.memory_gib = 1024;
  c.device.memory_bandwidth_gbps = 1e9;
  c.device.gemm_efficiency = {{1.0, 1.0}, {1e30, 1.0}};
  c.node = {devices, intra_gbps, 0.0};
  c.network = {1, intra_gbps, 0.0, Topology::single_switch, 1.0};
  return c;
}

// `units` identical units: one fused GEMM layer each (2·k FLOPs per sequence), `params` each.
LayerGraph chain_graph(int units, std::int64_t k, std::int64_t params) {
  Json layers = Json::array();
  Json edges = Json::array();
  for (int u = 0; u < units; ++u) {
    layers.push_back({{"name", "u" + std::to_string(u)},
                      {"kind", "linear"},
                      {"unit", u},
                      {"fused", true},
                      {"params", params},
                      {"gemms", Json::array({{{"m", 1}, {"n", 1}, {"k", k}}})}});
    if (u > 0) {
      edges.push_back({u - 1, u});
    }
  }
  return layer_graph_from_json({{"name", "chain"},
                                {"seq_length", 1},
                                {"hidden_size", 1},
                                {"layers", layers},
                                {"edges", edges}},
                               "chain");
}

Plan chain_plan(int pp, std::int64_t m, Schedule s, int v = 1) {
  Plan p;
  p.pp = pp;
  p.global_batch_size = m;
  p.schedule = s;
  p.virtual_stages = v;
  p.precision = Precision::fp32;
  return p;
}

struct StageTimes {
  double f = 0; // forward of one micro-batch on one stage
  double b = 0;
};

StageTimes stage_times(CostModel& model, const Plan& plan, int units_per_stage) {
  const UnitCost& u = model.units({plan.tp, false, plan.micro_batch_size, plan.precision}).at(0);
  return {u.fwd_s * units_per_stage, u.bwd_s * units_per_stage};
}

// A small GPT (h 256, 8 heads, s 128, V 1024) of `layers` blocks.
LayerGraph small_gpt(int layers) {
  ModelConfig config;
  config.name = "small";
  config.num_layers = layers;
  config.hidden_size = 256;
  config.num_attention_heads = 8;
  config.num_kv_heads = 8;
  config.ffn_hidden_size = 1024;
  config.vocab_size = 1024;
  config.seq_length = 128;
  config.max_position_embeddings = 128;
  return transformer_build_graph(config);
}

TEST(SimulateIteration, TwoStageOneFOneBWithFourMicroBatches) {
  const LayerGraph g = chain_graph(2, 1'000'000, 0);
  const Cluster c = flat_cluster(2, 1e6);
  CostModel model(g, c);
  const Plan plan = chain_plan(2, 4, Schedule::one_f_one_b);
  const StageTimes t = stage_times(model, plan, 1);
  SimulationResult r = simulate_iteration(model, plan);
  // Hand-drawn 1F1B timeline with f = 1, b = 2: stage 1 finishes its last backward at 13 and
  // stage 0 at 15 = (m + p − 1)·(f + b).
  const double optimizer = r.estimate.breakdown.optimizer;
  EXPECT_NEAR(r.estimate.iteration_time_s - optimizer, 5 * (t.f + t.b), 1e-6 * (t.f + t.b));
  EXPECT_NEAR(r.estimate.breakdown.bubble, 1 * (t.f + t.b), 1e-3 * (t.f + t.b));
  EXPECT_EQ(r.simulated_ranks, 2);
  // Every forward and backward of every micro-batch on both stages is in the timeline.
  int forwards = 0;
  int backwards = 0;
  for (const Event& e : r.timeline.events) {
    forwards += e.category == Category::forward;
    backwards += e.category == Category::backward;
  }
  EXPECT_EQ(forwards, 8);
  EXPECT_EQ(backwards, 8);
}

TEST(SimulateIteration, BubbleFractionsMatchClosedForms) {
  const int p = 4;
  const std::int64_t m = 8;
  const LayerGraph g = chain_graph(16, 1'000'000, 0);
  const Cluster c = flat_cluster(4, 1e6);
  CostModel model(g, c);
  for (Schedule s : {Schedule::gpipe, Schedule::one_f_one_b}) {
    const Plan plan = chain_plan(p, m, s);
    const StageTimes t = stage_times(model, plan, 4);
    SimulationResult r = simulate_iteration(model, plan, {.record_timeline = false});
    SCOPED_TRACE(schedule_name(s));
    // (p − 1)/m of the ideal m·(f + b).
    EXPECT_NEAR(r.estimate.breakdown.bubble / (m * (t.f + t.b)), double(p - 1) / m, 1e-3);
  }
  const Plan interleaved = chain_plan(p, m, Schedule::interleaved, 2);
  const StageTimes t = stage_times(model, interleaved, 4);
  SimulationResult r = simulate_iteration(model, interleaved, {.record_timeline = false});
  // Divided by v for interleaving.
  EXPECT_NEAR(r.estimate.breakdown.bubble / (m * (t.f + t.b)), double(p - 1) / m / 2, 2e-3);
}

TEST(SimulateIteration, DataParallelReductionHiddenOrExposed) {
  const LayerGraph g = chain_graph(4, 1'000'000, 1'000'000);
  Plan plan = chain_plan(1, 2, Schedule::one_f_one_b);
  plan.dp = 2;
  plan.micro_batch_size = 1; // one micro-batch per replica
  {
    // Fast links: only the last bucket's all-reduce is left after the backward.
    const Cluster c = flat_cluster(2, 1e6);
    CostModel model(g, c);
    const StageTimes t = stage_times(model, plan, 4);
    SimulationResult r = simulate_iteration(model, plan, {.record_timeline = false});
    EXPECT_LT(r.estimate.breakdown.dp_comm, 0.01 * (t.f + t.b));
  }
  for (const char* kind : {"gpu", "cpu"}) {
    // Slow links. A GPU runs the four all-reduces back to back on its communication stream
    // once the first bucket is ready, beside the rest of the backward; a CPU's cores move the
    // data themselves, so each all-reduce sits between the backwards of two units.
    Cluster c = flat_cluster(2, 0.001);
    c.device.kind = kind;
    CostModel model(g, c);
    const StageTimes t = stage_times(model, plan, 4);
    const double allreduce =
        collective_time_s(c, Collective::all_reduce, 1e6 * 4.0, dp_span(plan, c));
    ASSERT_GT(allreduce, 10 * (t.f + t.b));
    SimulationResult r = simulate_iteration(model, plan, {.record_timeline = false});
    const bool gpu = std::string(kind) == "gpu";
    const double backward = gpu ? t.b / 4 : t.b;
    // On a GPU the last three quarters of the backward run beside the all-reduces, slowed by
    // the stack's interference.
    const double interference = gpu ? Stack{}.overlap_compute_slowdown * 0.75 * t.b : 0.0;
    const double expected =
        t.f + backward + 4 * allreduce + r.estimate.breakdown.optimizer + interference;
    EXPECT_NEAR(r.estimate.iteration_time_s, expected, 1e-9) << kind;
    // The analytic model exposes the same communication.
    const PlanEstimate analytic = model.estimate(plan);
    EXPECT_NEAR(analytic.iteration_time_s, r.estimate.iteration_time_s,
                0.02 * r.estimate.iteration_time_s)
        << kind;
  }
  {
    // A stack that does not overlap gradient reduction (Megatron-LM's local DDP): on a GPU the
    // four all-reduces start only after the whole backward, as on a CPU.
    Cluster c = flat_cluster(2, 0.001);
    c.device.kind = "gpu";
    CostModel model(g, c);
    const StageTimes t = stage_times(model, plan, 4);
    const double allreduce =
        collective_time_s(c, Collective::all_reduce, 1e6 * 4.0, dp_span(plan, c));
    Plan serial = plan;
    serial.overlap_grad_reduce = false;
    SimulationResult r = simulate_iteration(model, serial, {.record_timeline = false});
    const double expected = t.f + t.b + 4 * allreduce + r.estimate.breakdown.optimizer;
    EXPECT_NEAR(r.estimate.iteration_time_s, expected, 1e-9);
    EXPECT_NEAR(r.estimate.breakdown.dp_comm, 4 * allreduce, 1e-9);
    const PlanEstimate analytic = model.estimate(serial);
    EXPECT_NEAR(analytic.iteration_time_s, expected, 0.02 * expected);
  }
}

TEST(SimulateIteration, SymmetricReductionMatchesFullSimulation) {
  const LayerGraph g = small_gpt(8);
  const Cluster base = cluster_load("dgx-a100-80g");
  std::mt19937 rng(11);
  int checked = 0;
  for (int trial = 0; trial < 60 && checked < 25; ++trial) {
    Plan p;
    p.dp = 1 << (rng() % 3);
    p.tp = 1 << (rng() % 3);
    p.pp = 1 << (rng() % 3);
    if (p.world_size() > 16) {
      continue;
    }
    p.zero_stage = p.dp > 1 ? static_cast<int>(rng() % 4) : 0;
    p.micro_batch_size = 1 + static_cast<int>(rng() % 2);
    p.global_batch_size = p.dp * p.micro_batch_size * p.pp * (1 + static_cast<int>(rng() % 2));
    p.recompute = static_cast<Recompute>(rng() % 3);
    p.sequence_parallel = p.tp > 1 && rng() % 2 == 0;
    p.schedule = p.pp > 1 ? static_cast<Schedule>(rng() % 3) : Schedule::one_f_one_b;
    p.virtual_stages = p.schedule == Schedule::interleaved ? 2 : 1;
    p.overlap_grad_reduce = rng() % 3 != 0;
    Cluster c = base.with_devices(p.world_size());
    c.device.kind = trial % 2 == 0 ? "gpu" : "cpu";          // CPU ranks serialise DP communication
    c.network.oversubscription = trial % 3 == 0 ? 3.0 : 1.0; // nodes' uplinks contended
    CostModel model(g, c);
    SCOPED_TRACE(plan_to_json(p).dump() + " on a " + c.device.kind);
    SimulationResult reduced =
        simulate_iteration(model, p, {.symmetric = true, .record_timeline = false});
    SimulationResult full =
        simulate_iteration(model, p, {.symmetric = false, .record_timeline = false});
    EXPECT_EQ(full.simulated_ranks, p.world_size());
    EXPECT_EQ(reduced.simulated_ranks, p.pp);
    EXPECT_NEAR(full.estimate.iteration_time_s, reduced.estimate.iteration_time_s,
                1e-9 * reduced.estimate.iteration_time_s);
    EXPECT_NEAR(full.estimate.breakdown.bubble, reduced.estimate.breakdown.bubble,
                1e-9 * reduced.estimate.iteration_time_s);
    EXPECT_NEAR(full.estimate.memory.total(), reduced.estimate.memory.total(), 1.0);
    // The simulated iteration is never shorter than the compute of the busiest stage.
    EXPECT_GE(reduced.estimate.iteration_time_s * (1 + 1e-9), reduced.estimate.breakdown.compute);
    ++checked;
  }
  EXPECT_GE(checked, 20);
}

// The simulator's task graph is the step program: on every rank of random plans, the events of
// the simulated timeline are the program's ops by name (an op's TP collective as "<op> tp"), and
// no op starts before the ops it waits for have ended.
TEST(SimulateIteration, TaskGraphIsTheStepProgram) {
  const LayerGraph g = small_gpt(8);
  const Cluster base = cluster_load("dgx-a100-80g");
  std::mt19937 rng(5);
  for (int trial = 0; trial < 40; ++trial) {
    Plan p;
    p.dp = 1 << (rng() % 2);
    p.tp = 1 << (rng() % 2);
    p.pp = 1 << (rng() % 3);
    p.zero_stage = p.dp > 1 ? static_cast<int>(rng() % 4) : 0;
    p.micro_batch_size = 1;
    p.global_batch_size = p.dp * p.pp * (1 + static_cast<int>(rng() % 2));
    p.recompute = static_cast<Recompute>(rng() % 3);
    p.sequence_parallel = p.tp > 1 && rng() % 2 == 0;
    p.schedule = p.pp > 1 ? static_cast<Schedule>(rng() % 3) : Schedule::one_f_one_b;
    p.virtual_stages = p.schedule == Schedule::interleaved ? 2 : 1;
    p.overlap_grad_reduce = rng() % 3 != 0;
    p.grad_sync =
        p.zero_stage == 0 && rng() % 4 == 0 ? GradSync::parameter_server : GradSync::allreduce;
    const Cluster c = base.with_devices(p.world_size());
    CostModel model(g, c);
    SCOPED_TRACE(plan_to_json(p).dump());
    const SimulationResult r = simulate_iteration(model, p, {.symmetric = false});
    for (int rank = 0; rank < p.world_size(); ++rank) {
      const StepProgram prog =
          step_program(p,
                       {.units = g.num_units(),
                        .tied_embeddings = g.info().tied_embeddings,
                        .reshard_after_forward = model.stack().sharding.reshard_after_forward},
                       rank);
      std::map<std::string, std::pair<double, double>> spans; // first start, last end
      for (const Event& e : r.timeline.events) {
        if (e.rank != rank || e.name.ends_with(" tp"))
          continue;
        auto [it, fresh] = spans.try_emplace(e.name, e.start_s, e.end_s);
        EXPECT_TRUE(fresh) << "two tasks for " << e.name;
      }
      ASSERT_EQ(spans.size(), prog.ops.size()) << "rank " << rank;
      for (const StepOp& op : prog.ops) {
        ASSERT_TRUE(spans.contains(op.name())) << op.name();
        for (int a : op.after) {
          const std::string before = prog.ops[static_cast<std::size_t>(a)].name();
          EXPECT_LE(spans.at(before).second, spans.at(op.name()).first + 1e-12)
              << op.name() << " waits for " << before;
        }
      }
    }
  }
}

TEST(SimulateIteration, AgreesWithAnalyticModelOnLargePlans) {
  const LayerGraph g = transformer_build_graph([] {
    ModelConfig c;
    c.name = "gpt-13b";
    c.num_layers = 40;
    c.hidden_size = 5120;
    c.num_attention_heads = 40;
    c.num_kv_heads = 40;
    c.ffn_hidden_size = 20480;
    c.vocab_size = 51200;
    c.seq_length = 2048;
    c.max_position_embeddings = 2048;
    return c;
  }());
  const Cluster c = cluster_load("dgx-a100-80g").with_devices(64);
  CostModel model(g, c);
  for (const char* text :
       {R"({"dp": 8, "tp": 8, "pp": 1, "micro_batch_size": 2, "global_batch_size": 256})",
        R"({"dp": 2, "tp": 4, "pp": 8, "micro_batch_size": 1, "global_batch_size": 256,
            "schedule": "interleaved", "virtual_stages": 5, "recompute": "full"})",
        R"({"dp": 64, "tp": 1, "pp": 1, "zero_stage": 3, "micro_batch_size": 1,
            "global_batch_size": 256, "recompute": "full"})"}) {
    const Plan plan = plan_from_json(Json::parse(text), "plan");
    SCOPED_TRACE(text);
    const double analytic = model.estimate(plan).iteration_time_s;
    const double simulated =
        simulate_iteration(model, plan, {.record_timeline = false}).estimate.iteration_time_s;
    EXPECT_NEAR(simulated / analytic, 1.0, 0.15);
  }
}

TEST(SimulateIteration, TimelineCarriesEveryRanksStagePeakMemory) {
  const LayerGraph g = small_gpt(8);
  const Cluster c = cluster_load("dgx-a100-80g").with_devices(16);
  CostModel model(g, c);
  // 1F1B keeps pp − s micro-batches of activations on stage s: the first stage peaks highest.
  const Plan plan = plan_from_json(
      Json::parse(R"({"dp": 2, "tp": 2, "pp": 4, "micro_batch_size": 4, "global_batch_size": 64})"),
      "plan");
  for (bool symmetric : {true, false}) {
    SCOPED_TRACE(symmetric ? "symmetric" : "full");
    const SimulationResult r = simulate_iteration(model, plan, {.symmetric = symmetric});
    ASSERT_EQ(r.stage_peak_bytes.size(), 4u);
    ASSERT_EQ(r.timeline.peak_memory_bytes.size(), 16u);
    for (int rank = 0; rank < 16; ++rank) {
      const int stage = rank_coords(plan, rank).pp;
      EXPECT_EQ(r.timeline.peak_memory_bytes[static_cast<std::size_t>(rank)],
                static_cast<std::int64_t>(r.stage_peak_bytes[static_cast<std::size_t>(stage)]));
    }
    for (std::size_t s = 1; s < 4; ++s) {
      EXPECT_GT(r.stage_peak_bytes[s - 1], r.stage_peak_bytes[s]) << s;
    }
    EXPECT_DOUBLE_EQ(r.stage_peak_bytes[0], r.estimate.memory.total());
  }
}

// Duration of rank `rank`'s first pipeline send in a simulated timeline.
double first_send_s(const Timeline& t, int rank) {
  for (const Event& e : t.events) {
    if (e.rank == rank && e.stream == Stream::pp_comm) {
      return e.end_s - e.start_s;
    }
  }
  ADD_FAILURE() << "no send on rank " << rank;
  return 0;
}

TEST(SimulateIteration, OversubscribedFabricSlowsBusyNodesNotLoneFlows) {
  const LayerGraph g = small_gpt(16);
  const Cluster fair = cluster_load("dgx-a100-80g").with_devices(16);
  Cluster tight = fair;
  tight.network.oversubscription = 4;
  // 16 stages of one GPU: only stage 7 sends across the two nodes, alone on its uplink.
  const Plan lone = plan_from_json(
      Json::parse(R"({"dp": 1, "tp": 1, "pp": 16, "global_batch_size": 16})"), "lone");
  // 2 stages of 8 data-parallel GPUs: all eight GPUs of node 0 send at once.
  const Plan busy = plan_from_json(
      Json::parse(R"({"dp": 8, "tp": 1, "pp": 2, "global_batch_size": 16})"), "busy");
  const double latency =
      collective_cost(fair, Collective::send_recv, 1.0, pp_hop_span(busy, fair)).latency_s;
  for (bool symmetric : {true, false}) {
    SCOPED_TRACE(symmetric ? "symmetric" : "full");
    CostModel fair_model(g, fair);
    CostModel tight_model(g, tight);
    const SimulationOptions o{.symmetric = symmetric};
    EXPECT_NEAR(first_send_s(simulate_iteration(tight_model, lone, o).timeline, 7),
                first_send_s(simulate_iteration(fair_model, lone, o).timeline, 7), 1e-12);
    const double busy_fair = first_send_s(simulate_iteration(fair_model, busy, o).timeline, 0);
    const double busy_tight = first_send_s(simulate_iteration(tight_model, busy, o).timeline, 0);
    EXPECT_NEAR((busy_tight - latency) / (busy_fair - latency), 4.0, 1e-9);
  }
}

} // namespace
} // namespace parallax
