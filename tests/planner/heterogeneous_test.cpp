// Heterogeneous clusters: node groups in the cluster file, ranks placed group by group, each
// pipeline stage costed on its own devices, faster stages given more layers.
#include <gtest/gtest.h>

#include "parallax/core/cluster_json.hpp"
#include "parallax/core/error.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/hardware_profiles/stack_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/simulator/iteration_simulator.hpp"

namespace {

using namespace parallax;

TEST(NodeGroups, LoadPlaceAndResize) {
  const Cluster c = cluster_load("mixed-a100-h100");
  ASSERT_EQ(c.num_groups(), 2);
  EXPECT_TRUE(c.heterogeneous());
  EXPECT_EQ(c.num_devices(), 128);
  EXPECT_EQ(c.group_of_rank(0), 0);
  EXPECT_EQ(c.group_of_rank(63), 0);
  EXPECT_EQ(c.group_of_rank(64), 1);
  EXPECT_EQ(c.group_view(1).device.name, "H100-SXM5-80GB");
  // The mean peak is halfway between the two devices'.
  EXPECT_DOUBLE_EQ(c.mean_peak_flops(Precision::bf16), 0.5 * (312e12 + 989e12));
  // Resized in whole nodes, half and half.
  const Cluster small = c.with_devices(32);
  EXPECT_EQ(small.groups[0].num_nodes, 2);
  EXPECT_EQ(small.groups[1].num_nodes, 2);
  EXPECT_EQ(small.network.num_nodes, 4);
  EXPECT_THROW(c.with_devices(24), InputError); // 3 nodes do not split in half
  // Round trip through JSON.
  EXPECT_EQ(cluster_from_json(cluster_to_json(c), "rt"), c);
}

TEST(NodeGroups, BadGroupsNameTheField) {
  const Json valid = cluster_to_json(cluster_load("mixed-a100-h100"));
  const auto field_of = [&](const char* patch) -> std::string {
    Json doc = valid;
    doc.merge_patch(Json::parse(patch));
    try {
      cluster_from_json(doc, "mixed.json");
    } catch (const InputError& e) {
      return e.field();
    }
    return "accepted";
  };
  // Groups that do not add up to the cluster's nodes.
  EXPECT_EQ(field_of(R"({"network": {"num_nodes": 12}})"), "/network/num_nodes");
  // A top-level device beside the groups.
  Json with_device = valid;
  with_device["device"] = valid["node_groups"][0]["device"];
  EXPECT_THROW(cluster_from_json(with_device, "mixed.json"), InputError);
  // Groups of different node sizes.
  Json uneven = valid;
  uneven["node_groups"][1]["node"]["devices_per_node"] = 4;
  try {
    cluster_from_json(uneven, "mixed.json");
    ADD_FAILURE() << "accepted";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "/node_groups/1/node");
  }
  Json empty = valid;
  empty["node_groups"] = Json::array();
  EXPECT_THROW(cluster_from_json(empty, "mixed.json"), InputError);
}

TEST(NodeGroups, MixedClusterPlansBetweenItsTwoKindsWithMoreLayersOnTheFasterStages) {
  LoadedModel m = model_load("llama2-7b");
  const auto best = [&](const std::string& cluster) {
    const Cluster c = cluster_load(cluster);
    PlanRequest req;
    req.gpus = 32;
    req.global_batch_size = 64;
    req.pins.tp = 8;
    req.pins.pp = 2;
    req.pins.zero_stage = 1;
    req.top_k = 2;
    req.stack = stack_load(stack_default_name(c));
    const PlanSearchResult r = plan_search(m.graph, c, req);
    EXPECT_FALSE(r.plans.empty()) << cluster;
    return r.plans.empty() ? PlanEstimate{} : r.plans.front().estimate;
  };
  const PlanEstimate a100 = best("dgx-a100-80g");
  const PlanEstimate h100 = best("dgx-h100");
  const PlanEstimate mixed = best("mixed-a100-h100");
  EXPECT_LT(h100.iteration_time_s, mixed.iteration_time_s);
  EXPECT_LT(mixed.iteration_time_s, a100.iteration_time_s);
  // Pipeline rank 0 sits on the A100 nodes, rank 1 on the H100 nodes: the H100 stage holds
  // more layers (interleaved chunks alternate, so count per rank).
  const Plan& p = mixed.plan;
  ASSERT_EQ(p.pp, 2);
  int layers[2] = {0, 0};
  for (std::size_t c = 0; c < p.stages.size(); ++c) {
    layers[c % 2] += p.stages[c].second - p.stages[c].first;
  }
  EXPECT_GT(layers[1], layers[0] + 2) << plan_label(p);
  // The simulator runs it too, between the same two.
  const Cluster c = cluster_load("mixed-a100-h100").with_devices(32);
  CostModel model(m.graph, c, stack_load(stack_default_name(c)));
  const double simulated = simulate_iteration(model, p).estimate.iteration_time_s;
  EXPECT_GT(simulated, 0.8 * h100.iteration_time_s);
  EXPECT_LT(simulated, 1.2 * a100.iteration_time_s);
}

TEST(NodeGroups, DataParallelReplicasOnFasterDevicesTakeMoreOfTheBatch) {
  // pp 1 on the mixed cluster: every data-parallel replica on its own kind of node. Even
  // shares wait for the A100 replicas; shares by speed give the H100 replicas more.
  LoadedModel m = model_load("llama2-7b");
  const Cluster c = cluster_load("mixed-a100-h100");
  PlanRequest req;
  req.gpus = 32;
  req.global_batch_size = 64;
  req.pins.tp = 4;
  req.pins.pp = 1;
  req.pins.zero_stage = 1;
  req.pins.micro_batch_size = 1;
  req.top_k = 50;
  req.stack = stack_load(stack_default_name(c));
  const PlanSearchResult r = plan_search(m.graph, c, req);
  ASSERT_FALSE(r.plans.empty());
  const Plan& best = r.plans.front().estimate.plan;
  ASSERT_EQ(best.dp_shares.size(), 8u) << plan_label(best);
  // Replicas 0-3 on A100 nodes, 4-7 on H100 nodes.
  EXPECT_GT(best.dp_shares[4], 1.5 * static_cast<double>(best.dp_shares[0]));
  double even = 0;
  for (const RankedPlan& p : r.plans) {
    if (p.estimate.plan.dp_shares.empty() &&
        p.estimate.plan.sequence_parallel == best.sequence_parallel)
      even = p.estimate.iteration_time_s;
  }
  ASSERT_GT(even, 0);
  EXPECT_LT(r.plans.front().estimate.iteration_time_s, 0.9 * even);
}

} // namespace
