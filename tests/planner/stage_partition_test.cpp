#include "parallax/core/error.hpp"
#include "parallax/planner/stage_partition.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

namespace parallax {
namespace {

double range_sum(const std::vector<double>& w, int first, int last) {
  double s = 0;
  for (int i = first; i < last; ++i) {
    s += w[static_cast<std::size_t>(i)];
  }
  return s;
}

// The optimum over every placement of chunks − 1 cut points (each of the C(n−1, chunks−1)
// ways), by recursion.
double brute_force_min_max(const std::vector<double>& w, int first, int chunks) {
  const int n = static_cast<int>(w.size());
  if (chunks == 1) {
    return range_sum(w, first, n);
  }
  double best = std::numeric_limits<double>::infinity();
  for (int cut = first + 1; cut <= n - (chunks - 1); ++cut) {
    best = std::min(best, std::max(range_sum(w, first, cut), brute_force_min_max(w, cut, chunks - 1)));
  }
  return best;
}

// The plain O(chunks · n²) dynamic programme: every last cut tried, earliest kept on ties.
std::vector<StageRange> reference_partition(const std::vector<double>& w, int chunks) {
  const int n = static_cast<int>(w.size());
  std::vector<double> prefix(static_cast<std::size_t>(n) + 1, 0.0);
  for (int i = 0; i < n; ++i) {
    prefix[static_cast<std::size_t>(i) + 1] = prefix[static_cast<std::size_t>(i)] + w[static_cast<std::size_t>(i)];
  }
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(static_cast<std::size_t>(chunks) + 1,
                                        std::vector<double>(static_cast<std::size_t>(n) + 1, inf));
  std::vector<std::vector<int>> cut(best.size(), std::vector<int>(static_cast<std::size_t>(n) + 1, 0));
  best[0][0] = 0;
  for (int k = 1; k <= chunks; ++k) {
    for (int i = k; i <= n - (chunks - k); ++i) {
      for (int j = k - 1; j < i; ++j) {
        const double c = std::max(best[k - 1][j], prefix[i] - prefix[j]);
        if (c < best[k][i] - 1e-15 * std::abs(c)) {
          best[k][i] = c;
          cut[k][i] = j;
        }
      }
    }
  }
  std::vector<StageRange> out(static_cast<std::size_t>(chunks));
  for (int k = chunks, end = n; k >= 1; --k) {
    out[static_cast<std::size_t>(k) - 1] = {cut[k][end], end};
    end = cut[k][end];
  }
  return out;
}

void expect_valid_partition(const std::vector<StageRange>& ranges, int n, int chunks) {
  ASSERT_EQ(static_cast<int>(ranges.size()), chunks);
  int expected_first = 0;
  for (const auto& [first, last] : ranges) {
    EXPECT_EQ(first, expected_first); // contiguous, starting at 0
    EXPECT_LT(first, last);           // non-empty
    expected_first = last;
  }
  EXPECT_EQ(expected_first, n); // covers every unit
}

TEST(PartitionMinMax, HeavyEndsGetTheirOwnStages) {
  const std::vector<double> w = {5, 1, 1, 1, 1, 5};
  const auto ranges = partition_min_max(w, 3);
  expect_valid_partition(ranges, 6, 3);
  // Only this partition reaches the lower bound of 5 (any stage with a 5 and anything else
  // weighs at least 6).
  EXPECT_EQ(ranges, (std::vector<StageRange>{{0, 1}, {1, 5}, {5, 6}}));
  EXPECT_DOUBLE_EQ(partition_max_weight(w, ranges), 5.0);
  EXPECT_DOUBLE_EQ(brute_force_min_max(w, 0, 3), 5.0);
}

TEST(PartitionMinMax, ClassicLinearPartition) {
  const std::vector<double> w = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  const auto ranges = partition_min_max(w, 3);
  expect_valid_partition(ranges, 9, 3);
  // {1..5} = 15, {6, 7} = 13, {8, 9} = 17: no split of the 45 does better than 17.
  EXPECT_DOUBLE_EQ(partition_max_weight(w, ranges), 17.0);
  EXPECT_DOUBLE_EQ(brute_force_min_max(w, 0, 3), 17.0);
  EXPECT_EQ(ranges.back(), (StageRange{7, 9}));
}

TEST(PartitionMinMax, UniformWeightsSplitEvenly) {
  const std::vector<double> w(12, 2.5);
  for (int chunks : {1, 2, 3, 4, 6, 12}) {
    const auto ranges = partition_min_max(w, chunks);
    expect_valid_partition(ranges, 12, chunks);
    for (const auto& [first, last] : ranges) {
      EXPECT_EQ(last - first, 12 / chunks) << chunks;
    }
  }
}

TEST(PartitionMinMax, OneChunkAndOneUnitPerChunk) {
  const std::vector<double> w = {3, 1, 4, 1, 5};
  EXPECT_EQ(partition_min_max(w, 1), (std::vector<StageRange>{{0, 5}}));
  EXPECT_EQ(partition_min_max(w, 5),
            (std::vector<StageRange>{{0, 1}, {1, 2}, {2, 3}, {3, 4}, {4, 5}}));
  EXPECT_DOUBLE_EQ(partition_max_weight(w, partition_min_max(w, 5)), 5.0);
  EXPECT_DOUBLE_EQ(partition_max_weight(w, partition_min_max(w, 1)), 14.0);
}

TEST(PartitionMinMax, TiesPreferEarlierCuts) {
  // Cutting after unit 1, 2 or 3 all give a maximum of 2.
  EXPECT_EQ(partition_min_max({2, 0, 0, 2}, 2), (std::vector<StageRange>{{0, 1}, {1, 4}}));
}

TEST(PartitionMinMax, BisectionAgreesWithTheFullScan) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 400; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 60);
    const int chunks = 1 + static_cast<int>(rng() % static_cast<unsigned>(n));
    std::vector<double> w(static_cast<std::size_t>(n));
    for (double& x : w) {
      // Small integers (many ties and zeros) or spread-out reals.
      x = trial % 2 == 0 ? static_cast<double>(rng() % 4)
                         : std::ldexp(static_cast<double>(rng() % 1000 + 1), -static_cast<int>(rng() % 20));
    }
    SCOPED_TRACE(::testing::Message() << "n " << n << " chunks " << chunks << " trial " << trial);
    EXPECT_EQ(partition_min_max(w, chunks), reference_partition(w, chunks));
  }
}

