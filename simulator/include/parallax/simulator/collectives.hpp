// Collective communication times over the cluster's hierarchy.
//
// Algorithm bandwidth S/t and bus bandwidth are related once, here (nccl-tests convention):
//   all-reduce     busbw = algbw · 2(n−1)/n
//   reduce-scatter busbw = algbw · (n−1)/n      all-gather the same
//   broadcast, send/recv busbw = algbw
// A collective over n ranks of S bytes takes latency + bus_factor · S / bus_bandwidth, where the
// bus bandwidth is the slowest link the ring crosses: NVLink-class links inside a node, and for
// groups spanning nodes the NICs of the group's k members in a node (NCCL spreads its rings
// over all of them, so a node contributes k·NIC bandwidth), divided by the oversubscription.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/plan.hpp"
#include "parallax/core/step_program.hpp"

namespace parallax {

// all_to_all: each of n ranks sends its S-byte buffer in n equal parts, one to every rank (MoE
// token dispatch and combine).
enum class Collective { all_reduce, reduce_scatter, all_gather, broadcast, send_recv, all_to_all };

// The collective a step-program op runs, as costed here: a reduction to a parameter server is
// costed as the all-reduce it replaces (collective_cost with GradSync::parameter_server: the
// push and the pull together). Only for ops with a collective.
Collective collective_of(StepCollective c);

// Where a group's members sit: `size` ranks, `per_node` of them in each of `nodes` nodes.
struct GroupSpan {
  int size = 1;
  int per_node = 1;
  int nodes = 1;
  int stride = 1; // ranks between consecutive members
  bool operator==(const GroupSpan&) const = default;
};

// The span of a group whose members are `stride` ranks apart (TP: 1; DP: t; PP: t·cp·d).
GroupSpan group_span(int size, int stride, int devices_per_node);
// The span of the group of `ranks` (any layout): the most members on one node, the nodes they
// occupy, the smallest gap between consecutive members.
GroupSpan ranks_span(const std::vector<int>& ranks, int devices_per_node);

// The bus factor above: 2(n−1)/n, (n−1)/n or 1.
double bus_factor(Collective kind, int n);

// Default fractions of link bandwidth NCCL-class libraries attain (bus bandwidth / link
// bandwidth); profiles override them in "collectives".
double intra_efficiency(const Cluster& cluster);
double inter_efficiency(const Cluster& cluster);

// A collective's time split into its latency part and its bandwidth part, with the link the
// bandwidth part is bound by (the discrete-event simulator shares that link between flows).
struct CollectiveCost {
  double latency_s = 0;
  double transfer_s = 0;
  bool network = false; // bound by the node's NICs (else by intra-node links)
  double total_s() const { return latency_s + transfer_s; }
};

CollectiveCost collective_cost(const Cluster& cluster, Collective kind, double bytes,
                               GroupSpan span, GradSync algorithm = GradSync::allreduce);

// Bandwidth of the per-device links the simulator models: intra-node (NVLink-class) and the
// device's share of the node's NICs, each at the attained collective efficiency.
double intra_link_bandwidth(const Cluster& cluster);
double network_link_bandwidth(const Cluster& cluster);

// The spans of a plan's groups: TP (adjacent ranks), the dp·cp ranks reducing gradients
// (stride t), CP (stride t) and one pipeline hop (stride t·cp·d).
GroupSpan tp_span(const Plan& plan, const Cluster& cluster);
GroupSpan dp_span(const Plan& plan, const Cluster& cluster);
GroupSpan cp_span(const Plan& plan, const Cluster& cluster);
// Expert parallelism: the ep ranks of one data-parallel group that split the experts
// (neighbours in the data-parallel order), and the dp·cp / ep ranks holding the same experts.
GroupSpan ep_span(const Plan& p, const Cluster& c);
GroupSpan expert_dp_span(const Plan& p, const Cluster& c);

// A data-parallel collective over `bytes` of a rank's parameters (or gradients), of which
// `expert_bytes` are routed experts': the rest over the data-parallel group, the experts' part
// over the expert-data-parallel group (the two run one after the other).
CollectiveCost data_parallel_cost(const Cluster& cluster, const Plan& plan, Collective kind,
                                  double bytes, double expert_bytes,
                                  GradSync algorithm = GradSync::allreduce);
GroupSpan pp_hop_span(const Plan& plan, const Cluster& cluster);

// Time of one collective of `bytes` (the full buffer: the all-reduced tensor, or the gathered
// result of an all-gather / the input of a reduce-scatter). `algorithm` selects the all-reduce
// algorithm for data-parallel gradient synchronisation.
double collective_time_s(const Cluster& cluster, Collective kind, double bytes, GroupSpan span,
                         GradSync algorithm = GradSync::allreduce);

} // namespace parallax
