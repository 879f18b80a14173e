#include "parallax/core/error.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/simulator/collectives.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

namespace parallax {
namespace {

// A cluster whose every figure the tests set: 8 devices per node, 100 GB/s links inside a node
// at 50% efficiency (50 GB/s bus bandwidth), 10 GB/s NICs at 80% (8 GB/s), no latencies.
Cluster hand_cluster() {
  Cluster c;
  c.name = "hand";
  c.device.name = "hand-gpu";
  c.device.peak_tflops = {{Precision::bf16, 100.0}};
  c.device.memory_gib = 16;
  c.device.memory_bandwidth_gbps = 1000;
  c.node.devices_per_node = 8;
  c.node.intra_bandwidth_gbps = 100;
  c.node.intra_latency_us = 0;
  c.network.num_nodes = 4;
  c.network.inter_bandwidth_gbps = 10;
  c.network.inter_latency_us = 0;
  c.network.oversubscription = 1.0;
  c.collectives.intra = 0.5;
  c.collectives.inter = 0.8;
  return c;
}

constexpr double kIntraBusBw = 100e9 * 0.5;
constexpr double kNicBw = 10e9 * 0.8;

constexpr Collective kAllKinds[] = {Collective::all_reduce, Collective::reduce_scatter,
                                    Collective::all_gather, Collective::broadcast,
                                    Collective::send_recv};

TEST(BusFactor, NcclTestsConvention) {
  for (int n : {2, 3, 4, 8, 64, 1024}) {
    SCOPED_TRACE(n);
    const double dn = n;
    EXPECT_DOUBLE_EQ(bus_factor(Collective::all_reduce, n), 2.0 * (dn - 1) / dn);
    EXPECT_DOUBLE_EQ(bus_factor(Collective::reduce_scatter, n), (dn - 1) / dn);
    EXPECT_DOUBLE_EQ(bus_factor(Collective::all_gather, n), (dn - 1) / dn);
    EXPECT_DOUBLE_EQ(bus_factor(Collective::broadcast, n), 1.0);
    EXPECT_DOUBLE_EQ(bus_factor(Collective::send_recv, n), 1.0);
  }
  EXPECT_DOUBLE_EQ(bus_factor(Collective::all_reduce, 2), 1.0);
  EXPECT_DOUBLE_EQ(bus_factor(Collective::all_reduce, 8), 1.75);
  EXPECT_DOUBLE_EQ(bus_factor(Collective::reduce_scatter, 8), 0.875);
}

TEST(BusFactor, SingleRankMovesNothing) {
  EXPECT_EQ(bus_factor(Collective::all_reduce, 1), 0.0);
  EXPECT_EQ(bus_factor(Collective::reduce_scatter, 1), 0.0);
  EXPECT_EQ(bus_factor(Collective::all_gather, 1), 0.0);
  EXPECT_EQ(bus_factor(Collective::broadcast, 1), 0.0);
}

TEST(BusFactor, AllReduceIsReduceScatterPlusAllGather) {
  for (int n = 1; n <= 128; ++n) {
    EXPECT_DOUBLE_EQ(bus_factor(Collective::all_reduce, n),
                     bus_factor(Collective::reduce_scatter, n) +
                         bus_factor(Collective::all_gather, n))
        << n;
  }
}

TEST(GroupSpan, TensorParallelStrideOneStaysInANode) {
  EXPECT_EQ(group_span(8, 1, 8), (GroupSpan{8, 8, 1, 1}));
  EXPECT_EQ(group_span(4, 1, 8), (GroupSpan{4, 4, 1, 1}));
  EXPECT_EQ(group_span(2, 1, 8), (GroupSpan{2, 2, 1, 1}));
  // A group larger than a node fills whole nodes.
  EXPECT_EQ(group_span(16, 1, 8), (GroupSpan{16, 8, 2, 1}));
}

TEST(GroupSpan, DataParallelStrideT) {
  // t = 8: every DP peer is on its own node.
  EXPECT_EQ(group_span(16, 8, 8), (GroupSpan{16, 1, 16, 8}));
  // t = 2: four DP peers share a node (ranks 0, 2, 4, 6), so 8 peers span two nodes.
  EXPECT_EQ(group_span(8, 2, 8), (GroupSpan{8, 4, 2, 2}));
  EXPECT_EQ(group_span(4, 2, 8), (GroupSpan{4, 4, 1, 2}));
  // t = 4: ranks 0, 4 | 8, 12 | ...
  EXPECT_EQ(group_span(8, 4, 8), (GroupSpan{8, 2, 4, 4}));
  // t = 1: DP is dense.
  EXPECT_EQ(group_span(64, 1, 8), (GroupSpan{64, 8, 8, 1}));
}

TEST(GroupSpan, PipelineStrideTD) {
  // t·d = 16 on 8-GPU nodes: one pipeline rank per node.
  EXPECT_EQ(group_span(8, 16, 8), (GroupSpan{8, 1, 8, 16}));
  // t·d = 4: two pipeline ranks per node.
  EXPECT_EQ(group_span(4, 4, 8), (GroupSpan{4, 2, 2, 4}));
  // t·d = 2: four per node, all in one node.
  EXPECT_EQ(group_span(4, 2, 8), (GroupSpan{4, 4, 1, 2}));
}

TEST(GroupSpan, MembersAccountedFor) {
  for (int dpn : {1, 2, 4, 8, 16}) {
    for (int size = 1; size <= 64; ++size) {
      for (int stride : {1, 2, 4, 8, 16, 32}) {
        const GroupSpan s = group_span(size, stride, dpn);
        SCOPED_TRACE(testing::Message() << size << " " << stride << " " << dpn);
        EXPECT_EQ(s.size, size);
        EXPECT_GE(s.per_node, 1);
        EXPECT_LE(s.per_node, dpn);
        EXPECT_LE(s.per_node, size);
        EXPECT_GE(s.per_node * s.nodes, size);       // every member placed
        EXPECT_LT((s.nodes - 1) * s.per_node, size); // no empty node
      }
    }
  }
  EXPECT_EQ(group_span(1, 8, 8), (GroupSpan{1, 1, 1, 1}));
}

TEST(GroupSpan, RejectsBadGeometry) {
  EXPECT_THROW(group_span(0, 1, 8), CheckError);
  EXPECT_THROW(group_span(4, 0, 8), CheckError);
  EXPECT_THROW(group_span(4, 1, 0), CheckError);
}

TEST(CollectiveEfficiency, ProfileOverridesDefaults) {
  Cluster c = hand_cluster();
  EXPECT_DOUBLE_EQ(intra_efficiency(c), 0.5);
  EXPECT_DOUBLE_EQ(inter_efficiency(c), 0.8);
  c.collectives = {};
  EXPECT_GT(intra_efficiency(c), 0.0);
  EXPECT_LE(intra_efficiency(c), 1.0);
  EXPECT_GT(inter_efficiency(c), 0.0);
  EXPECT_LE(inter_efficiency(c), 1.0);
}

TEST(CollectiveTime, InsideANodeIsBusFactorOverBusBandwidth) {
  const Cluster c = hand_cluster();
  const double bytes = 1e9;
  for (int n : {2, 4, 8}) {
    const GroupSpan span = group_span(n, 1, 8);
    ASSERT_EQ(span.nodes, 1);
    for (Collective kind : kAllKinds) {
      SCOPED_TRACE(testing::Message() << n << " " << static_cast<int>(kind));
      EXPECT_NEAR(collective_time_s(c, kind, bytes, span),
                  bus_factor(kind, n) * bytes / kIntraBusBw, 1e-12);
    }
  }
  // Hand-computed: an 8-way all-reduce of 1 GB at 50 GB/s bus bandwidth, 2·7/8 · 1e9 / 50e9.
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, {8, 8, 1}), 0.035, 1e-12);
}

