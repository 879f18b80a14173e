// What-ifs for the simulator (simulate --straggler RANK:FACTOR, --slow-link NODE:FACTOR): the
// cluster with one device or one node's network link slower, for running a healthy plan on.
//
// A synchronous step waits for its slowest rank: a tensor-parallel group for its slowest
// member, a data-parallel reduction for its slowest replica, a pipeline for its slowest
// stage. So a straggler GPU is modelled as its node running FACTOR× slower (every FLOP/s and
// byte/s of its devices divided by FACTOR, as a node group of its own): the step time is the
// same as with one slow GPU in it. A slow link divides the inter-node bandwidth of every
// collective by FACTOR: a ring or tree over the nodes runs at its slowest link, and the cost
// model does not place groups on particular nodes, so each inter-node group is taken to
// include it (exact for data-parallel groups spanning every node, an upper bound otherwise).
#pragma once

#include "parallax/core/cluster.hpp"

#include <string>

namespace parallax {

struct Degradation {
  int straggler_rank = -1; // -1: none
  double straggler_factor = 1.0;
  int slow_node = -1; // -1: none
  double link_factor = 1.0;
  bool any() const { return straggler_rank >= 0 || slow_node >= 0; }
};

// "RANK:FACTOR" / "NODE:FACTOR" (FACTOR > 0, finite; the index an integer >= 0); InputError
// naming `flag` otherwise.
Degradation parse_straggler(const std::string& text, const std::string& flag);
Degradation parse_slow_link(const std::string& text, const std::string& flag);

// `healthy` with `d` applied; InputError when the rank or node is outside the cluster.
Cluster degraded_cluster(const Cluster& healthy, const Degradation& d);

// "rank 3 1.5× slower", "node 0's link 4× slower", joined.
std::string degradation_label(const Degradation& d);

} // namespace parallax
