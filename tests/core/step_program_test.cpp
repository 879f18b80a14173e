// The step program's ZeRO, overlap and pipeline rules, checked without MPI or a simulator:
// which ops exist, where they sit, what they wait for.
#include <gtest/gtest.h>

#include "parallax/core/step_program.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <random>

namespace parallax {
namespace {

Plan plan_of(int dp, int pp, int zero, std::int64_t m, bool overlap = true) {
  Plan p;
  p.dp = dp;
  p.pp = pp;
  p.zero_stage = zero;
  p.micro_batch_size = 1;
  p.global_batch_size = m * dp;
  p.overlap_grad_reduce = overlap;
  return p;
}

int count(const StepProgram& prog, StepOpKind kind) {
  return static_cast<int>(std::count_if(prog.ops.begin(), prog.ops.end(),
                                        [&](const StepOp& op) { return op.kind == kind; }));
}

int index_of(const StepProgram& prog, const std::string& name) {
  for (std::size_t i = 0; i < prog.ops.size(); ++i) {
    if (prog.ops[i].name() == name)
      return static_cast<int>(i);
  }
  return -1;
}

// Every program: dependencies point backwards, names are unique, each schedule op's phase
// covers a forward or backward of its chunk, the optimizer waits for every reduction.
void expect_well_formed(const StepProgram& prog, const Plan& plan, int units) {
  std::vector<std::string> names;
  int optimizer = -1;
  for (std::size_t i = 0; i < prog.ops.size(); ++i) {
    const StepOp& op = prog.ops[i];
    for (int a : op.after) {
      EXPECT_GE(a, 0);
      EXPECT_LT(a, static_cast<int>(i)) << op.name();
    }
    names.push_back(op.name());
    if (op.kind == StepOpKind::optimizer)
      optimizer = static_cast<int>(i);
  }
  std::sort(names.begin(), names.end());
  const auto dup = std::adjacent_find(names.begin(), names.end());
  EXPECT_EQ(dup, names.end()) << "duplicate op name " << (dup != names.end() ? *dup : "");
  ASSERT_GE(optimizer, 0);
  for (std::size_t i = 0; i < prog.ops.size(); ++i) {
    if (prog.ops[i].kind == StepOpKind::reduce) {
      const auto& after = prog.ops[static_cast<std::size_t>(optimizer)].after;
      EXPECT_NE(std::find(after.begin(), after.end(), static_cast<int>(i)), after.end());
    }
  }
  // Each local unit runs forward and backward once per micro-batch.
  int local_units = 0;
  for (std::size_t c = static_cast<std::size_t>(prog.pp_rank); c < prog.stages.size();
       c += static_cast<std::size_t>(plan.pp)) {
    local_units += prog.stages[c].second - prog.stages[c].first;
  }
  const int m = static_cast<int>(plan.num_microbatches());
  EXPECT_EQ(count(prog, StepOpKind::forward), local_units * m);
  EXPECT_EQ(count(prog, StepOpKind::backward), local_units * m);
  EXPECT_EQ(prog.phases.size(), static_cast<std::size_t>(2 * m * plan.virtual_stages));
  EXPECT_LE(local_units, units);
}

TEST(StepProgram, ZeroStagesDecideGathersReductionsAndPublish) {
  const int units = 4;
  for (int z = 0; z <= 3; ++z) {
    const Plan p = plan_of(2, 1, z, 3);
    const StepProgram prog = step_program(p, {.units = units}, 0);
    expect_well_formed(prog, p, units);
    // ZeRO-3 gathers every unit before its forward and again before its backward.
    EXPECT_EQ(count(prog, StepOpKind::gather), z == 3 ? 2 * units * 3 : 0) << z;
    // ZeRO-2/3 reduce-scatter every micro-batch; otherwise the last micro-batch all-reduces
    // (ZeRO-0) or reduce-scatters (ZeRO-1, the distributed optimizer).
    EXPECT_EQ(count(prog, StepOpKind::reduce), z >= 2 ? units * 3 : units) << z;
    EXPECT_EQ(count(prog, StepOpKind::publish), z == 1 || z == 2 ? 1 : 0) << z;
    const DataParallelComm rule = data_parallel_comm(p, true);
    EXPECT_EQ(rule.per_micro_batch, z >= 2) << z;
    EXPECT_EQ(rule.gathers_per_micro_batch, z == 3 ? 2 : 0) << z;
    for (const StepOp& op : prog.ops) {
      if (op.kind == StepOpKind::publish) {
        EXPECT_EQ(op.collective, StepCollective::all_gather);
      }
      if (op.kind == StepOpKind::reduce) {
        EXPECT_EQ(op.collective,
                  z >= 1 ? StepCollective::reduce_scatter : StepCollective::all_reduce);
        EXPECT_EQ(op.collective, rule.gradients);
        EXPECT_TRUE(op.async); // the stack overlaps reduction with the backward
        if (z < 2) {
          EXPECT_EQ(op.micro_batch, 2);
        }
      }
    }
  }
  // A parameter server: reduced to data-parallel rank 0, which broadcasts the update.
  Plan ps = plan_of(2, 1, 0, 3);
  ps.grad_sync = GradSync::parameter_server;
  EXPECT_EQ(data_parallel_comm(ps, true),
            (DataParallelComm{.gradients = StepCollective::reduce_to_root,
                              .publish = StepCollective::broadcast}));
  for (const StepOp& op : step_program(ps, {.units = units}, 0).ops) {
    if (op.kind == StepOpKind::reduce || op.kind == StepOpKind::publish) {
      EXPECT_EQ(op.collective, op.kind == StepOpKind::reduce ? StepCollective::reduce_to_root
                                                             : StepCollective::broadcast);
    }
  }
  // Without data parallelism nothing is gathered or reduced.
  EXPECT_EQ(data_parallel_comm(plan_of(1, 1, 3, 2), true), DataParallelComm{});
  const StepProgram alone = step_program(plan_of(1, 1, 3, 2), {.units = units}, 0);
  EXPECT_EQ(count(alone, StepOpKind::gather) + count(alone, StepOpKind::reduce) +
                count(alone, StepOpKind::publish),
            0);
}

TEST(StepProgram, GathersArePrefetchedOneUnitAheadAndReshardingIsTheStacks) {
  const Plan p = plan_of(2, 1, 3, 1);
  const StepProgram prog = step_program(p, {.units = 3}, 0);
  // The gather of unit 2's forward may start once unit 0's forward is done.
  const int g = index_of(prog, "gather u2 mb0");
  ASSERT_GE(g, 0);
  ASSERT_EQ(prog.ops[static_cast<std::size_t>(g)].after.size(), 1u);
  EXPECT_EQ(
      prog.ops[static_cast<std::size_t>(prog.ops[static_cast<std::size_t>(g)].after[0])].name(),
      "forward u0 mb0");
  // Its forward waits for it.
  const StepOp& f = prog.ops[static_cast<std::size_t>(index_of(prog, "forward u2 mb0"))];
  EXPECT_NE(std::find(f.after.begin(), f.after.end(), g), f.after.end());
  // A stack that keeps the gathered layers for the backward gathers only before the forward.
  const StepProgram kept = step_program(p, {.units = 3, .reshard_after_forward = false}, 0);
  EXPECT_EQ(count(kept, StepOpKind::gather), 3);
}

TEST(StepProgram, WithoutOverlapReductionsWaitForTheBackwardPass) {
  // ZeRO-1: after the last backward, in the order the backwards ran, holding the rank.
  const StepProgram z1 = step_program(plan_of(2, 1, 1, 2, false), {.units = 3}, 0);
  const int last_backward = index_of(z1, "backward u0 mb1");
  for (int u = 0; u < 3; ++u) {
    const int r = index_of(z1, fmt::format("reduce-scatter u{} mb1", u));
    ASSERT_GE(r, 0);
    EXPECT_GT(r, last_backward);
    EXPECT_FALSE(z1.ops[static_cast<std::size_t>(r)].async);
  }
  EXPECT_LT(index_of(z1, "reduce-scatter u2 mb1"), index_of(z1, "reduce-scatter u0 mb1"));
  // ZeRO-0 the same with all-reduces.
  const StepProgram z0 = step_program(plan_of(2, 1, 0, 2, false), {.units = 3}, 0);
  EXPECT_GT(index_of(z0, "all-reduce u0"), index_of(z0, "backward u0 mb1"));
  EXPECT_LT(index_of(z0, "all-reduce u2"), index_of(z0, "all-reduce u0"));
  // ZeRO-2: after each micro-batch's backward.
  const StepProgram z2 = step_program(plan_of(2, 1, 2, 2, false), {.units = 3}, 0);
  EXPECT_GT(index_of(z2, "reduce-scatter u0 mb0"), index_of(z2, "backward u0 mb0"));
  EXPECT_LT(index_of(z2, "reduce-scatter u0 mb0"), index_of(z2, "forward u0 mb1"));
  // With overlap a unit's reduction starts as its backward ends, before the next unit's.
  const StepProgram ov = step_program(plan_of(2, 1, 0, 1), {.units = 3}, 0);
  const int r2 = index_of(ov, "all-reduce u2");
  EXPECT_EQ(ov.ops[static_cast<std::size_t>(r2)].after,
            std::vector<int>{index_of(ov, "backward u2 mb0")});
  EXPECT_LT(r2, index_of(ov, "backward u1 mb0"));
}

TEST(StepProgram, PipelineSendsPairWithReceivesAcrossRanks) {
  Plan p = plan_of(1, 2, 0, 4);
  p.virtual_stages = 2;
  p.schedule = Schedule::interleaved;
  const StepShape shape{.units = 8, .tied_embeddings = true};
  const StepProgram r0 = step_program(p, shape, 0);
  const StepProgram r1 = step_program(p, shape, 1);
  expect_well_formed(r0, p, 8);
  expect_well_formed(r1, p, 8);
  // Every send has exactly one receive of the same name on the chunk's rank (the names say
  // chunk from > chunk to), and the other way round.
  std::vector<std::string> sends, recvs;
  for (const StepProgram* prog : {&r0, &r1}) {
    for (const StepOp& op : prog->ops) {
      std::string n = op.name();
      if (op.kind == StepOpKind::send)
        sends.push_back(n.replace(0, 4, "xfer"));
      if (op.kind == StepOpKind::recv)
        recvs.push_back(n.replace(0, 4, "xfer"));
    }
  }
  std::sort(sends.begin(), sends.end());
  std::sort(recvs.begin(), recvs.end());
  EXPECT_EQ(sends, recvs);
  EXPECT_EQ(sends.size(), static_cast<std::size_t>(2 * 4 * 3)); // (chunks − 1) hops, 2 ways
  // Tied embeddings on two stages: each end sums the embedding gradient before the optimizer.
  EXPECT_EQ(count(r0, StepOpKind::embedding_sync), 1);
  EXPECT_EQ(count(r1, StepOpKind::embedding_sync), 1);
}

TEST(StepProgram, FullRecomputationPrecedesEachBackwardAndTheParameterServerBroadcasts) {
  Plan p = plan_of(2, 1, 0, 2);
  p.recompute = Recompute::full;
  p.grad_sync = GradSync::parameter_server;
  const StepProgram prog = step_program(p, {.units = 2}, 1);
  for (int mb = 0; mb < 2; ++mb) {
    for (int u = 0; u < 2; ++u) {
      EXPECT_EQ(index_of(prog, fmt::format("recompute u{} mb{}", u, mb)) + 1,
                index_of(prog, fmt::format("backward u{} mb{}", u, mb)));
    }
  }
  EXPECT_GE(index_of(prog, "reduce u0"), 0);
  EXPECT_GE(index_of(prog, "broadcast params"), 0);
}

// Random plans: the rules above hold for every rank.
TEST(StepProgram, RandomPlansAreWellFormed) {
  std::mt19937 rng(17);
  const auto pick = [&](std::initializer_list<int> v) {
    return *(v.begin() + std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng));
  };
  for (int trial = 0; trial < 200; ++trial) {
    Plan p = plan_of(pick({1, 2, 4}), pick({1, 2, 4}), pick({0, 1, 2, 3}), pick({1, 2, 4, 8}),
                     pick({0, 1}) == 1);
    p.tp = pick({1, 2});
    p.sequence_parallel = p.tp > 1 && pick({0, 1}) == 1;
    p.recompute = static_cast<Recompute>(pick({0, 1, 2}));
    if (p.pp > 1 && pick({0, 1}) == 1 && p.num_microbatches() % p.pp == 0) {
      p.schedule = Schedule::interleaved;
      p.virtual_stages = 2;
    }
    const int units = p.pp * p.virtual_stages * pick({1, 2});
    for (int rank = 0; rank < p.world_size(); rank += std::max(1, p.dp * p.tp - 1)) {
      expect_well_formed(step_program(p, {.units = units, .tied_embeddings = true}, rank), p,
                         units);
    }
  }
}

} // namespace
} // namespace parallax
