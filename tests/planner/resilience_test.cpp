// The goodput objective by hand: Young's and Daly's intervals, the useful fraction, a known
// plan's checkpoint and goodput, and the planner choosing fewer GPUs or more frequent
// checkpoints when failures are frequent. Then the Monte-Carlo prediction intervals.
#include <gtest/gtest.h>

#include "parallax/core/error.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/hardware_profiles/stack_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/goodput.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/planner/uncertainty.hpp"

#include <cmath>

namespace {

using namespace parallax;

TEST(Goodput, YoungAndDalyIntervalsByHand) {
  EXPECT_DOUBLE_EQ(young_interval_s(10, 3600), std::sqrt(2.0 * 10 * 3600)); // 268.3 s
  // Daly: √(2CM)(1 + √(C/2M)/3 + C/(18M)) − C.
  const double r = 10.0 / 7200;
  EXPECT_NEAR(daly_interval_s(10, 3600),
              std::sqrt(2.0 * 10 * 3600) * (1 + std::sqrt(r) / 3 + r / 9) - 10, 1e-9);
  EXPECT_DOUBLE_EQ(daly_interval_s(100, 40), 40.0); // C >= 2M: checkpoint every MTBF
  // τ = 100 s, C = 10 s, R = 50 s, M = 10⁴ s: 100/110 · (1 − (50 + 55)/10⁴).
  EXPECT_NEAR(checkpoint_efficiency(100, 10, 50, 1e4), 100.0 / 110 * (1 - 105.0 / 1e4), 1e-12);
  EXPECT_EQ(checkpoint_efficiency(100, 10, 500, 100), 0.0); // failures faster than restarts
}

TEST(Goodput, KnownPlanByHand) {
  // 1e9 parameters in bf16 (2 + 12 bytes each: 14 GB) on 64 GPUs of 8 nodes, storage at the
  // defaults (2 GB/s written and 4 GB/s read per node, 25 GB/s host copy, 300 s restart),
  // one GPU failing every 1000 h: the job every 56250 s.
  const Cluster c = cluster_load("dgx-a100-80g").with_devices(64);
  Stack stack;
  Plan p{.dp = 64, .global_batch_size = 64};
  const CheckpointCost ck = checkpoint_cost(1e9, p, c, stack, 64);
  EXPECT_DOUBLE_EQ(ck.bytes, 14e9);
  EXPECT_DOUBLE_EQ(ck.write_s, 14e9 / 16e9);
  EXPECT_DOUBLE_EQ(ck.load_s, 14e9 / 32e9);
  EXPECT_DOUBLE_EQ(ck.blocking_s, ck.write_s);
  EXPECT_DOUBLE_EQ(ck.restart_s, 300 + 14e9 / 32e9);
  const Goodput g = goodput_of(1e9, p, c, stack, 64, 0.5, 1e6, 1000);
  EXPECT_DOUBLE_EQ(g.job_mtbf_s, 56250);
  const double tau = std::round(daly_interval_s(ck.write_s, 56250) / 0.5) * 0.5;
  EXPECT_DOUBLE_EQ(g.interval_s, tau);
  const double eff =
      tau / (tau + ck.write_s) * (1 - (ck.restart_s + (tau + ck.write_s) / 2) / 56250);
  EXPECT_NEAR(g.efficiency, eff, 1e-12);
  EXPECT_NEAR(g.goodput_tokens_per_s, 1e6 * eff, 1e-6);
  // Asynchronous checkpointing stalls for the host copy only (14 GB / 64 devices at 25 GB/s),
  // and the interval is at least the write.
  stack.checkpoint.async = true;
  const Goodput a = goodput_of(1e9, p, c, stack, 64, 0.5, 1e6, 1000);
  EXPECT_DOUBLE_EQ(a.checkpoint.blocking_s, 14e9 / 64 / 25e9);
  EXPECT_GE(a.interval_s, a.checkpoint.write_s);
  EXPECT_GT(a.efficiency, g.efficiency);
  // One writer instead of every node: 8× the write.
  stack = Stack{};
  stack.checkpoint.sharded = false;
  EXPECT_DOUBLE_EQ(checkpoint_cost(1e9, p, c, stack, 64).write_s, 14e9 / 2e9);
}

PlanRequest gpt2_request(const Cluster& c, double mtbf_h) {
  PlanRequest req;
  req.gpus = 64;
  req.global_batch_size = 64;
  req.top_k = 4;
  req.stack = stack_load(stack_default_name(c));
  req.objective = Objective::goodput;
  req.gpu_mtbf_hours = mtbf_h;
  return req;
}

TEST(Goodput, FrequentFailuresCheckpointMoreOftenAndUseFewerGpus) {
  LoadedModel m = model_load("gpt2-1.5b");
  const Cluster c = cluster_load("dgx-a100-40g");
  const auto best = [&](PlanRequest req) {
    const PlanSearchResult r = plan_search(m.graph, c, req);
    EXPECT_FALSE(r.plans.empty());
    return r.plans.front();
  };
  const RankedPlan reliable = best(gpt2_request(c, 50000));
  const RankedPlan fragile = best(gpt2_request(c, 50));
  ASSERT_TRUE(reliable.goodput && fragile.goodput);
  EXPECT_LT(fragile.goodput->interval_s, 0.2 * reliable.goodput->interval_s);
  EXPECT_LT(fragile.goodput->efficiency, reliable.goodput->efficiency);
  EXPECT_GT(reliable.goodput->efficiency, 0.99);
  // A GPU failing every 4 h: on 64 GPUs the job fails every 225 s, less than a restart, so
  // nothing trains; the goodput objective takes fewer GPUs where throughput takes all 64.
  PlanRequest req = gpt2_request(c, 4);
  req.allow_fewer_gpus = true;
  const RankedPlan g = best(req);
  ASSERT_TRUE(g.goodput);
  EXPECT_LT(g.gpus, 64);
  EXPECT_GT(g.goodput->efficiency, 0.0);
  req.objective = Objective::throughput;
  EXPECT_EQ(best(req).gpus, 64);
}

TEST(Goodput, BadMtbfIsAnInputError) {
  LoadedModel m = model_load("gpt2-1.5b");
  const Cluster c = cluster_load("dgx-a100-40g");
  for (double h : {0.0, -1.0, std::nan("")}) {
    EXPECT_THROW(plan_search(m.graph, c, gpt2_request(c, h)), InputError) << h;
  }
}

} // namespace

