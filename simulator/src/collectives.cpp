#include "parallax/simulator/collectives.hpp"

#include "parallax/core/error.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>

namespace parallax {

namespace {

constexpr double kDefaultIntraEfficiency = 0.70; // NVLink all-reduce bus bandwidth / link
constexpr double kDefaultInterEfficiency = 0.85; // InfiniBand / RoCE the same

double log2_ceil(int n) {
  return n <= 1 ? 0.0 : std::ceil(std::log2(static_cast<double>(n)));
}

double intra_bw(const Cluster& c) {
  return c.node.intra_bandwidth_gbps * 1e9 * intra_efficiency(c);
}

double nic_bw(const Cluster& c) {
  return c.network.inter_bandwidth_gbps * 1e9 * inter_efficiency(c) / c.network.oversubscription;
}

double alpha_intra(const Cluster& c) {
  return c.node.intra_latency_us * 1e-6;
}
double alpha_inter(const Cluster& c) {
  return c.network.inter_latency_us * 1e-6;
}

// The profile's measurement for a group inside one node: same size and stride, else same size.
const MeasuredCollective* measured_for(const Cluster& c, GroupSpan span) {
  if (span.nodes > 1) {
    return nullptr;
  }
  const MeasuredCollective* same_size = nullptr;
  for (const MeasuredCollective& m : c.node.measured_collectives) {
    if (m.group_size == span.size) {
      if (m.stride == span.stride) {
        return &m;
      }
      same_size = same_size != nullptr ? same_size : &m;
    }
  }
  return same_size;
}

// Bus bandwidth of a ring over the span: the slowest of the intra-node hops and the node's NICs.
double ring_bus_bw(const Cluster& c, GroupSpan span) {
  if (span.nodes <= 1) {
    const MeasuredCollective* m = measured_for(c, span);
    return m != nullptr ? m->bus_bandwidth_gbps * 1e9 : intra_bw(c);
  }
  const double network = span.per_node * nic_bw(c);
  return span.per_node > 1 ? std::min(intra_bw(c), network) : network;
}

CollectiveCost ring_cost(const Cluster& c, Collective kind, double bytes, GroupSpan span) {
  const int n = span.size;
  const double steps_intra = static_cast<double>(span.per_node - 1);
  const MeasuredCollective* measured = measured_for(c, span);
  const double a_intra = measured != nullptr ? measured->latency_us * 1e-6 : alpha_intra(c);
  double latency = 0;
  switch (kind) {
  case Collective::all_reduce:
    // Ring inside nodes, tree between nodes for the latency-bound part (NCCL picks trees at scale).
    latency = 2 * steps_intra * a_intra + 2 * log2_ceil(span.nodes) * alpha_inter(c);
    break;
  case Collective::reduce_scatter:
  case Collective::all_gather:
    // A ring of n ranks takes n − 1 steps in lock-step; each step waits for the slowest hop,
    // a network hop once the ring leaves the node.
    latency = static_cast<double>(n - 1) * (span.nodes > 1 ? alpha_inter(c) : a_intra);
    break;
  case Collective::broadcast:
    latency = steps_intra * a_intra + log2_ceil(span.nodes) * alpha_inter(c);
    break;
  case Collective::send_recv:
  case Collective::all_to_all:
    latency = span.nodes > 1 ? alpha_inter(c) : a_intra;
    break;
  }
  const bool network =
      span.nodes > 1 && (span.per_node == 1 || span.per_node * nic_bw(c) < intra_bw(c));
  return {latency, bus_factor(kind, n) * bytes / ring_bus_bw(c, span), network};
}

} // namespace

GroupSpan group_span(int size, int stride, int devices_per_node) {
  PARALLAX_CHECK(size >= 1 && stride >= 1 && devices_per_node >= 1, "bad group geometry");
  if (size == 1) {
    return {1, 1, 1, 1};
  }
  const int per_node = std::clamp(devices_per_node / stride, 1, size);
  return {size, per_node, (size + per_node - 1) / per_node, stride};
}

double bus_factor(Collective kind, int n) {
  if (n <= 1) {
    return kind == Collective::send_recv ? 1.0 : 0.0;
  }
  const double dn = n;
  switch (kind) {
  case Collective::all_reduce:
    return 2.0 * (dn - 1.0) / dn;
  case Collective::reduce_scatter:
  case Collective::all_gather:
  case Collective::all_to_all:
    return (dn - 1.0) / dn;
  case Collective::broadcast:
  case Collective::send_recv:
    return 1.0;
  }
  return 1.0;
}

double intra_efficiency(const Cluster& c) {
  return c.collectives.intra > 0 ? c.collectives.intra : kDefaultIntraEfficiency;
}

double inter_efficiency(const Cluster& c) {
  return c.collectives.inter > 0 ? c.collectives.inter : kDefaultInterEfficiency;
}

Collective collective_of(StepCollective c) {
  switch (c) {
  case StepCollective::reduce_scatter:
    return Collective::reduce_scatter;
  case StepCollective::all_gather:
    return Collective::all_gather;
  case StepCollective::broadcast:
    return Collective::broadcast;
  case StepCollective::all_reduce:
  case StepCollective::reduce_to_root:
  case StepCollective::none:
    break;
  }
  return Collective::all_reduce;
}

CollectiveCost collective_cost(const Cluster& c, Collective kind, double bytes, GroupSpan span,
                               GradSync algorithm) {
  if (bytes <= 0 || (span.size <= 1 && kind != Collective::send_recv)) {
    return {};
  }
  if (kind == Collective::all_to_all && span.nodes > 1) {
    // Every rank sends (n − 1)/n of its buffer at once: the parts for ranks on its node over the
    // node's links, the others through its NIC, both at the same time.
    const double n = span.size;
    const double on_node = bytes * (span.per_node - 1) / n;
    const double off_node = bytes * (n - span.per_node) / n;
    return {alpha_inter(c), std::max(on_node / intra_bw(c), off_node / nic_bw(c)), true};
  }
  if (kind != Collective::all_reduce || algorithm == GradSync::allreduce) {
    return ring_cost(c, kind, bytes, span);
  }
  const bool network = span.nodes > 1;
  switch (algorithm) {
  case GradSync::tree: {
    // Double binary tree: log-depth latency, the whole buffer up and down the trees.
    const double alpha = network ? alpha_inter(c) : alpha_intra(c);
    return {2 * log2_ceil(span.size) * alpha, 2.0 * bytes / ring_bus_bw(c, span), network};
  }
  case GradSync::hierarchical: {
    // Reduce-scatter inside the node, all-reduce of a 1/k shard across nodes, all-gather inside.
    GroupSpan local{span.per_node, span.per_node, 1, span.stride};
    GroupSpan across{span.nodes, 1, span.nodes, span.stride * span.per_node};
    const CollectiveCost rs = ring_cost(c, Collective::reduce_scatter, bytes, local);
    const CollectiveCost ar = ring_cost(c, Collective::all_reduce, bytes / span.per_node, across);
    const CollectiveCost ag = ring_cost(c, Collective::all_gather, bytes, local);
    return {rs.latency_s + ar.latency_s + ag.latency_s,
            rs.transfer_s + ar.transfer_s + ag.transfer_s, network};
  }
  case GradSync::parameter_server:
  case GradSync::parameter_server_async:
    // Push gradients to and pull parameters from servers sharded over all nodes: every worker
    // moves 2·S through its NIC (intra-node when the group fits in one node).
    return {2 * (network ? alpha_inter(c) : alpha_intra(c)),
            2.0 * bytes / (network ? nic_bw(c) : intra_bw(c)), network};
  case GradSync::allreduce:
    break;
  }
  return ring_cost(c, kind, bytes, span);
}

double collective_time_s(const Cluster& c, Collective kind, double bytes, GroupSpan span,
                         GradSync algorithm) {
  return collective_cost(c, kind, bytes, span, algorithm).total_s();
}

double intra_link_bandwidth(const Cluster& c) {
  return intra_bw(c);
}
double network_link_bandwidth(const Cluster& c) {
  return nic_bw(c);
}

GroupSpan tp_span(const Plan& p, const Cluster& c) {
  return group_span(p.tp, 1, c.node.devices_per_node);
}

GroupSpan ranks_span(const std::vector<int>& ranks, int devices_per_node) {
  PARALLAX_CHECK(!ranks.empty() && devices_per_node >= 1, "bad group geometry");
  if (ranks.size() == 1) {
    return {1, 1, 1, 1};
  }
  std::map<int, int> per_node;
  int stride = std::numeric_limits<int>::max();
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    ++per_node[ranks[i] / devices_per_node];
    if (i > 0) {
      stride = std::min(stride, std::abs(ranks[i] - ranks[i - 1]));
    }
  }
  int most = 0;
  for (const auto& [node, count] : per_node) {
    most = std::max(most, count);
  }
  return {static_cast<int>(ranks.size()), most, static_cast<int>(per_node.size()), stride};
}

