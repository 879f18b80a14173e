// What-ifs: a 1.5× straggler in a data-parallel plan, a slow node link, and the bad inputs.
#include <gtest/gtest.h>

#include "parallax/core/error.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/hardware_profiles/stack_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/simulator/cost_model.hpp"
#include "parallax/simulator/iteration_simulator.hpp"
#include "parallax/simulator/what_if.hpp"

namespace {

using namespace parallax;

double simulated_step(const LoadedModel& m, const Cluster& c, const Stack& s, const Plan& p) {
  CostModel cost(m.graph, c, s);
  return simulate_iteration(cost, p, {.symmetric = true}).estimate.iteration_time_s;
}

TEST(WhatIf, OneStragglerSlowsADataParallelStep) {
  // GPT-2 1.5B, dp 64 on 64 A100-40GB, 8 micro-batches per replica: compute-bound, so one
  // GPU 1.5× slower makes every step wait for its replica, ≥ 1.3× the healthy one.
  LoadedModel m = model_load("gpt2-1.5b");
  const Cluster c = cluster_load("dgx-a100-40g").with_devices(64);
  const Stack s = stack_load(stack_default_name(c));
  Plan p{.dp = 64, .micro_batch_size = 1, .global_batch_size = 512};
  {
    CostModel cost(m.graph, c, s);
    plan_assign_stages(cost, p);
  }
  const double healthy = simulated_step(m, c, s, p);
  const Cluster slow = degraded_cluster(c, parse_straggler("13:1.5", "--straggler"));
  ASSERT_EQ(slow.num_groups(), 3); // nodes 0, node 1 (the straggler's), nodes 2..7
  EXPECT_EQ(slow.groups[1].num_nodes, 1);
  const double straggling = simulated_step(m, slow, s, p);
  EXPECT_GE(straggling, 1.3 * healthy);
  EXPECT_LE(straggling, 1.5 * healthy * 1.01); // never worse than all of it 1.5× slower
  // A slow link: only the communication slows.
  const double linked =
      simulated_step(m, degraded_cluster(c, parse_slow_link("0:4", "--slow-link")), s, p);
  EXPECT_GT(linked, healthy);
  EXPECT_EQ(degradation_label(parse_straggler("13:1.5", "x")), "rank 13 1.5x slower");
}

TEST(WhatIf, BadFactorsAndIndicesAreInputErrors) {
  const Cluster c = cluster_load("dgx-a100-40g").with_devices(16);
  for (const char* bad : {"3:0", "3:-1", "3:nan", "3:inf", "x:2", "3", ":2", "3:", "-1:2"}) {
    EXPECT_THROW(parse_straggler(bad, "--straggler"), InputError) << bad;
    EXPECT_THROW(parse_slow_link(bad, "--slow-link"), InputError) << bad;
  }
  EXPECT_THROW(degraded_cluster(c, parse_straggler("16:2", "--straggler")), InputError);
  EXPECT_THROW(degraded_cluster(c, parse_slow_link("2:2", "--slow-link")), InputError);
}

} // namespace