TEST(CollectiveTime, MeasuredCollectivesReplaceLinkFiguresInsideANode) {
  Cluster c = hand_cluster();
  c.node.measured_collectives = {
      {.group_size = 2, .stride = 1, .latency_us = 10, .bus_bandwidth_gbps = 5},
      {.group_size = 2, .stride = 4, .latency_us = 20, .bus_bandwidth_gbps = 2}};
  const double bytes = 1e8;
  // Adjacent pair: 2(n − 1) ring steps of 10 µs, then 2(n − 1)/n · S at 5 GB/s.
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, group_span(2, 1, 8)),
              2 * 10e-6 + 1.0 * bytes / 5e9, 1e-12);
  // Ranks four apart use their own measurement.
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, group_span(2, 4, 8)),
              2 * 20e-6 + 1.0 * bytes / 2e9, 1e-12);
  // Another stride of the same size falls back to the first measurement of that size.
  EXPECT_NEAR(collective_time_s(c, Collective::all_gather, bytes, group_span(2, 2, 8)),
              10e-6 + 0.5 * bytes / 5e9, 1e-12);
  // Sizes not measured, and groups across nodes, keep the link figures.
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, group_span(8, 1, 8)),
              1.75 * bytes / kIntraBusBw, 1e-12);
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{2, 1, 2, 8}),
              1.0 * bytes / kNicBw, 1e-12);
}