// ---- prediction intervals (planner/uncertainty.hpp) ----

namespace {

using namespace parallax;

TEST(Uncertainty, ZeroSpreadIsThePointEstimate) {
  LoadedModel m = model_load("gpt2-1.5b");
  Cluster c = cluster_load("dgx-a100-40g");
  c.uncertainty = {.gemm_efficiency = 0, .bandwidth = 0, .kernel_overhead = 0};
  PlanRequest req = gpt2_request(c, 1000);
  req.objective = Objective::throughput;
  req.simulate_top = 2; // the first two simulated, the rest analytic: both kinds kept exact
  const PlanSearchResult r = plan_search(m.graph, c, req);
  ASSERT_GE(r.plans.size(), 3u);
  const auto u = plan_uncertainty(m.graph, c, req.stack, r.plans, 20);
  for (std::size_t i = 0; i < r.plans.size(); ++i) {
    EXPECT_DOUBLE_EQ(u[i].p10_s, r.plans[i].estimate.iteration_time_s);
    EXPECT_DOUBLE_EQ(u[i].p90_s, r.plans[i].estimate.iteration_time_s);
  }
  EXPECT_DOUBLE_EQ(u[0].p_best, 1.0);
}

TEST(Uncertainty, SpreadWidensTheIntervalAndSplitsTheWins) {
  LoadedModel m = model_load("gpt2-1.5b");
  const Cluster c = cluster_load("dgx-a100-40g"); // the default spreads
  PlanRequest req = gpt2_request(c, 1000);
  req.objective = Objective::throughput;
  const PlanSearchResult r = plan_search(m.graph, c, req);
  ASSERT_GE(r.plans.size(), 2u);
  const auto u = plan_uncertainty(m.graph, c, req.stack, r.plans, 200);
  double wins = 0;
  for (std::size_t i = 0; i < r.plans.size(); ++i) {
    const double t = r.plans[i].estimate.iteration_time_s;
    EXPECT_LT(u[i].p10_s, t);
    EXPECT_GT(u[i].p90_s, t);
    EXPECT_LT(u[i].p90_s / u[i].p10_s, 2.0);
    wins += u[i].p_best;
  }
  EXPECT_NEAR(wins, 1.0, 1e-12);
  EXPECT_GT(u[0].p_best, 0.0);
  // The same seed, the same answer.
  const auto again = plan_uncertainty(m.graph, c, req.stack, r.plans, 200);
  EXPECT_EQ(again[0].p10_s, u[0].p10_s);
}

} // namespace
