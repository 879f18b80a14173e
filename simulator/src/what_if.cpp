#include "parallax/simulator/what_if.hpp"

#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <vector>

namespace parallax {

namespace {

// "INDEX:FACTOR" with a whole index >= 0 and a finite factor > 0.
std::pair<int, double> index_factor(const std::string& text, const std::string& flag,
                                    const char* index_name) {
  const std::string expected = fmt::format("{}:FACTOR ({} an integer >= 0, FACTOR a number > 0, "
                                           "e.g. 3:1.5)",
                                           index_name, index_name);
  const auto colon = text.find(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
    throw InputError("command line", flag, expected, "\"" + text + "\"");
  }
  const std::string idx = text.substr(0, colon);
  const std::string fac = text.substr(colon + 1);
  char* end = nullptr;
  const long index = std::strtol(idx.c_str(), &end, 10);
  if (*end != '\0' || index < 0 || index > (1 << 24)) {
    throw InputError("command line", flag, expected, "\"" + text + "\"");
  }
  const double factor = std::strtod(fac.c_str(), &end);
  if (*end != '\0' || !std::isfinite(factor) || !(factor > 0)) {
    throw InputError("command line", flag, expected, "\"" + text + "\"");
  }
  return {static_cast<int>(index), factor};
}

Device slowed(Device d, double factor) {
  for (auto& [p, tflops] : d.peak_tflops) {
    tflops /= factor;
  }
  d.memory_bandwidth_gbps /= factor;
  d.name += fmt::format(" ({:g}x slower)", factor);
  return d;
}

} // namespace

Degradation parse_straggler(const std::string& text, const std::string& flag) {
  const auto [rank, factor] = index_factor(text, flag, "RANK");
  return {.straggler_rank = rank, .straggler_factor = factor};
}

Degradation parse_slow_link(const std::string& text, const std::string& flag) {
  const auto [node, factor] = index_factor(text, flag, "NODE");
  return {.slow_node = node, .link_factor = factor};
}

Cluster degraded_cluster(const Cluster& healthy, const Degradation& d) {
  Cluster out = healthy;
  if (d.straggler_rank >= 0) {
    if (d.straggler_rank >= healthy.num_devices()) {
      throw InputError("command line", "--straggler",
                       fmt::format("a rank below the plan's {} GPUs", healthy.num_devices()),
                       std::to_string(d.straggler_rank));
    }
    // Per node: its group's (device, node, name); the straggler's node slowed; then
    // consecutive equal nodes merged back into groups.
    const int nodes = healthy.network.num_nodes;
    const int slow = d.straggler_rank / healthy.node.devices_per_node;
    std::vector<NodeGroup> merged;
    for (int n = 0; n < nodes; ++n) {
      const Cluster view = healthy.group_view(healthy.group_of_node(n));
      NodeGroup g{.name =
                      healthy.groups.empty()
                          ? std::string("nodes")
                          : healthy.groups[static_cast<std::size_t>(healthy.group_of_node(n))].name,
                  .num_nodes = 1,
                  .device = view.device,
                  .node = view.node};
      if (n == slow) {
        g.device = slowed(g.device, d.straggler_factor);
        g.name = fmt::format("straggler node {}", n);
      }
      if (!merged.empty() && merged.back().name == g.name && merged.back().device == g.device) {
        ++merged.back().num_nodes;
      } else {
        merged.push_back(std::move(g));
      }
    }
    out.groups = merged.size() > 1 ? merged : std::vector<NodeGroup>{};
    if (merged.size() == 1) {
      out.device = merged.front().device;
    }
  }
  if (d.slow_node >= 0) {
    if (d.slow_node >= healthy.network.num_nodes) {
      throw InputError("command line", "--slow-link",
                       fmt::format("a node below the cluster's {}", healthy.network.num_nodes),
                       std::to_string(d.slow_node));
    }
    out.network.inter_bandwidth_gbps /= d.link_factor;
  }
  return out;
}

std::string degradation_label(const Degradation& d) {
  std::string out;
  if (d.straggler_rank >= 0) {
    out += fmt::format("rank {} {:g}x slower", d.straggler_rank, d.straggler_factor);
  }
  if (d.slow_node >= 0) {
    out += fmt::format("{}node {}'s link {:g}x slower", out.empty() ? "" : ", ", d.slow_node,
                       d.link_factor);
  }
  return out;
}

} // namespace parallax
