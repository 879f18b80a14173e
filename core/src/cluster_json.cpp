#include "parallax/core/cluster_json.hpp"

#include "parallax/core/enum_names.hpp"

#include <fmt/format.h>

#include <array>
#include <cmath>

namespace parallax {

namespace {

constexpr std::array<std::string_view, 2> kDeviceKinds = {"gpu", "cpu"};

Device device_from_json(const JsonReader& r) {
  r.reject_unknown({"name", "kind", "peak_tflops", "memory_gib", "memory_bandwidth_gbps",
                    "gemm_efficiency", "elementwise_efficiency", "optimizer_efficiency",
                    "flash2_attention_efficiency", "kernel_overhead_us"});
  Device d;
  d.name = r.string("name");
  d.kind = r.choice_or("kind", kDeviceKinds, "gpu");
  JsonReader peaks = r.child("peak_tflops");
  for (const auto& [key, unused] : peaks.value().items()) {
    auto p = precision_parse(key);
    if (!p) {
      peaks.fail(key, "a precision: one of \"fp32\", \"tf32\", \"fp16\", \"bf16\", \"fp8\"",
                 "an unknown precision");
    }
    d.peak_tflops[*p] = peaks.positive(key);
  }
  if (d.peak_tflops.empty()) {
    r.fail("peak_tflops", "at least one precision's peak", "an empty object");
  }
  d.memory_gib = r.positive("memory_gib");
  d.memory_bandwidth_gbps = r.positive("memory_bandwidth_gbps");
  if (r.has("gemm_efficiency")) {
    JsonReader curve = r.array("gemm_efficiency");
    double last_flops = 0;
    for (std::size_t i = 0; i < curve.array_size(); ++i) {
      JsonReader point = curve.element(i);
      point.reject_unknown({"flops", "efficiency"});
      GemmEfficiencyPoint g{point.positive("flops"), point.positive("efficiency")};
      if (g.efficiency > 1.0) {
        point.fail("efficiency", "a fraction of peak in (0, 1]", fmt::format("{}", g.efficiency));
      }
      if (g.flops <= last_flops) {
        point.fail("flops", "points in increasing order of flops", fmt::format("{}", g.flops));
      }
      last_flops = g.flops;
      d.gemm_efficiency.push_back(g);
    }
  }
  d.elementwise_efficiency = r.non_negative_or("elementwise_efficiency", 0.0);
  if (d.elementwise_efficiency > 1.0) {
    r.fail("elementwise_efficiency", "a fraction in (0, 1]",
           fmt::format("{}", d.elementwise_efficiency));
  }
  d.kernel_overhead_us = r.non_negative_or("kernel_overhead_us", 0.0);
  d.optimizer_efficiency = r.non_negative_or("optimizer_efficiency", 0.0);
  if (d.optimizer_efficiency > 1.0) {
    r.fail("optimizer_efficiency", "a fraction in (0, 1]",
           fmt::format("{}", d.optimizer_efficiency));
  }
  d.flash2_attention_efficiency = r.non_negative_or("flash2_attention_efficiency", 0.0);
  if (d.flash2_attention_efficiency > 1.0) {
    r.fail("flash2_attention_efficiency", "a fraction of peak in (0, 1]",
           fmt::format("{}", d.flash2_attention_efficiency));
  }
  return d;
}

Node node_from_json(const JsonReader& node) {
  node.reject_unknown(
      {"devices_per_node", "intra_bandwidth_gbps", "intra_latency_us", "measured_collectives"});
  Node n;
  n.devices_per_node = static_cast<int>(node.integer("devices_per_node", 1, 1 << 16));
  n.intra_bandwidth_gbps = node.positive("intra_bandwidth_gbps");
  n.intra_latency_us = node.non_negative_or("intra_latency_us", 0.0);
  if (node.has("measured_collectives")) {
    JsonReader list = node.array("measured_collectives");
    for (std::size_t i = 0; i < list.array_size(); ++i) {
      JsonReader e = list.element(i);
      e.reject_unknown({"group_size", "stride", "latency_us", "bus_bandwidth_gbps"});
      MeasuredCollective m;
      m.group_size = static_cast<int>(e.integer("group_size", 2, n.devices_per_node));
      m.stride = static_cast<int>(e.integer_or("stride", 1, 1, n.devices_per_node));
      m.latency_us = e.non_negative_or("latency_us", 0.0);
      m.bus_bandwidth_gbps = e.positive("bus_bandwidth_gbps");
      n.measured_collectives.push_back(m);
    }
  }
  return n;
}

// Heterogeneous clusters: the groups in rank order, one device and node kind each.
void groups_from_json(const JsonReader& root, Cluster& c) {
  JsonReader list = root.array("node_groups");
  if (list.array_size() == 0 || list.array_size() > 64) {
    root.fail("node_groups", "1 to 64 groups", std::to_string(list.array_size()));
  }
  int nodes = 0;
  for (std::size_t i = 0; i < list.array_size(); ++i) {
    JsonReader g = list.element(i);
    g.reject_unknown({"name", "num_nodes", "device", "node"});
    NodeGroup group;
    group.name = g.string("name");
    group.num_nodes = static_cast<int>(g.integer("num_nodes", 1, 1 << 20));
    group.device = device_from_json(g.child("device"));
    group.node = node_from_json(g.child("node"));
    if (!c.groups.empty() &&
        group.node.devices_per_node != c.groups.front().node.devices_per_node) {
      g.fail("node",
             fmt::format("devices_per_node {} like the first group's (ranks fill whole "
                         "nodes in order)",
                         c.groups.front().node.devices_per_node),
             std::to_string(group.node.devices_per_node));
    }
    nodes += group.num_nodes;
    c.groups.push_back(std::move(group));
  }
  if (nodes != c.network.num_nodes) {
    root.child("network").fail("num_nodes",
                               fmt::format("the node groups' nodes added up ({})", nodes),
                               std::to_string(c.network.num_nodes));
  }
  c.device = c.groups.front().device;
  c.node = c.groups.front().node;
}

} // namespace

Cluster cluster_from_json(const Json& doc, const std::string& source) {
  JsonReader root(doc, source);
  root.reject_unknown({"name", "notes", "device", "node", "node_groups", "network", "collectives",
                       "cost_per_device_hour_usd", "storage", "uncertainty"});
  Cluster c;
  c.name = root.string("name");
  c.notes = root.string_or("notes", "");
  if (root.has("node_groups")) {
    for (const char* field : {"device", "node"}) {
      if (root.has(field)) {
        root.fail(field, "no top-level value when node_groups are given (each group has its own)",
                  "one");
      }
    }
  } else {
    c.device = device_from_json(root.child("device"));
    c.node = node_from_json(root.child("node"));
  }

  JsonReader net = root.child("network");
  net.reject_unknown(
      {"num_nodes", "inter_bandwidth_gbps", "inter_latency_us", "topology", "oversubscription"});
  c.network.num_nodes = static_cast<int>(net.integer("num_nodes", 1, 1 << 20));
  c.network.inter_bandwidth_gbps = net.positive("inter_bandwidth_gbps");
  c.network.inter_latency_us = net.non_negative_or("inter_latency_us", 0.0);
  c.network.topology = *enum_from_name<Topology>(
      kTopologyNames, net.choice_or("topology", kTopologyNames, "fat-tree"));
  c.network.oversubscription = net.positive_or("oversubscription", 1.0);
  if (c.network.oversubscription < 1.0) {
    net.fail("oversubscription", "a ratio >= 1 (1 = non-blocking)",
             fmt::format("{}", c.network.oversubscription));
  }
  if (root.has("node_groups")) {
    groups_from_json(root, c);
  }
  if (c.num_devices() > (1 << 24)) {
    root.fail("network", "at most 16777216 devices in all", std::to_string(c.num_devices()));
  }

  if (root.has("collectives")) {
    JsonReader coll = root.child("collectives");
    coll.reject_unknown({"intra_efficiency", "inter_efficiency"});
    c.collectives.intra = coll.non_negative_or("intra_efficiency", 0.0);
    c.collectives.inter = coll.non_negative_or("inter_efficiency", 0.0);
    if (c.collectives.intra > 1.0 || c.collectives.inter > 1.0) {
      coll.fail_here("efficiencies in (0, 1]", "a value above 1");
    }
  }
  if (root.has("cost_per_device_hour_usd")) {
    c.cost_per_device_hour_usd = root.positive("cost_per_device_hour_usd");
  }
  if (root.has("uncertainty")) {
    JsonReader u = root.child("uncertainty");
    u.reject_unknown({"gemm_efficiency", "bandwidth", "kernel_overhead"});
    const Uncertainty d;
    c.uncertainty.gemm_efficiency = u.non_negative_or("gemm_efficiency", d.gemm_efficiency);
    c.uncertainty.bandwidth = u.non_negative_or("bandwidth", d.bandwidth);
    c.uncertainty.kernel_overhead = u.non_negative_or("kernel_overhead", d.kernel_overhead);
    for (const double v :
         {c.uncertainty.gemm_efficiency, c.uncertainty.bandwidth, c.uncertainty.kernel_overhead}) {
      if (v > 2.0) {
        u.fail_here("relative spreads in [0, 2]", fmt::format("{}", v));
      }
    }
  }
  if (root.has("storage")) {
    JsonReader st = root.child("storage");
    st.reject_unknown({"write_gbps_per_node", "read_gbps_per_node", "aggregate_gbps",
                       "host_copy_gbps", "restart_s"});
    const Storage d;
    c.storage.write_gbps_per_node = st.positive_or("write_gbps_per_node", d.write_gbps_per_node);
    c.storage.read_gbps_per_node = st.positive_or("read_gbps_per_node", d.read_gbps_per_node);
    c.storage.aggregate_gbps = st.non_negative_or("aggregate_gbps", d.aggregate_gbps);
    c.storage.host_copy_gbps = st.positive_or("host_copy_gbps", d.host_copy_gbps);
    c.storage.restart_s = st.non_negative_or("restart_s", d.restart_s);
  }
  return c;
}

namespace {

Json device_to_json(const Device& d) {
  Json peaks = Json::object();
  for (const auto& [p, tflops] : d.peak_tflops) {
    peaks[std::string(precision_name(p))] = tflops;
  }
  Json device = {{"name", d.name},
                 {"kind", d.kind},
                 {"peak_tflops", peaks},
                 {"memory_gib", d.memory_gib},
                 {"memory_bandwidth_gbps", d.memory_bandwidth_gbps}};
  if (!d.gemm_efficiency.empty()) {
    Json curve = Json::array();
    for (const auto& g : d.gemm_efficiency) {
      curve.push_back({{"flops", g.flops}, {"efficiency", g.efficiency}});
    }
    device["gemm_efficiency"] = curve;
  }
  if (d.elementwise_efficiency > 0) {
    device["elementwise_efficiency"] = d.elementwise_efficiency;
  }
  if (d.flash2_attention_efficiency > 0) {
    device["flash2_attention_efficiency"] = d.flash2_attention_efficiency;
  }
  if (d.kernel_overhead_us > 0) {
    device["kernel_overhead_us"] = d.kernel_overhead_us;
  }
  if (d.optimizer_efficiency > 0) {
    device["optimizer_efficiency"] = d.optimizer_efficiency;
  }
  return device;
}

Json node_to_json(const Node& n) {
  Json node = {{"devices_per_node", n.devices_per_node},
               {"intra_bandwidth_gbps", n.intra_bandwidth_gbps},
               {"intra_latency_us", n.intra_latency_us}};
  Json measured = Json::array();
  for (const auto& m : n.measured_collectives) {
    measured.push_back({{"group_size", m.group_size},
                        {"stride", m.stride},
                        {"latency_us", m.latency_us},
                        {"bus_bandwidth_gbps", m.bus_bandwidth_gbps}});
  }
  if (!measured.empty()) {
    node["measured_collectives"] = measured;
  }
  return node;
}

} // namespace

Json cluster_to_json(const Cluster& c) {
  Json doc = {{"name", c.name},
              {"network",
               {{"num_nodes", c.network.num_nodes},
                {"inter_bandwidth_gbps", c.network.inter_bandwidth_gbps},
                {"inter_latency_us", c.network.inter_latency_us},
                {"topology", std::string(topology_name(c.network.topology))},
                {"oversubscription", c.network.oversubscription}}}};
  if (!c.notes.empty()) {
    doc["notes"] = c.notes;
  }
  if (c.groups.empty()) {
    doc["device"] = device_to_json(c.device);
    doc["node"] = node_to_json(c.node);
  } else {
    Json groups = Json::array();
    for (const NodeGroup& g : c.groups) {
      groups.push_back({{"name", g.name},
                        {"num_nodes", g.num_nodes},
                        {"device", device_to_json(g.device)},
                        {"node", node_to_json(g.node)}});
    }
    doc["node_groups"] = groups;
  }
  if (c.collectives.intra > 0 || c.collectives.inter > 0) {
    Json coll = Json::object();
    if (c.collectives.intra > 0) {
      coll["intra_efficiency"] = c.collectives.intra;
    }
    if (c.collectives.inter > 0) {
      coll["inter_efficiency"] = c.collectives.inter;
    }
    doc["collectives"] = coll;
  }
  if (c.uncertainty != Uncertainty{}) {
    doc["uncertainty"] = {{"gemm_efficiency", c.uncertainty.gemm_efficiency},
                          {"bandwidth", c.uncertainty.bandwidth},
                          {"kernel_overhead", c.uncertainty.kernel_overhead}};
  }
  if (c.storage != Storage{}) {
    doc["storage"] = {{"write_gbps_per_node", c.storage.write_gbps_per_node},
                      {"read_gbps_per_node", c.storage.read_gbps_per_node},
                      {"aggregate_gbps", c.storage.aggregate_gbps},
                      {"host_copy_gbps", c.storage.host_copy_gbps},
                      {"restart_s", c.storage.restart_s}};
  }
  if (c.cost_per_device_hour_usd) {
    doc["cost_per_device_hour_usd"] = *c.cost_per_device_hour_usd;
  }
  return doc;
}

} // namespace parallax