TEST(PartitionMinMax, ZeroWeightsStillGiveNonEmptyRanges) {
  const std::vector<double> w(7, 0.0);
  for (int chunks = 1; chunks <= 7; ++chunks) {
    expect_valid_partition(partition_min_max(w, chunks), 7, chunks);
  }
}

TEST(PartitionMinMax, RejectsImpossibleChunkCounts) {
  EXPECT_THROW(partition_min_max({1, 2, 3}, 0), CheckError);
  EXPECT_THROW(partition_min_max({1, 2, 3}, 4), CheckError);
  EXPECT_THROW(partition_min_max({}, 1), CheckError);
}

TEST(PartitionMaxWeight, HeaviestRange) {
  const std::vector<double> w = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(partition_max_weight(w, {{0, 3}, {3, 4}}), 6.0);
  EXPECT_DOUBLE_EQ(partition_max_weight(w, {{0, 1}, {1, 4}}), 9.0);
  EXPECT_DOUBLE_EQ(partition_max_weight(w, {{0, 4}}), 10.0);
}

TEST(PartitionMinMax, MatchesBruteForceOnRandomChains) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> n_dist(1, 11);
  std::uniform_int_distribution<int> small(0, 6);
  std::uniform_real_distribution<double> real(0.0, 10.0);
  for (int iter = 0; iter < 500; ++iter) {
    const int n = n_dist(rng);
    const int chunks = std::uniform_int_distribution<int>(1, n)(rng);
    std::vector<double> w(static_cast<std::size_t>(n));
    const bool integer = iter % 2 == 0; // integers (with zeros) make ties common
    for (double& x : w) {
      x = integer ? small(rng) : real(rng);
    }
    // Now and then a heavy unit, like an embedding or an LM head.
    if (iter % 5 == 0) {
      w[static_cast<std::size_t>(std::uniform_int_distribution<int>(0, n - 1)(rng))] += 40;
    }
    SCOPED_TRACE(testing::Message() << "n=" << n << " chunks=" << chunks << " iter=" << iter);
    const auto ranges = partition_min_max(w, chunks);
    expect_valid_partition(ranges, n, chunks);
    const double best = brute_force_min_max(w, 0, chunks);
    EXPECT_NEAR(partition_max_weight(w, ranges), best, 1e-9 * std::max(1.0, best));
  }
}

TEST(PartitionMinMax, NeverWorseThanAnEvenSplit) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> real(0.1, 3.0);
  for (int iter = 0; iter < 100; ++iter) {
    const int n = std::uniform_int_distribution<int>(2, 96)(rng);
    const int chunks = std::uniform_int_distribution<int>(1, std::min(n, 16))(rng);
    std::vector<double> w(static_cast<std::size_t>(n));
    for (double& x : w) {
      x = real(rng);
    }
    w.front() += 5; // embedding
    w.back() += 8;  // LM head and loss
    const auto ranges = partition_min_max(w, chunks);
    expect_valid_partition(ranges, n, chunks);
    EXPECT_LE(partition_max_weight(w, ranges),
              partition_max_weight(w, stages_even(n, chunks)) * (1 + 1e-12));
    // and never below the obvious lower bounds
    double total = 0;
    for (double x : w) {
      total += x;
    }
    EXPECT_GE(partition_max_weight(w, ranges) * (1 + 1e-12), total / chunks);
    EXPECT_GE(partition_max_weight(w, ranges), *std::max_element(w.begin(), w.end()));
  }
}

} // namespace
} // namespace parallax
