// Prediction intervals and ranking robustness (plan --uncertainty): the profile's uncertain
// inputs (Cluster::uncertainty: sustained compute rate, collective bandwidths, kernel
// overheads) drawn Monte-Carlo, each a log-normal factor with median 1, the same draw for
// every ranked plan (common random numbers, so the plans are compared on the same hardware),
// and every plan costed by the analytic model under each draw. A plan's interval is its point
// estimate times the 10th and 90th percentile of its step-time ratio to the undrawn model (so
// zero spread gives exactly the point estimate, simulated or analytic); p_best is the share
// of draws in which it has the shortest step. Deterministic for a seed.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/core/stack.hpp"

#include <cstdint>
#include <vector>

namespace parallax {

struct RankedPlan;

struct StepUncertainty {
  double p10_s = 0;
  double p90_s = 0;
  double p_best = 0;
};

// `cluster` with every compute rate times `gemm`, bandwidth times `bandwidth` and kernel
// overhead times `kernel` (one Monte-Carlo draw).
Cluster perturbed_cluster(const Cluster& cluster, double gemm, double bandwidth, double kernel);

// One entry per plan of `plans`, in order. samples >= 1.
std::vector<StepUncertainty> plan_uncertainty(const LayerGraph& graph, const Cluster& cluster,
                                              const Stack& stack,
                                              const std::vector<RankedPlan>& plans, int samples,
                                              std::uint64_t seed = 1);

} // namespace parallax
