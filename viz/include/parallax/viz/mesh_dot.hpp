// The device mesh of a plan as Graphviz DOT: cluster nodes as boxes with their GPUs inside,
// each GPU labelled with its rank, (dp, pp, tp) coordinates and the stage it runs, coloured by
// stage; tensor-parallel groups as bold orange lines, pipeline hops as blue arrows, data-parallel
// rings as dashed green lines.
//
// Thousands of GPUs fold: each tensor-parallel group becomes one box, and the data-parallel
// replicas between the first and the last become one node per stage with a count. Folding is
// automatic above `fold_above` ranks unless `expand` is set.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/plan.hpp"

#include <string>

namespace parallax::viz {

struct MeshDotOptions {
  bool expand = false;
  int fold_above = 64;
};

std::string mesh_dot(const Plan& plan, const Cluster& cluster, const MeshDotOptions& options = {});

} // namespace parallax::viz
