#include "parallax/planner/stage_partition.hpp"

#include "parallax/core/error.hpp"

#include <algorithm>
#include <limits>

namespace parallax {

std::vector<StageRange> partition_min_max(const std::vector<double>& weights, int chunks) {
  const int n = static_cast<int>(weights.size());
  PARALLAX_CHECK(chunks >= 1 && chunks <= n, "need between 1 and n chunks");
  std::vector<double> prefix(static_cast<std::size_t>(n) + 1, 0.0);
  for (int i = 0; i < n; ++i) {
    prefix[i + 1] = prefix[i] + weights[i];
  }
  auto sum = [&](int a, int b) { return prefix[b] - prefix[a]; };
  constexpr double kInf = std::numeric_limits<double>::infinity();
  // best[k][i]: the smallest possible maximum when the first i units form k chunks.
  std::vector<std::vector<double>> best(chunks + 1, std::vector<double>(n + 1, kInf));
  std::vector<std::vector<int>> cut(chunks + 1, std::vector<int>(n + 1, 0));
  best[0][0] = 0.0;
  for (int k = 1; k <= chunks; ++k) {
    for (int i = k; i <= n - (chunks - k); ++i) {
      for (int j = k - 1; j < i; ++j) {
        const double candidate = std::max(best[k - 1][j], sum(j, i));
        if (candidate < best[k][i] - 1e-15 * std::abs(candidate)) {
          best[k][i] = candidate;
          cut[k][i] = j;
        }
      }
    }
  }
  std::vector<StageRange> out(static_cast<std::size_t>(chunks));
  int end = n;
  for (int k = chunks; k >= 1; --k) {
    const int start = cut[k][end];
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
