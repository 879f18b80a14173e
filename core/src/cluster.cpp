#include "parallax/core/cluster.hpp"

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"

#include <fmt/format.h>

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

double Cluster::memory_bytes() const {
  return device.memory_gib * 1024.0 * 1024.0 * 1024.0;
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

Cluster Cluster::with_devices(int gpus) const {
  if (gpus < 1) {
    throw InputError(name, "--gpus", "a device count >= 1", std::to_string(gpus));
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
  return out;
}

} // namespace parallax