TEST(CollectiveTime, OneMemberPerNodeIsLimitedByTheNic) {
  Cluster c = hand_cluster();
  const double bytes = 1e9;
  const GroupSpan span{4, 1, 4};
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, span), 1.5 * bytes / kNicBw,
              1e-12);
  EXPECT_NEAR(collective_time_s(c, Collective::all_gather, bytes, span), 0.75 * bytes / kNicBw,
              1e-12);
  EXPECT_NEAR(collective_time_s(c, Collective::send_recv, bytes, GroupSpan{2, 1, 2}),
              bytes / kNicBw, 1e-12);
  // Slower than the same ring inside one node.
  EXPECT_GT(collective_time_s(c, Collective::all_reduce, bytes, span),
            collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{4, 4, 1}));
  // An oversubscribed fabric divides the NIC bandwidth.
  c.network.oversubscription = 2.0;
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, span),
              1.5 * bytes / (kNicBw / 2.0), 1e-12);
}

TEST(CollectiveTime, SeveralMembersPerNodeUseSeveralNics) {
  const Cluster c = hand_cluster();
  const double bytes = 1e9;
  // 2 per node: the node contributes 2 NICs (16 GB/s), still below NVLink's 50 GB/s.
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{8, 2, 4}),
              bus_factor(Collective::all_reduce, 8) * bytes / (2 * kNicBw), 1e-12);
  // 8 per node: 8 NICs (64 GB/s) exceed the intra-node bus bandwidth, which then limits.
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{16, 8, 2}),
              bus_factor(Collective::all_reduce, 16) * bytes / kIntraBusBw, 1e-12);
  // More members per node never makes the cross-node ring slower per byte of bus traffic.
  const double one = collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{8, 1, 8}) /
                     bus_factor(Collective::all_reduce, 8);
  const double two = collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{16, 2, 8}) /
                     bus_factor(Collective::all_reduce, 16);
  EXPECT_LT(two, one);
}

TEST(CollectiveTime, LinearInBytesWithoutLatency) {
  const Cluster c = hand_cluster();
  const GroupSpan spans[] = {{8, 8, 1}, {4, 1, 4}, {16, 2, 8}, {32, 8, 4}};
  for (const GroupSpan& span : spans) {
    for (Collective kind : kAllKinds) {
      for (GradSync algo : {GradSync::allreduce, GradSync::tree, GradSync::hierarchical,
                            GradSync::parameter_server}) {
        SCOPED_TRACE(testing::Message()
                     << span.size << "/" << span.per_node << " kind " << static_cast<int>(kind)
                     << " algo " << static_cast<int>(algo));
        const double t1 = collective_time_s(c, kind, 3e8, span, algo);
        const double t2 = collective_time_s(c, kind, 6e8, span, algo);
        EXPECT_GT(t1, 0.0);
        EXPECT_NEAR(t2, 2.0 * t1, 1e-12 * t2);
      }
    }
  }
}

TEST(CollectiveTime, LatencyOnlyAdds) {
  Cluster c = hand_cluster();
  const GroupSpan spans[] = {{8, 8, 1}, {4, 1, 4}, {32, 8, 4}};
  Cluster slow = c;
  slow.node.intra_latency_us = 2;
  slow.network.inter_latency_us = 5;
  for (const GroupSpan& span : spans) {
    for (Collective kind : kAllKinds) {
      for (GradSync algo : {GradSync::allreduce, GradSync::tree, GradSync::hierarchical,
                            GradSync::parameter_server}) {
        const double bytes = 1e6;
        const double fast = collective_time_s(c, kind, bytes, span, algo);
        const double lat = collective_time_s(slow, kind, bytes, span, algo);
        EXPECT_GT(lat, fast) << span.size << " " << static_cast<int>(kind);
        // No collective takes less than one message latency.
        EXPECT_GE(lat - fast, 2e-6 - 1e-15) << span.size << " " << static_cast<int>(kind);
      }
    }
  }
  // A one-byte message over the network still pays the network latency.
  EXPECT_GE(collective_time_s(slow, Collective::send_recv, 1, GroupSpan{2, 1, 2}), 5e-6);
}

TEST(CollectiveTime, SingleRankAndEmptyBuffersCostNothing) {
  Cluster c = hand_cluster();
  c.node.intra_latency_us = 2;
  c.network.inter_latency_us = 5;
  const GroupSpan one{1, 1, 1};
  for (Collective kind : {Collective::all_reduce, Collective::reduce_scatter,
                          Collective::all_gather, Collective::broadcast}) {
    for (GradSync algo : {GradSync::allreduce, GradSync::tree, GradSync::hierarchical,
                          GradSync::parameter_server}) {
      EXPECT_EQ(collective_time_s(c, kind, 1e9, one, algo), 0.0) << static_cast<int>(kind);
    }
  }
  for (Collective kind : kAllKinds) {
    EXPECT_EQ(collective_time_s(c, kind, 0.0, GroupSpan{8, 8, 1}), 0.0);
    EXPECT_EQ(collective_time_s(c, kind, 0.0, GroupSpan{4, 1, 4}), 0.0);
  }
}