GroupSpan dp_span(const Plan& p, const Cluster& c) {
  // The dp·cp ranks are contiguous at stride t (cp fastest after tp).
  return group_span(p.dp_cp(), p.tp, c.node.devices_per_node);
}

GroupSpan cp_span(const Plan& p, const Cluster& c) {
  return group_span(p.cp, p.tp, c.node.devices_per_node);
}

GroupSpan ep_span(const Plan& p, const Cluster& c) {
  // Consecutive dp·cp ranks (stride tp), or consecutive ranks with whole experts per TP rank.
  return group_span(p.ep, p.expert_tp() == p.tp ? p.tp : 1, c.node.devices_per_node);
}

GroupSpan expert_dp_span(const Plan& p, const Cluster& c) {
  return ranks_span(expert_dp_group(p, 0), c.node.devices_per_node);
}

CollectiveCost data_parallel_cost(const Cluster& cluster, const Plan& plan, Collective kind,
                                  double bytes, double expert_bytes, GradSync algorithm) {
  if (is_parameter_server(algorithm) && plan.parameter_servers > 0) {
    // Dedicated servers, each a process with one NIC on a host outside the workers' nodes:
    // a worker pushes its gradients (S) and pulls the parameters (S) through its own NIC while
    // each server takes in dp/N pushes of S/N and sends as many pulls, so the slower side of
    // each phase sets it (the in-cast of dp workers on N servers once N < dp).
    const double incast = std::max(1.0, static_cast<double>(plan.dp_cp()) / plan.parameter_servers);
    return {2 * alpha_inter(cluster), 2.0 * bytes * incast / nic_bw(cluster), true};
  }
  if (plan.ep <= 1 || expert_bytes <= 0) {
    return collective_cost(cluster, kind, bytes, dp_span(plan, cluster), algorithm);
  }
  const CollectiveCost dense =
      collective_cost(cluster, kind, bytes - expert_bytes, dp_span(plan, cluster), algorithm);
  const CollectiveCost experts =
      collective_cost(cluster, kind, expert_bytes, expert_dp_span(plan, cluster), algorithm);
  return {dense.latency_s + experts.latency_s, dense.transfer_s + experts.transfer_s,
          dense.network || experts.network};
}

GroupSpan pp_hop_span(const Plan& p, const Cluster& c) {
  const int stride = p.tp * p.cp * p.dp;
  return stride < c.node.devices_per_node ? GroupSpan{2, 2, 1, stride} : GroupSpan{2, 1, 2, stride};
}

} // namespace parallax
