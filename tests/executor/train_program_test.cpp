// Property test of the step program against the real executor: for pseudo-random plans, the
// measured timeline of `parallax train` under mpirun holds, on every rank, exactly one op's
// worth of events per op of core's step program, started in program order, each op starting
// only after the ops it waits for have ended.
#include <gtest/gtest.h>

#include "train_harness.hpp"

#include "parallax/core/plan_json.hpp"
#include "parallax/core/step_program.hpp"
#include "parallax/core/timeline_json.hpp"

#include <algorithm>
#include <map>
#include <random>

namespace {

using namespace parallax_test;
using parallax::Event;
using parallax::StepOp;

std::vector<Case> random_cases() {
  std::mt19937 rng(2026);
  const auto pick = [&](std::initializer_list<int> v) {
    return *(v.begin() + std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng));
  };
  std::vector<Case> cases;
  while (cases.size() < 8) {
    Case c;
    c.family = pick({0, 1}) == 0 ? "gpt" : "llama";
    c.dp = pick({1, 2});
    c.tp = pick({1, 2});
    c.pp = pick({1, 2, 4});
    if (c.dp * c.tp * c.pp > 8 || c.dp * c.tp * c.pp == 1)
      continue;
    c.zero = pick({0, 1, 2, 3});
    c.micro = pick({1, 2, 4});
    c.recompute = pick({0, 1, 2}) == 0 ? "none" : pick({0, 1}) ? "selective" : "full";
    c.sp = c.tp > 1 && pick({0, 1}) == 1;
    c.overlap = pick({0, 1}) == 1;
    c.sync = c.zero == 0 && c.dp > 1 && pick({0, 1, 2}) == 0 ? "parameter_server" : "allreduce";
    const int m = kGlobalBatch / (c.micro * c.dp);
    if (c.pp > 1 && pick({0, 1}) == 1 && m % c.pp == 0 && c.pp <= 2) {
      c.schedule = "interleaved";
      c.v = 2;
    }
    c.even_stages = true;
    cases.push_back(c);
  }
  // Full recomputation and ZeRO-2 without overlap, beside the draws.
  cases.push_back({.family = "gpt",
                   .dp = 2,
                   .pp = 2,
                   .zero = 2,
                   .recompute = "full",
                   .overlap = false,
                   .even_stages = true});
  cases.push_back({.family = "llama",
                   .dp = 2,
                   .tp = 2,
                   .zero = 3,
                   .recompute = "full",
                   .sp = true,
                   .micro = 4,
                   .even_stages = true});
  return cases;
}

class ProgramConformance : public ::testing::TestWithParam<Case> {};

TEST_P(ProgramConformance, ExecutedOpsAreTheStepProgram) {
  const Case& c = GetParam();
  const std::string dir = case_name(c) + "-program";
  const fs::path trace = work_dir() / dir / "trace.json";
  const TrainRun run = train(c, {.extra = "--trace " + trace.string(), .steps = 1, .dir = dir});
  ASSERT_EQ(run.code, 0) << run.output;
  const parallax::Timeline tl =
      parallax::timeline_from_chrome_trace(parallax::json_load_file(trace), trace.string());
  const parallax::Plan plan = parallax::plan_from_json(
      parallax::json_load_file(work_dir() / dir / fmt::format("plan-{}.json", case_name(c))),
      "plan");
  constexpr double kEps = 1e-6;
  for (int rank = 0; rank < plan.world_size(); ++rank) {
    const parallax::StepProgram prog =
        parallax::step_program(plan, {.units = 8, .tied_embeddings = c.family == "gpt"}, rank);
    // Events of this rank by op name (an op's TP collectives carry its name + " tp"; a
    // reduction over several parameter blocks records one event per block).
    struct Span {
      double start = 1e300, end = -1e300;
    };
    std::map<std::string, Span> spans;
    for (const Event& e : tl.events) {
      if (e.rank != rank || e.name.ends_with(" tp"))
        continue;
      Span& s = spans[e.name];
      s.start = std::min(s.start, e.start_s);
      s.end = std::max(s.end, e.end_s);
    }
    std::vector<std::string> names;
    for (const StepOp& op : prog.ops)
      names.push_back(op.name());
    std::vector<std::string> recorded;
    for (const auto& [name, span] : spans)
      recorded.push_back(name);
    std::vector<std::string> sorted = names;
    std::sort(sorted.begin(), sorted.end());
    ASSERT_EQ(recorded, sorted) << "rank " << rank;
    for (std::size_t i = 0; i < prog.ops.size(); ++i) {
      const Span& s = spans.at(names[i]);
      if (i > 0) {
        EXPECT_LE(spans.at(names[i - 1]).start, s.start + kEps)
            << "rank " << rank << ": " << names[i - 1] << " before " << names[i];
      }
      for (int a : prog.ops[i].after) {
        EXPECT_LE(spans.at(names[static_cast<std::size_t>(a)]).end, s.start + kEps)
            << "rank " << rank << ": " << names[i] << " waits for "
            << names[static_cast<std::size_t>(a)];
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Random, ProgramConformance, ::testing::ValuesIn(random_cases()),
                         [](const auto& p) { return case_name(p.param); });

} // namespace

namespace {

using namespace parallax_test;

// What the planner proposes trains: for a model with a prime vocabulary and 6 heads on 2 and 4
// CPU ranks, every one of the planner's top plans runs a step under mpirun.
TEST(PlannerPlansTrain, EveryTopPlanOfAnOddModelTrains) {
  const fs::path model = model_file("oddgpt");
  for (int ranks : {2, 4}) {
    const fs::path dir = work_dir() / fmt::format("planner-top-{}", ranks);
    fs::create_directories(dir);
    const Result planned =
        shell(fmt::format("{} plan --model {} --cluster cpu-local --gpus {} --global-batch 16 "
                          "--top 10 --json",
                          PARALLAX_BINARY, model.string(), ranks));
    ASSERT_EQ(planned.code, 0) << planned.out;
    const Json doc = Json::parse(planned.out.substr(planned.out.find('{')));
    const Json& plans = doc.at("plans");
    ASSERT_GE(plans.size(), 5u) << planned.out;
    for (std::size_t i = 0; i < plans.size(); ++i) {
      const fs::path plan = dir / fmt::format("plan-{}.json", i);
      parallax::json_write_file(plan, plans[i].at("plan"));
      const Result r =
          shell(fmt::format("{}{} train --model {} --plan {} --steps 1 --comm-timeout 60",
                            mpirun(ranks), PARALLAX_BINARY, model.string(), plan.string()));
      EXPECT_EQ(r.code, 0) << plans[i].at("plan").dump() << "\n" << r.out;
    }
  }
}

} // namespace
