// A cluster whose every figure the simulator tests set by hand.
#pragma once

#include "parallax/core/cluster.hpp"

namespace parallax::test_support {

// A node of 8 devices: 100 TFLOP/s bf16, intra-node links of 100 GB/s at 50% efficiency and a
// 10 GB/s network at 80%; no latencies, so communication is bytes over bandwidth.
inline Cluster hand_cluster(int gpus) {
  Cluster c;
  c.name = "hand";
  c.device.name = "hand-gpu";
  c.device.peak_tflops = {{Precision::bf16, 100.0}, {Precision::fp32, 50.0}};
  c.device.memory_gib = 80;
  c.device.memory_bandwidth_gbps = 1000;
  c.device.elementwise_efficiency = 0.5;
  c.device.gemm_efficiency = {{1e6, 0.1}, {1e12, 0.8}};
  c.node.devices_per_node = 8;
  c.node.intra_bandwidth_gbps = 100;
  c.node.intra_latency_us = 0;
  c.network.num_nodes = 1;
  c.network.inter_bandwidth_gbps = 10;
  c.network.inter_latency_us = 0;
  c.collectives.intra = 0.5;
  c.collectives.inter = 0.8;
  return c.with_devices(gpus);
}

} // namespace parallax::test_support
