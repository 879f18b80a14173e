// The plots of the HTML report, each a standalone SVG: candidate plans (throughput against
// memory per GPU, Pareto front marked), the memory breakdown of one plan, and simulated against
// measured step time per plan with both breakdowns.
#pragma once

#include "parallax/core/plan.hpp"
#include "parallax/simulator/estimate.hpp"

#include <optional>
#include <string>
#include <vector>

namespace parallax::viz {

struct CandidatePoint {
  double tokens_per_s = 0;
  double memory_bytes = 0; // per GPU, most loaded rank
  int rank_in_table = -1;  // 1-based position in the ranked table, -1 when not listed
  bool chosen = false;
};

// Indices of the points no other point beats on both axes (more throughput with no more memory,
// or less memory with no less throughput), sorted by memory.
std::vector<std::size_t> pareto_front(const std::vector<CandidatePoint>& points);

// At most `max_points` points are drawn: the Pareto front, the listed and chosen plans, and an
// even sample of the rest (the caption says how many were sampled).
std::string candidates_scatter_svg(const std::vector<CandidatePoint>& points,
                                   double memory_capacity_bytes, std::size_t max_points = 2500);

std::string memory_breakdown_svg(const MemoryBreakdown& memory, double memory_capacity_bytes);

// One step-program op of a compared plan on one rank: its simulated and measured seconds
// (measured: the median over the timed steps); absent where that side has no such op.
struct ComparedOp {
  int rank = 0;
  std::string name;
  std::string category;
  std::optional<double> simulated_s;
  std::optional<double> measured_s;
};

struct ComparedPlan {
  Plan plan;
  std::vector<ComparedOp> ops;
  double measured_step_s = 0;
  double simulated_step_s = 0;
  double measured_peak_memory_bytes = 0;
  double simulated_peak_memory_bytes = 0;
  TimeBreakdown measured;
  TimeBreakdown simulated;
};

// Two stacked bars per plan (measured, simulated), split by category, with the error.
std::string compare_bars_svg(const std::vector<ComparedPlan>& plans);

// Histogram of the per-op errors (simulated / measured − 1) over every plan's ops with both
// times, one bar colour per op category.
std::string op_error_histogram_svg(const std::vector<ComparedPlan>& plans);

} // namespace parallax::viz
