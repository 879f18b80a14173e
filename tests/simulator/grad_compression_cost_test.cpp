// The compressed gradient all-reduce's cost, by hand on the hand cluster (no latencies:
// communication is bytes over bandwidth), and what it does to a communication-bound plan.
#include <gtest/gtest.h>

#include <set>

#include "hand_cluster.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/hardware_profiles/stack_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/simulator/compute_model.hpp"
#include "parallax/simulator/estimate.hpp"
#include "parallax/simulator/grad_compression_cost.hpp"
#include "parallax/simulator/unit_cost.hpp"

namespace {

using namespace parallax;
using parallax::test_support::hand_cluster;

Plan dp8(GradCompression gc) {
  return {.dp = 8, .global_batch_size = 8, .grad_compression = gc};
}

// 64 GPUs of data parallelism, ZeRO 0, no recomputation, one sequence per replica, on the
// cluster's own stack (as `parallax plan` does).
PlanRequest dp64_request(const Cluster& c) {
  PlanRequest req;
  req.gpus = 64;
  req.global_batch_size = 64;
  req.pins.dp = 64;
  req.pins.zero_stage = 0;
  req.pins.recompute = Recompute::none;
  req.top_k = 2;
  req.stack = stack_load(stack_default_name(c));
  return req;
}

// 1M gradients, of which 0.9M in matrices with Σ(rows + cols) = 6000 (e.g. three 300 × 1000).
const ReducedGradients kGrads{.params = 1e6, .matrix_params = 9e5, .matrix_dims = 6000};

TEST(GradCompressionCost, ElementsOnTheWire) {
  EXPECT_DOUBLE_EQ(compressed_elements(dp8({}), kGrads), 1e6);
  EXPECT_DOUBLE_EQ(
      compressed_elements(dp8({.kind = CompressionKind::topk, .fraction = 0.01}), kGrads), 2 * 1e4);
  // The vectors whole (1e5) and r·Σ(rows + cols) = 4·6000 for the factors.
  EXPECT_DOUBLE_EQ(compressed_elements(dp8({.kind = CompressionKind::powersgd, .rank = 4}), kGrads),
                   1e5 + 24000);
}

TEST(GradCompressionCost, WireTimeByHand) {
  const Cluster c = hand_cluster(8); // ring bus bandwidth 100 GB/s · 0.5 inside the node
  const double bw = 50e9;
  const double ring = 2.0 * 7 / 8; // all-reduce bus factor over 8 ranks
  const auto wire = [&](GradCompression gc) {
    const Plan p = dp8(gc);
    return gradient_all_reduce_cost(c, p, kGrads, 4.0).total_s() -
           compression_compute_s(c, p, kGrads);
  };
  EXPECT_NEAR(wire({}), ring * 4e6 / bw, 1e-12);
  EXPECT_NEAR(wire({.kind = CompressionKind::bf16}), ring * 2e6 / bw, 1e-12);
  // Top-k 1 %: an all-gather of 8 ranks' 1e4 (value, index) pairs of 8 bytes.
  EXPECT_NEAR(wire({.kind = CompressionKind::topk, .fraction = 0.01}), 7.0 / 8 * 8 * 1e4 * 8 / bw,
              1e-12);
  // PowerSGD 4: all-reduces of (1e5 + 12000) and 12000 floats.
  EXPECT_NEAR(wire({.kind = CompressionKind::powersgd, .rank = 4}), ring * (1e5 + 24000) * 4 / bw,
              1e-12);
}

TEST(GradCompressionCost, ComputeIsMemoryBound) {
  const Cluster c = hand_cluster(8); // 1000 GB/s at 50 %: 500 GB/s for element-wise passes
  const double mem = 500e9;
  const double overhead = kernel_overhead_s(c.device);
  const Plan bf16 = dp8({.kind = CompressionKind::bf16});
  EXPECT_NEAR(compression_compute_s(c, bf16, kGrads), 12 * 1e6 / mem + 2 * overhead, 1e-12);
  // PowerSGD: error feedback (12 B) and its passes over the matrices (24 B); the 6·r FLOPs per
  // element at 50 TFLOP/s fp32 take less than the memory traffic.
  const Plan psgd = dp8({.kind = CompressionKind::powersgd, .rank = 4});
  EXPECT_NEAR(compression_compute_s(c, psgd, kGrads), 36 * 9e5 / mem + 6 * overhead, 1e-12);
  Plan no_ef = psgd;
  no_ef.error_feedback = false;
  EXPECT_LT(compression_compute_s(c, no_ef, kGrads), compression_compute_s(c, psgd, kGrads));
}

TEST(GradCompressionCost, TopkLosesToTheRingOnceEnoughRanksGatherIt) {
  // A ring all-reduce moves about 2·N·4 bytes per rank whatever n; gathering n·k pairs of 8
  // bytes grows with n: at 1 % the break-even is n = 100.
  Cluster c = hand_cluster(8);
  const ReducedGradients g{.params = 1e8};
  Plan p{.dp = 8,
         .global_batch_size = 8,
         .grad_compression = {.kind = CompressionKind::topk, .fraction = 0.01}};
  const double topk8 = gradient_all_reduce_cost(c, p, g, 4.0).transfer_s;
  p.grad_compression = {};
  EXPECT_LT(topk8, gradient_all_reduce_cost(c, p, g, 4.0).transfer_s);
  Cluster big = hand_cluster(256);
  p = Plan{.dp = 256,
           .global_batch_size = 256,
           .grad_compression = {.kind = CompressionKind::topk, .fraction = 0.01}};
  const double topk256 = gradient_all_reduce_cost(big, p, g, 4.0).transfer_s;
  p.grad_compression = {};
  EXPECT_GT(topk256, gradient_all_reduce_cost(big, p, g, 4.0).transfer_s);
}

TEST(GradCompressionCost, UnitMatricesFollowTheTensorParallelSplit) {
  LoadedModel m = model_load("gpt2-1.5b");
  const GraphInfo& info = m.graph.info();
  const double h = static_cast<double>(info.hidden_size);
  const double f = static_cast<double>(info.ffn_hidden_size);
  for (int tp : {1, 2}) {
    const auto units = unit_costs(m.graph, hand_cluster(8), {.tp = tp});
    // A block's matrices: QKV h × 3h and MLP-up h × f (columns split), proj h × h and MLP-down
    // f × h (rows split).
    const UnitCost& block = units[1];
    EXPECT_DOUBLE_EQ(block.matrix_params, (3 * h * h + h * h + 2 * h * f) / tp);
    EXPECT_DOUBLE_EQ(block.matrix_dims,
                     (h + 3 * h / tp) + (h / tp + h) + (h + f / tp) + (f / tp + h));
    EXPECT_LT(block.matrix_params, block.params); // biases and norms stay vectors
  }
}

TEST(GradCompressionCost, PowerSgdShortensACommunicationBoundDataParallelStep) {
  // GPT-2 1.5B on 64 A100-40GB, dp 64, one sequence per replica: the gradient all-reduce is
  // most of the step.
  LoadedModel m = model_load("gpt2-1.5b");
  const Cluster c = cluster_load("dgx-a100-40g");
  PlanRequest req = dp64_request(c);
  const auto step = [&](std::optional<GradCompression> gc) {
    req.pins.grad_compression = gc;
    const PlanSearchResult r = plan_search(m.graph, c, req);
    EXPECT_FALSE(r.plans.empty());
    return r.plans.empty() ? 0.0 : r.plans.front().estimate.iteration_time_s;
  };
  const double none = step(std::nullopt);
  EXPECT_LT(step(GradCompression{.kind = CompressionKind::powersgd, .rank = 4}), 0.95 * none);
  EXPECT_LT(step(GradCompression{.kind = CompressionKind::bf16}), none);
  // topk:0.01 over 64 ranks gathers 64 % of the gradient's size in pairs of 8 bytes: slower.
  EXPECT_GT(step(GradCompression{.kind = CompressionKind::topk, .fraction = 0.01}), none);
  // Asked to search, the planner takes a compression here.
  req.pins.grad_compression.reset();
  req.pins.search_compression = true;
  const PlanSearchResult searched = plan_search(m.graph, c, req);
  ASSERT_FALSE(searched.plans.empty());
  EXPECT_TRUE(searched.plans.front().estimate.plan.grad_compression.enabled());
}

TEST(AsyncServerCost, StepAndStalenessByHand) {
  // k = 0: the step waits for its round trip.
  EXPECT_DOUBLE_EQ(async_server_step(1.0, 0.5, 0).step_s, 1.5);
  EXPECT_DOUBLE_EQ(async_server_step(1.0, 0.5, 0).staleness, 0.0);
  // A round trip shorter than a step: hidden, one step stale.
  EXPECT_DOUBLE_EQ(async_server_step(1.0, 0.5, 3).step_s, 1.0);
  EXPECT_DOUBLE_EQ(async_server_step(1.0, 0.5, 3).staleness, 1.0);
  // 2.5 steps of round trip: three in flight.
  EXPECT_DOUBLE_EQ(async_server_step(1.0, 2.5, 3).step_s, 1.0);
  EXPECT_DOUBLE_EQ(async_server_step(1.0, 2.5, 3).staleness, 3.0);
  // Longer than k steps: the bound sets the pace (round trip / k), at staleness k.
  EXPECT_DOUBLE_EQ(async_server_step(1.0, 6.0, 3).step_s, 2.0);
  EXPECT_DOUBLE_EQ(async_server_step(1.0, 6.0, 3).staleness, 3.0);
}

TEST(AsyncServerCost, StalenessHidesTheServerRoundTrip) {
  // GPT-2 1.5B on 64 A100-40GB, dp 64: a flat parameter server moves 2·S(n − 1)/n through
  // every NIC, several times the NVLink-aware ring's share, so synchronously it loses to the
  // ring; asynchronously each k more steps in flight hide another part of it.
  LoadedModel m = model_load("gpt2-1.5b");
  const Cluster c = cluster_load("dgx-a100-40g");
  PlanRequest req = dp64_request(c);
  const auto best = [&](GradSync sync, int k) {
    req.pins.grad_sync = sync;
    req.pins.max_staleness = k;
    const PlanSearchResult r = plan_search(m.graph, c, req);
    EXPECT_FALSE(r.plans.empty());
    return r.plans.empty() ? PlanEstimate{} : r.plans.front().estimate;
  };
  const double ring = best(GradSync::allreduce, 1).iteration_time_s;
  const double sync_ps = best(GradSync::parameter_server, 1).iteration_time_s;
  const PlanEstimate k0 = best(GradSync::parameter_server_async, 0);
  const PlanEstimate k3 = best(GradSync::parameter_server_async, 3);
  const PlanEstimate k8 = best(GradSync::parameter_server_async, 8);
  EXPECT_GT(sync_ps, 2 * ring);
  EXPECT_NEAR(k0.iteration_time_s, sync_ps, 0.1 * sync_ps); // no barrier, same round trip
  EXPECT_LT(k3.iteration_time_s, 0.5 * k0.iteration_time_s);
  EXPECT_EQ(k3.staleness, 3.0);
  EXPECT_LT(k8.iteration_time_s, ring); // enough steps in flight beat the ring here
  EXPECT_EQ(estimate_to_json(k3)["staleness"], 3.0);
}

TEST(DedicatedServerCost, InCastAndShardsByHand) {
  // N dedicated servers for dp workers: each server takes dp/N pushes of S/N, so the round
  // trip's transfer is 2·S·max(1, dp/N) over one NIC; with N = dp it is the co-located one.
  // The servers' optimizer shards are 1/N of the state, and the workers hold none of it.
  const Cluster c = cluster_load("dgx-a100-40g").with_devices(64);
  Plan p{.dp = 64, .global_batch_size = 64, .grad_sync = GradSync::parameter_server};
  const double bytes = 1e9;
  const auto transfer = [&](int servers) {
    p.parameter_servers = servers;
    return data_parallel_cost(c, p, Collective::all_reduce, bytes, 0, p.grad_sync).transfer_s;
  };
  const double colocated = transfer(0);
  EXPECT_NEAR(transfer(64), colocated, 1e-12 * colocated);
  EXPECT_NEAR(transfer(16), 4 * colocated, 1e-9 * colocated);
  EXPECT_NEAR(transfer(1), 64 * colocated, 1e-9 * colocated);
  EXPECT_NEAR(transfer(128), colocated, 1e-12 * colocated); // more servers than workers: the
                                                            // worker's NIC bounds it
  const Stack stack = stack_load(stack_default_name(c));
  p.parameter_servers = 8;
  EXPECT_EQ(param_state_bytes(p, stack).optimizer, 0.0);
  p.parameter_servers = 0;
  EXPECT_GT(param_state_bytes(p, stack).optimizer, 0.0);
}

TEST(DedicatedServerCost, PlannerComparesShardCounts) {
  // GPT-2 1.5B on 64 A100-40GB, dp 64, asynchronous k = 1: 16 dedicated servers are a 4×
  // in-cast, slower than the co-located shards; 64 offload the optimizer, so no slower. The
  // search under --grad-sync auto lists dedicated server counts beside co-located shards.
  LoadedModel m = model_load("gpt2-1.5b");
  const Cluster c = cluster_load("dgx-a100-40g");
  PlanRequest req = dp64_request(c);
  req.pins.grad_sync = GradSync::parameter_server;
  const auto step = [&](int servers) {
    req.pins.parameter_servers = servers;
    const PlanSearchResult r = plan_search(m.graph, c, req);
    EXPECT_FALSE(r.plans.empty());
    return r.plans.empty() ? 0.0 : r.plans.front().estimate.iteration_time_s;
  };
  const double colocated = step(0);
  EXPECT_GT(step(16), 1.5 * colocated);
  EXPECT_LE(step(64), colocated);
  req.pins.parameter_servers.reset();
  req.pins.grad_sync.reset();
  req.pins.search_grad_sync = true;
  req.top_k = 64;
  std::set<int> counts;
  for (const auto& plan : plan_search(m.graph, c, req).plans)
    if (is_parameter_server(plan.estimate.plan.grad_sync))
      counts.insert(plan.estimate.plan.parameter_servers);
  EXPECT_TRUE(counts.contains(0));
  EXPECT_TRUE(counts.contains(16));
  EXPECT_TRUE(counts.contains(64));
  // A pinned server count asks for a parameter server: no all-reduce plan is proposed.
  req.pins.parameter_servers = 16;
  const PlanSearchResult pinned = plan_search(m.graph, c, req);
  ASSERT_FALSE(pinned.plans.empty());
  for (const auto& plan : pinned.plans) {
    EXPECT_TRUE(is_parameter_server(plan.estimate.plan.grad_sync));
    EXPECT_EQ(plan.estimate.plan.parameter_servers, 16);
  }
}

} // namespace