TEST(CollectiveTime, GradSyncAlgorithmsArePositiveAndOnlyChangeAllReduce) {
  Cluster c = hand_cluster();
  c.node.intra_latency_us = 2;
  c.network.inter_latency_us = 5;
  const GroupSpan spans[] = {{8, 8, 1}, {4, 1, 4}, {16, 8, 2}, {32, 8, 4}, {8, 2, 4}};
  const double bytes = 2e8;
  for (const GroupSpan& span : spans) {
    for (GradSync algo : {GradSync::tree, GradSync::hierarchical, GradSync::parameter_server}) {
      SCOPED_TRACE(testing::Message()
                   << span.size << "/" << span.per_node << " algo " << static_cast<int>(algo));
      const double t = collective_time_s(c, Collective::all_reduce, bytes, span, algo);
      EXPECT_GT(t, 0.0);
      EXPECT_TRUE(std::isfinite(t));
      // Any all-reduce moves at least the reduce-scatter's share of the buffer over the bus.
      EXPECT_GE(t, bus_factor(Collective::reduce_scatter, span.size) * bytes /
                           std::max(kIntraBusBw, span.per_node * kNicBw) -
                       1e-15);
      // The algorithm is only for all-reduce.
      for (Collective kind : {Collective::reduce_scatter, Collective::all_gather,
                              Collective::broadcast, Collective::send_recv}) {
        EXPECT_EQ(collective_time_s(c, kind, bytes, span, algo),
                  collective_time_s(c, kind, bytes, span, GradSync::allreduce));
      }
    }
  }
}

TEST(CollectiveTime, HierarchicalComposesLocalAndCrossNodeRings) {
  // Reduce-scatter inside each node, all-reduce of the 1/k shard across nodes, all-gather
  // inside: without latencies the times add.
  const Cluster c = hand_cluster();
  const double bytes = 8e8;
  const GroupSpan span{32, 8, 4};
  const double expect = bus_factor(Collective::reduce_scatter, 8) * bytes / kIntraBusBw +
                        bus_factor(Collective::all_reduce, 4) * (bytes / 8) / kNicBw +
                        bus_factor(Collective::all_gather, 8) * bytes / kIntraBusBw;
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, span, GradSync::hierarchical),
              expect, 1e-12);
  // Inside one node it is just the ring all-reduce.
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{8, 8, 1},
                                GradSync::hierarchical),
              collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{8, 8, 1}), 1e-12);
}

TEST(CollectiveTime, ParameterServerMovesTwiceTheBufferThroughEachNic) {
  const Cluster c = hand_cluster();
  const double bytes = 1e9;
  EXPECT_NEAR(collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{4, 1, 4},
                                GradSync::parameter_server),
              2.0 * bytes / kNicBw, 1e-12);
  // Never cheaper than the bandwidth-optimal ring on the same links.
  EXPECT_GE(collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{4, 1, 4},
                              GradSync::parameter_server),
            collective_time_s(c, Collective::all_reduce, bytes, GroupSpan{4, 1, 4}));
}

TEST(CollectiveTime, TreeNeverBeatsTheRingOnBandwidth) {
  // Without latency a double binary tree moves the whole buffer twice; the ring 2(n-1)/n.
  const Cluster c = hand_cluster();
  const GroupSpan spans[] = {{8, 8, 1}, {4, 1, 4}, {32, 8, 4}};
  for (const GroupSpan& span : spans) {
    EXPECT_GE(collective_time_s(c, Collective::all_reduce, 1e9, span, GradSync::tree),
              collective_time_s(c, Collective::all_reduce, 1e9, span))
        << span.size;
  }
}

TEST(CollectiveTime, ZooProfileCrossNodeSlowerThanNvlink) {
  // Real profile figures (NVLink far faster than a per-GPU NIC): spanning nodes costs more.
  const Cluster c = cluster_load("dgx-a100-80g");
  const double bytes = 1e9;
  EXPECT_LT(collective_time_s(c, Collective::all_reduce, bytes, group_span(8, 1, 8)),
            collective_time_s(c, Collective::all_reduce, bytes, group_span(8, 8, 8)));
}

} // namespace
} // namespace parallax
