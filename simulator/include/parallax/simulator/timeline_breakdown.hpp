// Where an iteration's time went, read off a Timeline — simulated or measured alike, so the
// two breakdowns `parallax compare` sets side by side are computed by one function — and the
// statistics that score predictions against measurements.
#pragma once

#include "parallax/core/timeline.hpp"
#include "parallax/simulator/estimate.hpp"

#include <array>
#include <utility>
#include <vector>

namespace parallax {

using Spans = std::vector<std::pair<double, double>>;

// Attributes every instant of [0, end) of one rank to one category: a tensor-parallel
// collective (it blocks the compute that issued it), else compute (forward, backward,
// recomputation), else the optimizer, else the communication keeping it waiting (PP, then DP),
// else bubble.
// Time during which a span of `a` and a span of `b` both run; each list is in time order and
// its spans do not overlap one another (one stream's tasks).
double spans_overlap_s(const Spans& a, const Spans& b);

TimeBreakdown sweep_breakdown(const Spans& compute, const Spans& optimizer,
                              const std::array<Spans, 3>& comm, double end);

// The breakdown of the rank busiest on compute (the critical pipeline stage) over the
// timeline's makespan.
TimeBreakdown timeline_breakdown(const Timeline& timeline);

// Mean absolute percentage error of `predicted` against `measured` (as a fraction, 0.05 = 5%).
double mean_absolute_percentage_error(const std::vector<double>& measured,
                                      const std::vector<double>& predicted);

// Kendall's tau-b rank correlation of two equally long series (1: same order, −1: reversed);
// ties count as neither concordant nor discordant. Needs at least two values.
double kendall_tau(const std::vector<double>& a, const std::vector<double>& b);

} // namespace parallax
