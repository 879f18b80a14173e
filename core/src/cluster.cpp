#include "parallax/core/cluster.hpp"

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>

#include <numeric>

namespace parallax {

std::string_view topology_name(Topology t) {
  return enum_name(kTopologyNames, t);
}

double Cluster::peak_flops(Precision p) const {
  auto it = device.peak_tflops.find(p);
  if (it == device.peak_tflops.end()) {
    std::string have;
    for (const auto& [q, unused] : device.peak_tflops) {
      have += fmt::format("{}{}", have.empty() ? "" : ", ", precision_name(q));
    }
    throw InputError(name, "/device/peak_tflops/" + std::string(precision_name(p)),
                     fmt::format("a peak for precision {}", precision_name(p)),
                     fmt::format("only {}", have), "choose a precision this device supports");
  }
  return it->second * 1e12;
}

std::string devices_label(const Cluster& c, int gpus) {
  if (!c.heterogeneous()) {
    return fmt::format("{} × {}", gpus, c.device.name);
  }
  const Cluster sized = c.with_devices(gpus);
  std::string out;
  for (const NodeGroup& g : sized.groups) {
    out += fmt::format("{}{} × {}", out.empty() ? "" : " + ",
                       g.num_nodes * sized.node.devices_per_node, g.device.name);
  }
  return out;
}

double Cluster::mean_peak_flops(Precision p) const {
  if (groups.empty()) {
    return peak_flops(p);
  }
  double sum = 0;
  int nodes = 0;
  for (int g = 0; g < num_groups(); ++g) {
    sum += group_view(g).peak_flops(p) * groups[static_cast<std::size_t>(g)].num_nodes;
    nodes += groups[static_cast<std::size_t>(g)].num_nodes;
  }
  return sum / nodes;
}

double Cluster::memory_bytes() const {
  double gib = device.memory_gib;
  for (const NodeGroup& g : groups) {
    gib = std::min(gib, g.device.memory_gib);
  }
  return gib * 1024.0 * 1024.0 * 1024.0;
}

Cluster Cluster::for_ranks(int ranks) const {
  const int per_node = node.devices_per_node;
  if (ranks < 1 || ranks < per_node || ranks % per_node == 0) {
    return with_devices(ranks);
  }
  Cluster c = *this;
  c.node.devices_per_node = std::gcd(ranks, per_node);
  return c.with_devices(ranks);
}

int Cluster::group_of_node(int n) const {
  int first = 0;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    first += groups[g].num_nodes;
    if (n < first) {
      return static_cast<int>(g);
    }
  }
  return groups.empty() ? 0 : static_cast<int>(groups.size()) - 1;
}

Cluster Cluster::group_view(int g) const {
  Cluster out = *this;
  if (!groups.empty()) {
    const NodeGroup& group = groups.at(static_cast<std::size_t>(g));
    out.device = group.device;
    out.node = group.node;
    out.name = name + "/" + group.name;
    out.groups.clear();
  }
  return out;
}

Cluster Cluster::with_devices(int gpus) const {
  if (gpus < 1) {
    throw InputError(name, "--gpus", "a device count >= 1", std::to_string(gpus));
  }
  if (heterogeneous() && gpus != num_devices()) {
    // Each group keeps its share of the nodes, in whole nodes.
    Cluster out = *this;
    const int per_node = node.devices_per_node;
    const long long nodes = gpus / per_node;
    int total = 0;
    for (NodeGroup& group : out.groups) {
      const long long share = nodes * group.num_nodes;
      if (gpus % per_node != 0 || share % network.num_nodes != 0 || share == 0) {
        throw InputError(name, "--gpus",
                         fmt::format("whole nodes of {} devices split in the proportions of the "
                                     "cluster's node groups",
                                     per_node),
                         std::to_string(gpus));
      }
      group.num_nodes = static_cast<int>(share / network.num_nodes);
      total += group.num_nodes;
    }
    out.network.num_nodes = total;
    return out;
  }
  Cluster out = *this;
  if (gpus < node.devices_per_node) {
    out.node.devices_per_node = gpus;
    out.network.num_nodes = 1;
  } else {
    if (gpus % node.devices_per_node != 0) {
      throw InputError(name, "--gpus",
                       fmt::format("a multiple of devices_per_node ({}) or fewer than one node",
                                   node.devices_per_node),
                       std::to_string(gpus));
    }
    out.network.num_nodes = gpus / node.devices_per_node;
  }
  if (out.groups.size() == 1) {
    out.groups.front().num_nodes = out.network.num_nodes;
    out.groups.front().node.devices_per_node = out.node.devices_per_node;
  }
  return out;
}

} // namespace parallax
