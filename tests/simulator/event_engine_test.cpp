#include "parallax/core/error.hpp"
#include "parallax/simulator/event_engine.hpp"

#include <gtest/gtest.h>

#include <limits>

namespace parallax {
namespace {

TEST(EventEngine, StreamRunsInOrder) {
  EventEngine e;
  const auto s = e.add_stream();
  const auto a = e.add_compute(s, 1.0);
  const auto b = e.add_compute(s, 2.0);
  const auto c = e.add_compute(s, 0.5);
  EXPECT_DOUBLE_EQ(e.run(), 3.5);
  EXPECT_DOUBLE_EQ(e.task(a).end_s, 1.0);
  EXPECT_DOUBLE_EQ(e.task(b).start_s, 1.0);
  EXPECT_DOUBLE_EQ(e.task(c).end_s, 3.5);
}

TEST(EventEngine, HeadOfStreamBlocksLaterReadyTasks) {
  EventEngine e;
  const auto s1 = e.add_stream();
  const auto s2 = e.add_stream();
  const auto slow = e.add_compute(s1, 5.0);
  const auto waiting = e.add_compute(s2, 1.0); // head of s2, waits for `slow`
  const auto ready = e.add_compute(s2, 1.0);   // has no dependency but is queued behind
  e.add_dependency(slow, waiting);
  e.run();
  EXPECT_DOUBLE_EQ(e.task(waiting).start_s, 5.0);
  EXPECT_DOUBLE_EQ(e.task(ready).start_s, 6.0);
}

TEST(EventEngine, StreamsOverlap) {
  EventEngine e;
  const auto compute = e.add_stream();
  const auto comm = e.add_stream();
  const auto link = e.add_link(100.0);
  const auto f = e.add_compute(compute, 1.0);
  const auto g = e.add_flow(comm, link, 0.25, 100.0); // 0.25 s latency + 1 s transfer
  const auto h = e.add_compute(compute, 2.0);
  e.add_dependency(f, g);
  EXPECT_DOUBLE_EQ(e.run(), 3.0);
  EXPECT_DOUBLE_EQ(e.task(g).end_s, 2.25);
  EXPECT_DOUBLE_EQ(e.task(h).end_s, 3.0);
}

TEST(EventEngine, TwoFlowsSharingOneLinkTakeTwiceAsLong) {
  EventEngine alone;
  const auto s = alone.add_stream();
  const auto l = alone.add_link(10.0);
  alone.add_flow(s, l, 0.0, 20.0);
  EXPECT_DOUBLE_EQ(alone.run(), 2.0);

  EventEngine shared;
  const auto s1 = shared.add_stream();
  const auto s2 = shared.add_stream();
  const auto link = shared.add_link(10.0);
  const auto a = shared.add_flow(s1, link, 0.0, 20.0);
  const auto b = shared.add_flow(s2, link, 0.0, 20.0);
  EXPECT_DOUBLE_EQ(shared.run(), 4.0);
  EXPECT_DOUBLE_EQ(shared.task(a).end_s, 4.0);
  EXPECT_DOUBLE_EQ(shared.task(b).end_s, 4.0);
}

TEST(EventEngine, StaggeredFlowsShareFairly) {
  // Capacity 1: flow A (2 bytes) starts at 0, flow B (1 byte) at 1. A has 1 byte left at t = 1;
  // from then on both move at 0.5 and finish together at t = 3.
  EventEngine e;
  const auto s1 = e.add_stream();
  const auto s2 = e.add_stream();
  const auto link = e.add_link(1.0);
  const auto a = e.add_flow(s1, link, 0.0, 2.0);
  const auto b = e.add_flow(s2, link, 1.0, 1.0);
  e.run();
  EXPECT_NEAR(e.task(a).end_s, 3.0, 1e-12);
  EXPECT_NEAR(e.task(b).end_s, 3.0, 1e-12);
  // A third flow on another link is unaffected.
  EventEngine f;
  const auto t1 = f.add_stream();
  const auto t2 = f.add_stream();
  const auto l1 = f.add_link(1.0);
  const auto l2 = f.add_link(1.0);
  const auto x = f.add_flow(t1, l1, 0.0, 2.0);
  const auto y = f.add_flow(t2, l2, 0.0, 2.0);
  f.run();
  EXPECT_DOUBLE_EQ(f.task(x).end_s, 2.0);
  EXPECT_DOUBLE_EQ(f.task(y).end_s, 2.0);
}

TEST(EventEngine, FlowCapAndWeights) {
  // Capacity 10, no flow faster than 4: 20 bytes take 5 s alone or beside one other flow
  // (10 / 2 = 5 > 4), and 6 s among three (10 / 3 each).
  for (int flows : {1, 2, 3}) {
    EventEngine e;
    const auto link = e.add_link(10.0, 4.0);
    for (int i = 0; i < flows; ++i) {
      e.add_flow(e.add_stream(), link, 0.0, 20.0);
    }
    EXPECT_NEAR(e.run(), flows < 3 ? 5.0 : 6.0, 1e-12) << flows;
  }
  // One flow of weight 3 stands for three: it moves at 10 / 3 and takes 6 s, as three did.
  EventEngine w;
  const auto link = w.add_link(10.0, 4.0);
  const auto heavy = w.add_flow(w.add_stream(), link, 0.0, 20.0, -1, 3.0);
  EXPECT_NEAR(w.run(), 6.0, 1e-12);
  EXPECT_NEAR(w.task(heavy).end_s, 6.0, 1e-12);
  // Weight 2 (10 / 2 = 5, capped at 4) alone until a flow of weight 1 starts at t = 3: 12 bytes
  // moved, 8 left; then weights 2 + 1 share 10 (10/3 each), so it ends at 3 + 8 · 3 / 10 = 5.4.
  EventEngine v;
  const auto l2 = v.add_link(10.0, 4.0);
  const auto a = v.add_flow(v.add_stream(), l2, 0.0, 20.0, -1, 2.0);
  v.add_flow(v.add_stream(), l2, 3.0, 100.0);
  v.run();
  EXPECT_NEAR(v.task(a).end_s, 5.4, 1e-12);
  EXPECT_THROW(v.add_flow(v.add_stream(), l2, 0.0, 1.0, -1, 0.5), CheckError);
  EXPECT_THROW(v.add_link(1.0, 0.0), CheckError);
}

TEST(EventEngine, GroupedLinkIsMaxMinFairOverGroupsAndTheLink) {
  // Link 7, each group 4 (a node's uplink and its GPUs' NICs). Two flows leave through group
  // 0 (at most 4 / 2 = 2 each), one through group 1 (at most 4). Water-filling: group 0 takes
  // 2 + 2, group 1 the 3 left. Group 1's 20 bytes end at 20 / 3; group 0's flows then hold
  // 20 − 2 · 20/3 each and stay at 2 (their NIC), ending at 10.
  EventEngine e;
  const auto link = e.add_link(7.0, std::numeric_limits<double>::infinity(), 4.0);
  const auto a = e.add_flow(e.add_stream(), link, 0.0, 20.0, -1, 1.0, 0);
  const auto b = e.add_flow(e.add_stream(), link, 0.0, 20.0, -1, 1.0, 0);
  const auto c = e.add_flow(e.add_stream(), link, 0.0, 20.0, -1, 1.0, 1);
  EXPECT_NEAR(e.run(), 10.0, 1e-12);
  EXPECT_NEAR(e.task(c).end_s, 20.0 / 3.0, 1e-12);
  EXPECT_NEAR(e.task(a).end_s, 10.0, 1e-12);
  EXPECT_NEAR(e.task(b).end_s, 10.0, 1e-12);

  // One flow alone on an idle link is held by its group (4), two of one group share it: the
  // case a per-flow cap alone got wrong (each at the cap, 8 through one NIC).
  for (int flows : {1, 2}) {
    EventEngine g;
    const auto l = g.add_link(100.0, 4.0, 4.0);
    for (int i = 0; i < flows; ++i)
      g.add_flow(g.add_stream(), l, 0.0, 20.0, -1, 1.0, 3);
    EXPECT_NEAR(g.run(), 5.0 * flows, 1e-12) << flows;
  }

  // A weighted flow counts w times on the link but once in its group: weights 3 + 1 in one
  // group on a link of 6 — the group allows 4 / 2 = 2 each, the link 6 / 4 = 1.5 each.
  EventEngine w;
  const auto lw = w.add_link(6.0, std::numeric_limits<double>::infinity(), 4.0);
  const auto heavy = w.add_flow(w.add_stream(), lw, 0.0, 30.0, -1, 3.0, 0);
  const auto light = w.add_flow(w.add_stream(), lw, 0.0, 30.0, -1, 1.0, 0);
  EXPECT_NEAR(w.run(), 20.0, 1e-12);
  EXPECT_NEAR(w.task(heavy).end_s, 20.0, 1e-12);
  EXPECT_NEAR(w.task(light).end_s, 20.0, 1e-12);

  // Ungrouped flows on a grouped link are groups of their own: as on a plain link.
  EventEngine u;
  const auto lu = u.add_link(10.0, 4.0, 4.0);
  for (int i = 0; i < 3; ++i)
    u.add_flow(u.add_stream(), lu, 0.0, 20.0);
  EXPECT_NEAR(u.run(), 6.0, 1e-12);
  EXPECT_THROW(u.add_link(1.0, 1.0, 0.0), CheckError);
}

TEST(EventEngine, BarrierWaitsForAllInputs) {
  EventEngine e;
  const auto s1 = e.add_stream();
  const auto s2 = e.add_stream();
  const auto a = e.add_compute(s1, 1.0);
  const auto b = e.add_compute(s2, 3.0);
  const auto barrier = e.add_barrier();
  const auto after = e.add_compute(s1, 1.0);
  e.add_dependency(a, barrier);
  e.add_dependency(b, barrier);
  e.add_dependency(barrier, after);
  EXPECT_DOUBLE_EQ(e.run(), 4.0);
  EXPECT_DOUBLE_EQ(e.task(barrier).end_s, 3.0);
}

TEST(EventEngine, CycleIsReported) {
  EventEngine e;
  const auto s1 = e.add_stream();
  const auto s2 = e.add_stream();
  const auto a = e.add_compute(s1, 1.0);
  const auto b = e.add_compute(s2, 1.0);
  e.add_dependency(a, b);
  e.add_dependency(b, a);
  EXPECT_THROW(e.run(), CheckError);
}

} // namespace
} // namespace parallax
