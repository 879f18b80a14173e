#include "parallax/core/error.hpp"
#include "parallax/core/timeline_json.hpp"

#include <gtest/gtest.h>

#include <map>

namespace parallax {
namespace {

Timeline sample_timeline() {
  Timeline t;
  t.events.push_back({0, Stream::compute, Category::forward, "block0.mlp.up", 0, 1, 0.1, 0.35,
                      1.5e12, 0});
  t.events.push_back({1, Stream::tp_comm, Category::tp_comm, "allreduce", 3, 0, 1.0 / 3.0,
                      0.7, 0, 6.25e6});
  t.events.push_back({1, Stream::dp_comm, Category::dp_comm, "grads bucket 0", -1, -1, 0.9,
                      1.2, 0, 1e9});
  t.peak_memory_bytes = {123456789, 987654321};
  return t;
}

TEST(TimelineJson, ChromeTraceRoundTripsExactly) {
  Timeline t = sample_timeline();
  Json trace = timeline_to_chrome_trace(t);
  EXPECT_EQ(timeline_from_chrome_trace(trace, "t.json"), t);
  // Reparsing the dumped text keeps every value: double formatting round-trips.
  EXPECT_EQ(timeline_from_chrome_trace(Json::parse(trace.dump()), "t.json"), t);
}

TEST(TimelineJson, ChromeTraceShape) {
  Json trace = timeline_to_chrome_trace(sample_timeline());
  int complete = 0;
  int metadata = 0;
  std::map<int, double> peak_gib;
  for (const auto& e : trace["traceEvents"]) {
    if (e["ph"] == "X") {
      ++complete;
      EXPECT_TRUE(e.contains("ts") && e.contains("dur") && e.contains("pid") && e.contains("tid"));
    } else if (e["ph"] == "M") {
      ++metadata;
    } else if (e["ph"] == "C") {
      peak_gib[e["pid"].get<int>()] = e["args"]["GiB"].get<double>();
    }
  }
  EXPECT_EQ(complete, 3);
  EXPECT_EQ(metadata, 2 * (1 + 4)); // a process name and four stream names per rank
  // A peak-memory counter per rank.
  ASSERT_EQ(peak_gib.size(), 2u);
  EXPECT_NEAR(peak_gib[1], 987654321 / 1073741824.0, 1e-12);
  Json first;
  for (const auto& e : trace["traceEvents"]) {
    if (e["ph"] == "X") {
      first = e;
      break;
    }
  }
  EXPECT_DOUBLE_EQ(first["ts"].get<double>(), 0.1e6);
  EXPECT_DOUBLE_EQ(first["dur"].get<double>(), 0.25e6);

  // A timeline reduced by symmetry: peaks for 4096 ranks, events on two. Only those two get
  // tracks; every peak survives the round trip.
  Timeline reduced = sample_timeline();
  reduced.peak_memory_bytes.assign(4096, 42);
  const Json big = timeline_to_chrome_trace(reduced);
  int processes = 0;
  for (const auto& e : big["traceEvents"]) {
    processes += e["name"] == "process_name" ? 1 : 0;
  }
  EXPECT_EQ(processes, 2);
  EXPECT_EQ(timeline_from_chrome_trace(big, "t.json"), reduced);
}

TEST(TimelineJson, RejectsBadEvents) {
  Json trace = timeline_to_chrome_trace(sample_timeline());
  for (auto& e : trace["traceEvents"]) {
    if (e["ph"] == "X") {
      e["cat"] = "sleeping";
      break;
    }
  }
  EXPECT_THROW(timeline_from_chrome_trace(trace, "t.json"), InputError);
}

TEST(Timeline, MakespanAndSort) {
  Timeline t = sample_timeline();
  EXPECT_DOUBLE_EQ(t.makespan_s(), 1.2);
  std::swap(t.events[0], t.events[2]);
  t.sort();
  EXPECT_EQ(t.events[0].rank, 0);
  EXPECT_EQ(t.events[2].stream, Stream::dp_comm);
}

} // namespace
} // namespace parallax
