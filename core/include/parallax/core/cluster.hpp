// Cluster: the hardware profile every cost is computed against.
//
// Bandwidths are GB/s (1e9 bytes/s) per device per direction; latencies in microseconds; peak
// compute in dense TFLOP/s per device and precision. See hardware_profiles/zoo/*.json.
#pragma once

#include "parallax/core/precision.hpp"

#include <array>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace parallax {

// One point of the GEMM efficiency curve: a GEMM of `flops` FLOPs reaches `efficiency` × peak.
// Between points the curve is interpolated in log(flops); outside it, clamped.
struct GemmEfficiencyPoint {
  double flops = 0;
  double efficiency = 0;
  bool operator==(const GemmEfficiencyPoint&) const = default;
};

struct Device {
  std::string name;
  std::string kind = "gpu"; // "gpu" or "cpu"
  std::map<Precision, double> peak_tflops;
  double memory_gib = 0;
  double memory_bandwidth_gbps = 0;
  std::vector<GemmEfficiencyPoint> gemm_efficiency; // empty: the cost model's default curve
  // Fraction of memory bandwidth element-wise kernels reach; 0: the cost model's default.
  double elementwise_efficiency = 0;
  // Fraction of memory bandwidth the optimizer's update pass reaches (its traffic in the cost
  // model's terms, e.g. 28 bytes per fp32 AdamW parameter); 0: the element-wise figure.
  double optimizer_efficiency = 0;
  // Fraction of peak FlashAttention-2-class kernels reach (fused attention built on Ampere
  // tensor-core instructions); 0: no lower ceiling than the device's native fused attention.
  double flash2_attention_efficiency = 0;
  // Fixed cost of one kernel launch (0: the cost model's default, 4 µs on GPUs, 1 µs on CPUs).
  double kernel_overhead_us = 0;
  bool operator==(const Device&) const = default;
};

// A collective measured on the machine itself (`parallax calibrate`): rings over `group_size`
// ranks of one node whose members are `stride` ranks apart (1: adjacent, like tensor-parallel
// groups; larger: interleaved, like data-parallel groups), all groups running at once as they
// do in training. Fit of t = 2(n − 1)·latency + 2(n − 1)/n · bytes / bus bandwidth.
struct MeasuredCollective {
  int group_size = 2;
  int stride = 1;
  double latency_us = 0; // per ring step
  double bus_bandwidth_gbps = 0;
  bool operator==(const MeasuredCollective&) const = default;
};

struct Node {
  int devices_per_node = 1;
  double intra_bandwidth_gbps = 0;
  double intra_latency_us = 0;
  // When present, collectives inside a node use the entry of their group size (and stride)
  // instead of the link figures above.
  std::vector<MeasuredCollective> measured_collectives;
  bool operator==(const Node&) const = default;
};

enum class Topology { fat_tree, rail_optimized, single_switch };
inline constexpr std::array<std::string_view, 3> kTopologyNames = {"fat-tree", "rail-optimized",
                                                                   "single-switch"};

struct Network {
  int num_nodes = 1;
  double inter_bandwidth_gbps = 0;
  double inter_latency_us = 0;
  Topology topology = Topology::fat_tree;
  double oversubscription = 1.0; // ≥ 1: uplink bandwidth is inter_bandwidth / oversubscription
  bool operator==(const Network&) const = default;
};

// Fractions of link bandwidth that real collective implementations reach (NCCL bus bandwidth
// over link bandwidth); 0 means the cost model's default.
struct CollectiveEfficiency {
  double intra = 0;
  double inter = 0;
  bool operator==(const CollectiveEfficiency&) const = default;
};

// Nodes of one kind in a heterogeneous cluster: num_nodes nodes of `device` × `node`, placed
// after the groups before it (ranks fill group 0's nodes first).
struct NodeGroup {
  std::string name;
  int num_nodes = 1;
  Device device;
  Node node;
  bool operator==(const NodeGroup&) const = default;
};

// Where checkpoints go (the goodput objective). Defaults, used where the profile is silent: a
// parallel file system client writes 2 GB/s and reads 4 GB/s per node with no aggregate cap, a
// device copies to host memory at 25 GB/s (PCIe 4.0 x16 in practice), and a restart (requeue,
// process start, communicator set-up) takes 300 s before the checkpoint is read. These are
// assumptions for profiles without measurements, not measurements.
struct Storage {
  double write_gbps_per_node = 2.0;
  double read_gbps_per_node = 4.0;
  double aggregate_gbps = 0; // the file system's own limit over every client; 0: none
  double host_copy_gbps = 25.0;
  double restart_s = 300.0;
  bool operator==(const Storage&) const = default;
};

// Relative spreads (standard deviations of the logarithm) of the inputs a profile is least sure
// of, for plan --uncertainty: sustained compute rates, collective bandwidths and kernel
// overheads. Defaults, used where the profile is silent, are assumptions of this tool, not
// measurements: 7 %, 15 % and 30 %.
struct Uncertainty {
  double gemm_efficiency = 0.07;
  double bandwidth = 0.15;
  double kernel_overhead = 0.30;
  bool operator==(const Uncertainty&) const = default;
};

struct Cluster {
  std::string name;
  std::string notes;
  Device device; // with node groups: the first group's
  Node node;
  Network network;
  CollectiveEfficiency collectives;
  std::optional<double> cost_per_device_hour_usd;
  Storage storage;
  Uncertainty uncertainty;
  // Empty: every node is `device` × `node`. Otherwise the node groups in rank order (their
  // nodes add up to network.num_nodes; they share devices_per_node and the network).
  std::vector<NodeGroup> groups;

  bool heterogeneous() const { return groups.size() > 1; }
  int num_groups() const { return groups.empty() ? 1 : static_cast<int>(groups.size()); }
  // The group node `node` belongs to (0 without groups).
  int group_of_node(int node) const;
  int group_of_rank(int rank) const { return group_of_node(rank / node.devices_per_node); }
  // This cluster as if every node were group g's (device, node): the costs of work on it.
  Cluster group_view(int g) const;

  int num_devices() const { return node.devices_per_node * network.num_nodes; }
  bool supports(Precision p) const { return device.peak_tflops.contains(p); }
  // Peak FLOP/s of one device in precision p; throws InputError if the profile lacks it.
  double peak_flops(Precision p) const;
  // The mean peak over every device (the MFU reference of a heterogeneous cluster).
  double mean_peak_flops(Precision p) const;
  double memory_bytes() const; // with node groups: the smallest device's
  // The same cluster resized to `gpus` devices: num_nodes = gpus / devices_per_node, or one
  // partial node when gpus < devices_per_node. Other counts are an InputError.
  // This profile's devices, `ranks` of them, for the figures a run needs of its hardware (the
  // MFU reference, a stage partition's costs): with_devices when `ranks` fills whole nodes or
  // fits in one, else nodes of gcd(ranks, devices_per_node) devices — a CPU run on 3 processes
  // trains whatever the profile's node size.
  // With node groups each keeps its share of the nodes (gpus must split in the groups'
  // proportions, in whole nodes).
  Cluster for_ranks(int ranks) const;
  Cluster with_devices(int gpus) const;

  bool operator==(const Cluster&) const = default;
};

std::string_view topology_name(Topology t);

// "32 × A100-SXM4-80GB", or per node group "16 × A100-SXM4-80GB + 16 × H100-SXM5-80GB", for
// `gpus` of the cluster's devices (resized as with_devices does).
std::string devices_label(const Cluster& cluster, int gpus);

} // namespace parallax
