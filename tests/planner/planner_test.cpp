#include "parallax/core/error.hpp"
#include "parallax/core/layer_graph_json.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/planner/stage_partition.hpp"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <set>

namespace parallax {
namespace {

// Everything every returned plan must satisfy. The best `simulate_top` plans of the analytic
// ranking are re-ranked by the discrete-event simulator and come first, sorted by their simulated
// objective; the rest follow in analytic order.
void expect_sane_result(const PlanSearchResult& r, const LayerGraph& g, const Cluster& cluster,
                        const PlanRequest& req) {
  EXPECT_EQ(r.candidates, r.pruned_memory + r.evaluated);
  EXPECT_LE(static_cast<std::int64_t>(r.plans.size()), r.evaluated);
  EXPECT_LE(static_cast<int>(r.plans.size()), std::max(1, req.top_k));
  const std::size_t simulated =
      std::min(r.plans.size(), static_cast<std::size_t>(std::max(0, req.simulate_top)));
  const GraphInfo& info = g.info();
  for (std::size_t i = 0; i < r.plans.size(); ++i) {
    const RankedPlan& rp = r.plans[i];
    const PlanEstimate& e = rp.estimate;
    const Plan& p = e.plan;
    SCOPED_TRACE(testing::Message() << "#" << i << " " << plan_to_json(p).dump());
    if (i > 0 && i != simulated) {
      EXPECT_LE(r.plans[i - 1].objective_value, rp.objective_value);
    }
    EXPECT_EQ(rp.analytic.has_value(), i < simulated);
    if (rp.analytic) {
      EXPECT_EQ(rp.analytic->plan, p);
      EXPECT_TRUE(rp.analytic->fits);
      // The simulator refines the analytic figures; it does not disagree by integer factors.
      EXPECT_GT(e.iteration_time_s, 0.5 * rp.analytic->iteration_time_s);
      EXPECT_LT(e.iteration_time_s, 2.0 * rp.analytic->iteration_time_s);
    }
    EXPECT_TRUE(e.fits);
    EXPECT_LE(e.memory.total(), e.memory_capacity_bytes);
    EXPECT_EQ(p.world_size(), rp.gpus);
    if (!req.allow_fewer_gpus) {
      EXPECT_EQ(rp.gpus, req.gpus);
    }
    EXPECT_LE(rp.gpus, req.gpus);
    EXPECT_LE(p.tp, cluster.node.devices_per_node);
    EXPECT_EQ(info.num_attention_heads % p.tp, 0);
    EXPECT_EQ(info.num_kv_heads % p.tp, 0);
    EXPECT_EQ(p.global_batch_size, req.global_batch_size);
    EXPECT_EQ(static_cast<int>(p.stages.size()), p.pp * p.virtual_stages);
    EXPECT_NO_THROW(plan_validate(p, g, rp.gpus, "searched plan"));
    EXPECT_GT(e.iteration_time_s, 0.0);
    EXPECT_TRUE(std::isfinite(rp.objective_value));
    if (req.objective == Objective::throughput) {
      EXPECT_NEAR(rp.objective_value, 1e6 / e.tokens_per_s, 1e-9 * rp.objective_value);
    }
  }
  if (!r.plans.empty()) {
    EXPECT_FALSE(r.closest.has_value());
    EXPECT_TRUE(r.no_fit_reason.empty());
  } else {
    EXPECT_FALSE(r.no_fit_reason.empty());
  }
}

TEST(PlanSearch, TinyModelReturnsEveryFittingPlanSorted) {
  const LoadedModel tiny = model_load("gpt-tiny");
  const Cluster cluster = cluster_load("dgx-a100-80g");
  PlanRequest req;
  req.gpus = 8;
  req.global_batch_size = 16;
  req.top_k = 1000000;
  req.simulate_top = 0; // the analytic ranking alone
  const PlanSearchResult r = plan_search(tiny.graph, cluster, req);
  ASSERT_FALSE(r.plans.empty());
  expect_sane_result(r, tiny.graph, cluster, req);
  for (std::size_t i = 1; i < r.plans.size(); ++i) {
    EXPECT_LE(r.plans[i - 1].objective_value, r.plans[i].objective_value) << i;
  }
  // A tiny model fits everywhere: nothing pruned, every timed plan returned.
  EXPECT_EQ(r.pruned_memory, 0);
  EXPECT_EQ(static_cast<std::int64_t>(r.plans.size()), r.evaluated);
  // The search covers the space: 4 heads allow t = 1, 2, 4; 2 units allow p = 1, 2.
  std::set<int> tps;
  std::set<int> pps;
  std::set<Schedule> schedules;
  for (const auto& rp : r.plans) {
    tps.insert(rp.estimate.plan.tp);
    pps.insert(rp.estimate.plan.pp);
    schedules.insert(rp.estimate.plan.schedule);
  }
  EXPECT_EQ(tps, (std::set<int>{1, 2, 4}));
  EXPECT_EQ(pps, (std::set<int>{1, 2}));
  EXPECT_TRUE(schedules.contains(Schedule::gpipe));
  EXPECT_TRUE(schedules.contains(Schedule::one_f_one_b));
  // Each estimate is what the cost model says for that plan, from scratch.
  const Cluster sized = cluster.with_devices(8);
  CostModel fresh(tiny.graph, sized);
  for (std::size_t i = 0; i < r.plans.size(); i += 7) {
    EXPECT_EQ(fresh.estimate(r.plans[i].estimate.plan), r.plans[i].estimate) << i;
  }
  // top_k keeps the head of the same ranking.
  req.top_k = 5;
  const PlanSearchResult top = plan_search(tiny.graph, cluster, req);
  ASSERT_EQ(top.plans.size(), 5U);
  for (std::size_t i = 0; i < 5; ++i) {
    EXPECT_DOUBLE_EQ(top.plans[i].objective_value, r.plans[i].objective_value);
  }
  EXPECT_EQ(top.candidates, r.candidates);

  // Re-ranking by the simulator: the same plans, re-ordered among the best simulate_top, each
  // keeping the analytic estimate it was chosen by.
  req.top_k = 10;
  req.simulate_top = 10;
  const PlanSearchResult sim = plan_search(tiny.graph, cluster, req);
  expect_sane_result(sim, tiny.graph, cluster, req);
  ASSERT_EQ(sim.plans.size(), 10U);
  std::multiset<double> analytic_top;
  std::multiset<double> simulated_analytic;
  for (std::size_t i = 0; i < 10; ++i) {
    analytic_top.insert(r.plans[i].objective_value);
    ASSERT_TRUE(sim.plans[i].analytic.has_value());
    EXPECT_EQ(fresh.estimate(sim.plans[i].estimate.plan), *sim.plans[i].analytic) << i;
    simulated_analytic.insert(1e6 / sim.plans[i].analytic->tokens_per_s);
  }
  EXPECT_EQ(simulated_analytic, analytic_top);
}

TEST(PlanSearch, SmallModelsOnOneNode) {
  const Cluster cluster = cluster_load("dgx-a100-80g");
  for (const char* name : {"llama-tiny", "gpt2-124m", "bert-large"}) {
    SCOPED_TRACE(name);
    const LoadedModel m = model_load(name);
    PlanRequest req;
    req.gpus = 8;
    req.global_batch_size = 32;
    const PlanSearchResult r = plan_search(m.graph, cluster, req);
    ASSERT_FALSE(r.plans.empty());
    expect_sane_result(r, m.graph, cluster, req);
    EXPECT_EQ(static_cast<int>(r.plans.size()), req.top_k);
  }
}

struct Gpt3Search {
  LoadedModel gpt = model_load("gpt3-175b");
  Cluster cluster = cluster_load("dgx-a100-80g");
  PlanRequest request() const {
    PlanRequest req;
    req.gpus = 1024;
    req.global_batch_size = 1536;
    return req;
  }
};

TEST(PlanSearch, Gpt3On1024A100s) {
  Gpt3Search s;
  const PlanRequest req = s.request();
  const PlanSearchResult r = plan_search(s.gpt.graph, s.cluster, req);
  ASSERT_FALSE(r.plans.empty());
  expect_sane_result(r, s.gpt.graph, s.cluster, req);
  EXPECT_EQ(static_cast<int>(r.plans.size()), req.top_k);
  // 175B parameters (2.8 TB of weights, gradients and Adam states) cannot fit without
  // splitting: many candidates are pruned by memory.
  EXPECT_GT(r.pruned_memory, 0);
  for (const auto& rp : r.plans) {
    const Plan& p = rp.estimate.plan;
    EXPECT_GT(p.tp * p.pp * (p.zero_stage >= 3 ? p.dp : 1), 1);
    EXPECT_GT(rp.estimate.mfu, 0.0);
    EXPECT_LE(rp.estimate.mfu, 1.0);
  }
  // Narayanan et al. 2021 train this model at 52% MFU on 1024 A100s; anything far below would be
  // a broken model or search.
  EXPECT_GT(r.plans.front().estimate.mfu, 0.15);

  // The search is at least as good as Megatron-LM's published plan, which it covers.
  const Cluster sized = s.cluster.with_devices(1024);
  CostModel model(s.gpt.graph, sized);
  Plan megatron{.dp = 8, .tp = 8, .pp = 16, .zero_stage = 1, .micro_batch_size = 1,
                .global_batch_size = 1536, .schedule = Schedule::interleaved,
                .virtual_stages = 2, .recompute = Recompute::selective,
                .sequence_parallel = true};
  plan_assign_stages(model, megatron);
  const PlanEstimate e = model.estimate(megatron);
  if (e.fits) {
    EXPECT_LE(r.plans.front().estimate.iteration_time_s, e.iteration_time_s * (1 + 1e-12));
  }
}

TEST(PlanSearch, PinsAreHonoured) {
  Gpt3Search s;
  PlanRequest req = s.request();
  req.pins.tp = 8;
  req.pins.pp = 8;
  const PlanSearchResult r = plan_search(s.gpt.graph, s.cluster, req);
  ASSERT_FALSE(r.plans.empty());
  expect_sane_result(r, s.gpt.graph, s.cluster, req);
  for (const auto& rp : r.plans) {
    EXPECT_EQ(rp.estimate.plan.tp, 8);
    EXPECT_EQ(rp.estimate.plan.pp, 8);
    EXPECT_EQ(rp.estimate.plan.dp, 16);
  }

  req = s.request();
  req.pins.schedule = Schedule::interleaved;
  req.pins.recompute = Recompute::full;
  req.pins.zero_stage = 1;
  req.pins.micro_batch_size = 2;
  req.pins.sequence_parallel = true;
  req.top_k = 50;
  const PlanSearchResult r2 = plan_search(s.gpt.graph, s.cluster, req);
  ASSERT_FALSE(r2.plans.empty());
  expect_sane_result(r2, s.gpt.graph, s.cluster, req);
  for (const auto& rp : r2.plans) {
    const Plan& p = rp.estimate.plan;
    EXPECT_EQ(p.schedule, Schedule::interleaved);
    EXPECT_GE(p.virtual_stages, 2);
    EXPECT_EQ(p.recompute, Recompute::full);
    EXPECT_EQ(p.zero_stage, 1);
    EXPECT_EQ(p.micro_batch_size, 2);
    EXPECT_TRUE(p.sequence_parallel);
  }
}

TEST(PlanSearch, ImpossiblePinsGiveNoCandidates) {
  const LoadedModel tiny = model_load("gpt-tiny");
  const Cluster cluster = cluster_load("dgx-a100-80g");
  PlanRequest req;
  req.gpus = 8;
  req.global_batch_size = 8;
  req.pins.tp = 3; // divides neither 8 GPUs nor 4 heads
  const PlanSearchResult r = plan_search(tiny.graph, cluster, req);
  EXPECT_TRUE(r.plans.empty());
  EXPECT_EQ(r.candidates, 0);
  EXPECT_FALSE(r.closest.has_value());
  EXPECT_FALSE(r.no_fit_reason.empty());
  EXPECT_EQ(r.no_fit_reason.find("closest"), std::string::npos);
}

TEST(PlanSearch, ModelTooLargeReportsTheClosestPlan) {
  const LoadedModel big = model_load("megatron-1t");
  const Cluster cluster = cluster_load("dgx-a100-80g");
  PlanRequest req;
  req.gpus = 8;
  req.global_batch_size = 8;
  const PlanSearchResult r = plan_search(big.graph, cluster, req);
  EXPECT_TRUE(r.plans.empty());
  EXPECT_GT(r.candidates, 0);
  EXPECT_EQ(r.pruned_memory, r.candidates);
  EXPECT_EQ(r.evaluated, 0);
  ASSERT_TRUE(r.closest.has_value());
  EXPECT_FALSE(r.closest->fits);
  EXPECT_GT(r.closest->memory.total(), r.closest->memory_capacity_bytes);
  // 16 bytes per parameter of a trillion parameters over 8 devices is 2 TB each, at least.
  EXPECT_GT(r.closest->memory.total(), 16.0 * 1e12 / 8 * 0.9);
  EXPECT_EQ(r.closest->plan.world_size(), 8);
  EXPECT_NE(r.no_fit_reason.find("closest"), std::string::npos) << r.no_fit_reason;
  // The closest plan shards everything it can: ZeRO-3 over all data-parallel ranks, or no dp.
  const Plan& c = r.closest->plan;
  EXPECT_TRUE(c.dp == 1 || c.zero_stage == 3) << plan_to_json(c).dump();
}

TEST(PlanSearch, ObjectivesAndTheirInputs) {
  const LoadedModel tiny = model_load("gpt-tiny");
  Cluster cluster = cluster_load("dgx-a100-80g");
  ASSERT_TRUE(cluster.cost_per_device_hour_usd.has_value());
  const double price = *cluster.cost_per_device_hour_usd;
  PlanRequest req;
  req.gpus = 8;
  req.global_batch_size = 16;

  req.objective = Objective::cost;
  const PlanSearchResult cost = plan_search(tiny.graph, cluster, req);
  ASSERT_FALSE(cost.plans.empty());
  expect_sane_result(cost, tiny.graph, cluster, req);
  for (const auto& rp : cost.plans) {
    // USD per million tokens: device-hours per million tokens times the price.
    EXPECT_NEAR(rp.objective_value, 8 * price * (1e6 / rp.estimate.tokens_per_s) / 3600.0,
                1e-9 * rp.objective_value);
  }

  req.objective = Objective::time_to_train;
  req.train_tokens = 3e11;
  const PlanSearchResult ttt = plan_search(tiny.graph, cluster, req);
  ASSERT_FALSE(ttt.plans.empty());
  for (const auto& rp : ttt.plans) {
    EXPECT_NEAR(rp.objective_value, 3e11 / rp.estimate.tokens_per_s / 3600.0,
                1e-9 * rp.objective_value);
  }
  // All three objectives rank a fixed GPU count the same way: by tokens per second.
  req.objective = Objective::throughput;
  const PlanSearchResult thr = plan_search(tiny.graph, cluster, req);
  EXPECT_DOUBLE_EQ(thr.plans.front().estimate.tokens_per_s, ttt.plans.front().estimate.tokens_per_s);
  EXPECT_DOUBLE_EQ(thr.plans.front().estimate.tokens_per_s, cost.plans.front().estimate.tokens_per_s);

  req.objective = Objective::time_to_train;
  req.train_tokens = 0;
  EXPECT_THROW(plan_search(tiny.graph, cluster, req), InputError);

  req.objective = Objective::cost;
  cluster.cost_per_device_hour_usd.reset();
  EXPECT_THROW(plan_search(tiny.graph, cluster, req), InputError);

  req.objective = Objective::throughput;
  req.gpus = 0;
  EXPECT_THROW(plan_search(tiny.graph, cluster, req), InputError);

  // A precision the device lacks is an input error, not a silent fallback.
  req.gpus = 8;
  req.pins.precision = Precision::fp8;
  EXPECT_THROW(plan_search(tiny.graph, cluster, req), InputError);

  EXPECT_EQ(objective_name(Objective::throughput), "throughput");
  EXPECT_EQ(objective_name(Objective::time_to_train), "time_to_train");
  EXPECT_EQ(objective_name(Objective::cost), "cost");
}

TEST(PlanSearch, AllowFewerGpusFindsSmallerWorlds) {
  const LoadedModel tiny = model_load("gpt-tiny");
  const Cluster cluster = cluster_load("dgx-a100-80g");
  // 4 sequences, 4 heads, 2 units: at most dp 4 · tp 4 · pp 2 = 32 devices can be used.
  PlanRequest req;
  req.gpus = 128;
  req.global_batch_size = 4;
  req.top_k = 100000;
  const PlanSearchResult exact = plan_search(tiny.graph, cluster, req);
  EXPECT_TRUE(exact.plans.empty());
  EXPECT_EQ(exact.candidates, 0);
  EXPECT_FALSE(exact.no_fit_reason.empty());

  req.allow_fewer_gpus = true;
  const PlanSearchResult fewer = plan_search(tiny.graph, cluster, req);
  ASSERT_FALSE(fewer.plans.empty());
  expect_sane_result(fewer, tiny.graph, cluster, req);
  std::set<int> worlds;
  for (const auto& rp : fewer.plans) {
    EXPECT_LT(rp.gpus, 128);
    EXPECT_LE(rp.gpus, 32);
    EXPECT_EQ(rp.gpus & (rp.gpus - 1), 0) << rp.gpus; // 128 halved
    worlds.insert(rp.gpus);
  }
  EXPECT_TRUE(worlds.contains(32));
  EXPECT_TRUE(worlds.contains(1));

  // Where the full count works too, allowing fewer never makes the best plan worse.
  PlanRequest full;
  full.gpus = 16;
  full.global_batch_size = 16;
  const PlanSearchResult a = plan_search(tiny.graph, cluster, full);
  full.allow_fewer_gpus = true;
  const PlanSearchResult b = plan_search(tiny.graph, cluster, full);
  ASSERT_FALSE(a.plans.empty());
  ASSERT_FALSE(b.plans.empty());
  EXPECT_LE(b.plans.front().objective_value, a.plans.front().objective_value);
  EXPECT_GT(b.candidates, a.candidates);
}

TEST(PlanExplain, MentionsTheStepTimeAndTheRunnerUp) {
  Gpt3Search s;
  PlanRequest req = s.request();
  req.pins.tp = 8;
  req.pins.pp = 8;
  const PlanSearchResult r = plan_search(s.gpt.graph, s.cluster, req);
  ASSERT_GE(r.plans.size(), 2U);
  const RankedPlan& best = r.plans[0];
  const std::string alone = plan_explain(best, nullptr);
  EXPECT_NE(alone.find("step"), std::string::npos) << alone;
  EXPECT_NE(alone.find(fmt::format("{:.3f}", best.estimate.iteration_time_s)), std::string::npos)
      << alone;
  const std::string both = plan_explain(best, &r.plans[1]);
  EXPECT_EQ(both.rfind(alone, 0), 0U) << both; // the same text, then the comparison
  EXPECT_GT(both.size(), alone.size());
  EXPECT_NE(both.find("slower"), std::string::npos) << both;
}

TEST(PlanAssignStages, BalancesTheSlowestStage) {
  // 96 blocks over 5 stages: an even split gives the first stage 20 blocks and the embedding,
  // while a balanced one can give the extra block to a middle stage.
  const LoadedModel gpt = model_load("gpt3-175b");
  const Cluster cluster = cluster_load("dgx-a100-80g").with_devices(40);
  CostModel model(gpt.graph, cluster);
  for (int v : {1, 2}) {
    for (Recompute rc : {Recompute::none, Recompute::full}) {
      SCOPED_TRACE(testing::Message() << "v=" << v << " recompute=" << static_cast<int>(rc));
      Plan p{.dp = 1, .tp = 8, .pp = 5, .micro_batch_size = 1, .global_batch_size = 80,
             .schedule = v > 1 ? Schedule::interleaved : Schedule::one_f_one_b,
             .virtual_stages = v, .recompute = rc};
      Plan balanced = p;
      plan_assign_stages(model, balanced);
      ASSERT_EQ(static_cast<int>(balanced.stages.size()), 5 * v);
      EXPECT_NO_THROW(plan_validate(balanced, gpt.graph, 40, "balanced"));
      int expected_first = 0;
      for (const auto& [first, last] : balanced.stages) {
        EXPECT_EQ(first, expected_first);
        EXPECT_LT(first, last);
        expected_first = last;
      }
      EXPECT_EQ(expected_first, 96);
      if (v == 1) {
        // For one chunk per rank the partition minimises exactly the slowest stage's time.
        const auto slowest = [](const PlanEstimate& e) {
          return e.breakdown.compute + e.breakdown.tp_comm + e.breakdown.pp_comm;
        };
        const PlanEstimate even = model.estimate(p);
        const PlanEstimate bal = model.estimate(balanced);
        EXPECT_NE(balanced.stages, stages_even(96, 5));
        EXPECT_LT(slowest(bal), slowest(even));
        EXPECT_EQ(balanced.stages.front().second, 19) << "the embedding's stage gives up a block";
      }
    }
  }
}

TEST(PlanAssignStages, MinimisesTheSlowestStageOverAllPartitions) {
  // Seven one-layer units of very different GEMM sizes but equal parameter counts: only a
  // partition by time (not by layer count or parameters) isolates the heavy sixth unit.
  const std::int64_t widths[] = {256, 512, 1024, 1024, 512, 4096, 2048};
  Json layers = Json::array();
  Json edges = Json::array();
  for (int i = 0; i < 7; ++i) {
    layers.push_back({{"name", "fc" + std::to_string(i)},
                      {"kind", "linear"},
                      {"unit", i},
                      {"params", 1000},
                      {"gemms", {{{"m", 128}, {"n", widths[i]}, {"k", widths[i]}}}},
                      {"saved_act_elems", 128 * widths[i]}});
    if (i > 0) {
      edges.push_back({i - 1, i});
    }
  }
  const LayerGraph g = layer_graph_from_json(
      Json{{"name", "uneven"}, {"seq_length", 128}, {"hidden_size", 256}, {"layers", layers},
           {"edges", edges}},
      "uneven.json");
  const Cluster cluster = cluster_load("dgx-a100-80g").with_devices(3);
  CostModel model(g, cluster);
  const Plan base{.dp = 1, .tp = 1, .pp = 3, .micro_batch_size = 1, .global_batch_size = 1};
  const auto slowest = [&](const std::vector<StageRange>& stages) {
    Plan p = base;
    p.stages = stages;
    const PlanEstimate e = model.estimate(p);
    return e.breakdown.compute + e.breakdown.tp_comm + e.breakdown.pp_comm;
  };
  double best = 1e300;
  std::vector<StageRange> best_stages;
  for (int a = 1; a < 7; ++a) {
    for (int b = a + 1; b < 7; ++b) {
      const std::vector<StageRange> stages = {{0, a}, {a, b}, {b, 7}};
      const double t = slowest(stages);
      if (t < best) {
        best = t;
        best_stages = stages;
      }
    }
  }
  Plan assigned = base;
  plan_assign_stages(model, assigned);
  EXPECT_NEAR(slowest(assigned.stages), best, 1e-12 * best);
  EXPECT_EQ(assigned.stages, best_stages);
  EXPECT_EQ(assigned.stages[1], (StageRange{5, 6})) << "the heavy unit alone";
  EXPECT_LT(best, slowest(stages_even(7, 3)));
}

} // namespace
} // namespace parallax
