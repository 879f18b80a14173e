// Breakdown of a timeline (simulated or measured) and the statistics compare reports.
#include <gtest/gtest.h>

#include "parallax/core/error.hpp"
#include "parallax/simulator/timeline_breakdown.hpp"

#include <cmath>

namespace parallax {
namespace {

Event ev(int rank, Stream s, Category c, double a, double b) {
  return {.rank = rank, .stream = s, .category = c, .start_s = a, .end_s = b};
}

TEST(TimelineBreakdown, AttributesEveryInstantOfTheCriticalRank) {
  Timeline t;
  // Rank 0: forward 0–4 with a TP all-reduce 1–2 inside it, waits for a pipeline receive 4–5,
  // backward 5–8, DP wait 8–9, idle 9–9.5, optimizer 9.5–10.
  t.events = {ev(0, Stream::compute, Category::forward, 0, 4),
              ev(0, Stream::tp_comm, Category::tp_comm, 1, 2),
              ev(0, Stream::pp_comm, Category::pp_comm, 4, 5),
              ev(0, Stream::compute, Category::backward, 5, 8),
              ev(0, Stream::dp_comm, Category::dp_comm, 7, 9),
              ev(0, Stream::compute, Category::optimizer, 9.5, 10),
              // Rank 1 computes less: not the critical rank.
              ev(1, Stream::compute, Category::forward, 0, 1)};
  const TimeBreakdown b = timeline_breakdown(t);
  EXPECT_DOUBLE_EQ(b.compute, 3 + 3); // 0–1, 2–4, 5–8 (the DP overlap 7–8 is hidden)
  EXPECT_DOUBLE_EQ(b.tp_comm, 1);
  EXPECT_DOUBLE_EQ(b.pp_comm, 1);
  EXPECT_DOUBLE_EQ(b.dp_comm, 1); // 8–9: exposed part only
  EXPECT_DOUBLE_EQ(b.bubble, 0.5);
  EXPECT_DOUBLE_EQ(b.optimizer, 0.5);
  EXPECT_DOUBLE_EQ(b.compute + b.tp_comm + b.pp_comm + b.dp_comm + b.bubble + b.optimizer, 10);
}

TEST(TimelineBreakdown, EmptyTimelineIsAllZero) {
  const TimeBreakdown b = timeline_breakdown(Timeline{});
  EXPECT_EQ(b.compute + b.bubble, 0);
}

TEST(CompareStatistics, MeanAbsolutePercentageError) {
  EXPECT_DOUBLE_EQ(mean_absolute_percentage_error({1.0, 2.0, 4.0}, {1.1, 1.8, 4.0}),
                   (0.1 + 0.1 + 0.0) / 3);
  EXPECT_DOUBLE_EQ(mean_absolute_percentage_error({2.0}, {3.0}), 0.5);
  EXPECT_THROW(mean_absolute_percentage_error({1.0}, {1.0, 2.0}), CheckError);
  EXPECT_THROW(mean_absolute_percentage_error({0.0}, {1.0}), CheckError);
}

TEST(CompareStatistics, KendallTau) {
  EXPECT_DOUBLE_EQ(kendall_tau({1, 2, 3, 4}, {10, 20, 30, 40}), 1.0);
  EXPECT_DOUBLE_EQ(kendall_tau({1, 2, 3, 4}, {4, 3, 2, 1}), -1.0);
  // One swapped pair of six: (5 − 1) / 6.
  EXPECT_DOUBLE_EQ(kendall_tau({1, 2, 3, 4}, {1, 3, 2, 4}), 4.0 / 6.0);
  // Tau-b with a tie in one series: pairs (1,2) tied in a; 5 concordant of sqrt(6·5).
  EXPECT_NEAR(kendall_tau({1, 1, 2, 3}, {1, 2, 3, 4}), 5.0 / std::sqrt(5.0 * 6.0), 1e-12);
  EXPECT_THROW(kendall_tau({1}, {1}), CheckError);
}

} // namespace
} // namespace parallax
