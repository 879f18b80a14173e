#include "parallax/planner/uncertainty.hpp"

#include "parallax/core/error.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/simulator/compute_model.hpp"
#include "parallax/simulator/cost_model.hpp"

#include <algorithm>
#include <cmath>
#include <random>

namespace parallax {

namespace {

void scale_device(Device& d, double gemm, double kernel) {
  for (auto& [p, tflops] : d.peak_tflops) {
    tflops *= gemm;
  }
  d.kernel_overhead_us = kernel_overhead_s(d) * 1e6 * kernel;
}

void scale_node(Node& n, double bandwidth) {
  n.intra_bandwidth_gbps *= bandwidth;
  for (MeasuredCollective& m : n.measured_collectives) {
    m.bus_bandwidth_gbps *= bandwidth;
  }
}

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double at = q * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(at));
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (at - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

} // namespace

Cluster perturbed_cluster(const Cluster& cluster, double gemm, double bandwidth, double kernel) {
  Cluster out = cluster;
  scale_device(out.device, gemm, kernel);
  scale_node(out.node, bandwidth);
  for (NodeGroup& g : out.groups) {
    scale_device(g.device, gemm, kernel);
    scale_node(g.node, bandwidth);
  }
  out.network.inter_bandwidth_gbps *= bandwidth;
  return out;
}

std::vector<StepUncertainty> plan_uncertainty(const LayerGraph& graph, const Cluster& cluster,
                                              const Stack& stack,
                                              const std::vector<RankedPlan>& plans, int samples,
                                              std::uint64_t seed) {
  PARALLAX_CHECK(samples >= 1, "uncertainty: at least one sample");
  const Uncertainty& u = cluster.uncertainty;
  // The undrawn analytic step of every plan: the reference of its ratios.
  const auto analytic = [&](const Cluster& c, const RankedPlan& p) {
    const Cluster sized = c.with_devices(p.gpus);
    CostModel model(graph, sized, stack);
    return model.estimate(p.estimate.plan).iteration_time_s;
  };
  std::vector<double> nominal;
  for (const RankedPlan& p : plans) {
    nominal.push_back(analytic(cluster, p));
  }
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> z(0.0, 1.0);
  std::vector<std::vector<double>> steps(plans.size());
  std::vector<int> wins(plans.size(), 0);
  for (int s = 0; s < samples; ++s) {
    const double gemm = std::exp(u.gemm_efficiency * z(rng));
    const double bandwidth = std::exp(u.bandwidth * z(rng));
    const double kernel = std::exp(u.kernel_overhead * z(rng));
    const Cluster drawn = perturbed_cluster(cluster, gemm, bandwidth, kernel);
    std::size_t best = 0;
    for (std::size_t i = 0; i < plans.size(); ++i) {
      const double step =
          plans[i].estimate.iteration_time_s * analytic(drawn, plans[i]) / nominal[i];
      steps[i].push_back(step);
      if (step < steps[best].back()) {
        best = i;
      }
    }
    if (!plans.empty()) {
      ++wins[best];
    }
  }
  std::vector<StepUncertainty> out;
  for (std::size_t i = 0; i < plans.size(); ++i) {
    out.push_back({.p10_s = quantile(steps[i], 0.10),
                   .p90_s = quantile(steps[i], 0.90),
                   .p_best = static_cast<double>(wins[i]) / samples});
  }
  return out;
}

} // namespace parallax
