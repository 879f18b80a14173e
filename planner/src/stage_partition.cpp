#include "parallax/planner/stage_partition.hpp"

#include "parallax/core/error.hpp"

#include <algorithm>
#include <limits>

namespace parallax {

std::vector<StageRange> partition_min_max(const std::vector<double>& weights, int chunks) {
  return partition_min_max(weights, chunks,
                           std::vector<double>(static_cast<std::size_t>(chunks), 1.0));
}

std::vector<StageRange> partition_min_max(const std::vector<double>& weights, int chunks,
                                          const std::vector<double>& chunk_scale) {
  const int n = static_cast<int>(weights.size());
  PARALLAX_CHECK(chunks >= 1 && chunks <= n, "need between 1 and n chunks");
  PARALLAX_CHECK(static_cast<int>(chunk_scale.size()) == chunks, "one scale per chunk");
  std::vector<double> prefix(static_cast<std::size_t>(n) + 1, 0.0);
  for (int i = 0; i < n; ++i) {
    prefix[i + 1] = prefix[i] + weights[i];
  }
  auto sum = [&](int a, int b) { return prefix[b] - prefix[a]; };
  auto scale = [&](int k) { return chunk_scale[static_cast<std::size_t>(k - 1)]; };
  constexpr double kInf = std::numeric_limits<double>::infinity();
  constexpr double kTie = 1e-15; // relative: values this close count as equal
  // best(k, i): the smallest possible maximum when the first i units form k chunks; cut(k, i):
  // where the last of those chunks starts.
  const auto width = static_cast<std::size_t>(n) + 1;
  std::vector<double> best(static_cast<std::size_t>(chunks + 1) * width, kInf);
  std::vector<int> cut(best.size(), 0);
  auto at = [width](int k, int i) {
    return static_cast<std::size_t>(k) * width + static_cast<std::size_t>(i);
  };
  best[at(0, 0)] = 0.0;
  for (int k = 1; k <= chunks; ++k) {
    for (int i = k; i <= n - (chunks - k); ++i) {
      // The cost of cutting at j is max(A(j), B(j)) with A(j) = best(k − 1, j) non-decreasing
      // and B(j) = sum(j, i) non-increasing in j (weights are non-negative), so it falls and
      // then rises: find where A catches up with B by bisection instead of trying every j.
      int lo = k - 1;
      int hi = i; // first j in [k − 1, i) with A(j) >= B(j), or i if there is none
      while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (best[at(k - 1, mid)] >= scale(k) * sum(mid, i)) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      auto cost = [&](int j) { return std::max(best[at(k - 1, j)], scale(k) * sum(j, i)); };
      int j = hi < i ? hi : i - 1;
      if (hi > k - 1 && cost(hi - 1) <= cost(j)) {
        j = hi - 1;
      }
      // Ties prefer the earliest cut with (nearly) the optimum, as a scan from the left would.
      const double value = cost(j);
      while (j > k - 1 && cost(j - 1) <= value + kTie * std::abs(value)) {
        --j;
      }
      best[at(k, i)] = cost(j);
      cut[at(k, i)] = j;
    }
  }
  std::vector<StageRange> out(static_cast<std::size_t>(chunks));
  int end = n;
  for (int k = chunks; k >= 1; --k) {
    const int start = cut[at(k, end)];
    out[static_cast<std::size_t>(k - 1)] = {start, end};
    end = start;
  }
  return out;
}

double partition_max_weight(const std::vector<double>& weights,
                            const std::vector<StageRange>& ranges) {
  double worst = 0;
  for (const auto& [first, last] : ranges) {
    double s = 0;
    for (int i = first; i < last; ++i) {
      s += weights[static_cast<std::size_t>(i)];
    }
    worst = std::max(worst, s);
  }
  return worst;
}

} // namespace parallax
