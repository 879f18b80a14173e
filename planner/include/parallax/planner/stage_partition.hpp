// Pipeline stage partitioning: split a chain of units into contiguous chunks minimising the
// slowest chunk (the linear-partition problem), so uneven graphs — a heavy embedding in the
// first unit, LM head and loss in the last — get balanced stages instead of equal layer counts.
#pragma once

#include "parallax/core/plan.hpp"

#include <vector>

namespace parallax {

// Exact min-max partition of non-negative `weights` into `chunks` non-empty contiguous ranges,
// by dynamic programming over prefix sums with the best last cut found by bisection
// (O(chunks · n · log n), n = units). Ties prefer earlier cut points.
std::vector<StageRange> partition_min_max(const std::vector<double>& weights, int chunks);
// The same with chunk k's weight scaled by chunk_scale[k] (> 0): a stage on a device twice as
// fast has scale 0.5 and takes about twice the work (heterogeneous clusters).
std::vector<StageRange> partition_min_max(const std::vector<double>& weights, int chunks,
                                          const std::vector<double>& chunk_scale);

// The weight of the heaviest range.
double partition_max_weight(const std::vector<double>& weights,
                            const std::vector<StageRange>& ranges);

} // namespace parallax
