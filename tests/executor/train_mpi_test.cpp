// End-to-end executor tests: `parallax train` launched under mpirun with many plans must train
// exactly like one process. Each case runs 5 steps and compares the per-step loss and gradient
// norm and the final parameters and optimizer moments (from the plan-independent checkpoint)
// with the single-process run of the same model, seed and global batch.
#include <gtest/gtest.h>

#include "train_harness.hpp"

#include <fmt/format.h>

#include <map>
#include <string>

namespace {

using namespace parallax_test;

// The single-process reference: the whole global batch as one micro-batch.
const TrainRun& reference(const std::string& family) {
  static std::map<std::string, TrainRun> runs;
  auto it = runs.find(family);
  if (it == runs.end()) {
    Case c;
    c.family = family;
    c.micro = kGlobalBatch;
    it = runs.emplace(family, train(c)).first;
  }
  return it->second;
}

class TrainEquivalence : public ::testing::TestWithParam<Case> {};

TEST_P(TrainEquivalence, MatchesSingleProcessTraining) {
  const Case& c = GetParam();
  const TrainRun& ref = reference(c.family);
  ASSERT_EQ(ref.steps.size(), static_cast<std::size_t>(kSteps)) << ref.output;
  const TrainRun got = train(c);
  expect_same_training(got, ref, 1e-5);
  // Training makes progress at all (the synthetic stream is learnable).
  EXPECT_LT(got.steps.back()["loss"].get<double>(), got.steps.front()["loss"].get<double>());
}

std::vector<Case> equivalence_cases() {
  std::vector<Case> cases;
  for (const std::string family : {"gpt", "llama"}) {
    // Every dp × tp × pp layout with sizes in {1, 2, 4} and at most 8 ranks (Llama's two
    // key/value heads rule out tp = 4).
    for (int dp : {1, 2, 4}) {
      for (int tp : {1, 2, 4}) {
        for (int pp : {1, 2, 4}) {
          if (dp * tp * pp > 8 || (family == "llama" && tp == 4))
            continue;
          cases.push_back({.family = family, .dp = dp, .tp = tp, .pp = pp});
        }
      }
    }
    // Uneven data-parallel shares (heterogeneous clusters): 8 micro-batches of 2 split 2 + 6,
    // with pipelining 3 + 5, and over four replicas.
    cases.push_back({.family = family, .dp = 2, .shares = {2, 6}});
    cases.push_back({.family = family, .dp = 2, .pp = 2, .shares = {3, 5}});
    cases.push_back({.family = family, .dp = 4, .zero = 1, .shares = {1, 1, 3, 3}});
    // Uneven stages (a faster second stage): 2 and 6 of the 8 layers, with uneven shares.
    cases.push_back(
        {.family = family, .dp = 2, .pp = 2, .shares = {3, 5}, .stages = {{0, 2}, {2, 8}}});
    // Schedules.
    cases.push_back({.family = family, .pp = 2, .schedule = "gpipe"});
    cases.push_back({.family = family, .dp = 2, .pp = 4, .schedule = "gpipe"});
    cases.push_back({.family = family, .pp = 2, .schedule = "interleaved", .v = 2});
    cases.push_back({.family = family, .pp = 4, .schedule = "interleaved", .v = 2});
    cases.push_back({.family = family, .dp = 2, .pp = 2, .schedule = "interleaved", .v = 4});
    // ZeRO stages, alone and with tensor and pipeline parallelism.
    for (int zero : {1, 2, 3}) {
      cases.push_back({.family = family, .dp = 2, .zero = zero});
      cases.push_back({.family = family, .dp = 4, .zero = zero});
      cases.push_back({.family = family, .dp = 2, .tp = 2, .pp = 2, .zero = zero});
    }
    // Recomputation.
    for (const std::string rc : {"selective", "full"}) {
      cases.push_back({.family = family, .recompute = rc});
      cases.push_back({.family = family, .dp = 2, .tp = 2, .pp = 2, .recompute = rc});
    }
    // Sequence parallelism.
    cases.push_back({.family = family, .tp = 2, .sp = true});
    cases.push_back({.family = family, .dp = 2, .tp = 2, .pp = 2, .zero = 2, .sp = true});
    if (family == "gpt")
      cases.push_back({.family = family, .tp = 4, .sp = true});
    cases.push_back({.family = family,
                     .tp = 2,
                     .pp = 2,
                     .schedule = "interleaved",
                     .v = 2,
                     .recompute = "full",
                     .sp = true});
    // Parameter-server gradient sync (data-parallel rank 0 reduces, updates and broadcasts).
    cases.push_back({.family = family, .dp = 4, .sync = "parameter_server"});
    cases.push_back({.family = family, .dp = 2, .tp = 2, .pp = 2, .sync = "parameter_server"});
    // Context parallelism: every sequence in 2·cp chunks (the 32-token sequences in 4 or 8),
    // over the ring unless said otherwise, alone and with tensor, pipeline and data
    // parallelism, ZeRO and recomputation.
    cases.push_back({.family = family, .cp = 2});
    cases.push_back({.family = family, .cp = 4});
    // The all-gather exchange.
    cases.push_back({.family = family, .cp = 2, .cp_all_gather = true});
    cases.push_back(
        {.family = family, .tp = 2, .cp = 4, .cp_all_gather = true, .recompute = "selective"});
    cases.push_back({.family = family, .tp = 2, .pp = 2, .cp = 2, .sp = family == "llama"});
    cases.push_back({.family = family, .cp = 2, .recompute = "full"});
    if (family == "gpt")
      cases.push_back({.family = family, .dp = 2, .cp = 2, .zero = 3});
    // Gradient accumulation over many micro-batches vs one big batch.
    cases.push_back({.family = family, .micro = 1});
    // A stack that reduces gradients after the backward pass instead of during it.
    if (family == "gpt") {
      cases.push_back({.family = family, .dp = 2, .tp = 2, .pp = 2, .micro = 1, .overlap = false});
      cases.push_back(
          {.family = family, .dp = 2, .pp = 2, .zero = 2, .micro = 1, .overlap = false});
    }
  }
  // A prime vocabulary, padded per tensor-parallel size, trains like one process.
  cases.push_back({.family = "oddgpt", .tp = 2});
  cases.push_back({.family = "oddgpt", .tp = 3});
  cases.push_back({.family = "oddgpt", .dp = 2, .tp = 2, .pp = 2, .zero = 3});
  // A mixture of experts (router, top-2, shared expert, balance loss) in every dimension.
  cases.push_back({.family = "moe", .dp = 2, .tp = 2, .sp = true});
  cases.push_back({.family = "moe", .dp = 2, .pp = 2, .zero = 2, .recompute = "full"});
  cases.push_back(
      {.family = "moe", .tp = 2, .pp = 2, .zero = 0, .schedule = "interleaved", .v = 2});
  cases.push_back({.family = "moe", .dp = 2, .tp = 2, .pp = 2, .zero = 3});
  // Expert parallelism: tokens dispatched to the experts' ranks and combined back (MPI
  // all-to-all), alone and with tensor parallelism, ZeRO and pipelines.
  cases.push_back({.family = "moe", .dp = 2, .ep = 2});
  cases.push_back({.family = "moe", .dp = 4, .ep = 4});
  cases.push_back({.family = "moe", .dp = 2, .tp = 2, .ep = 2, .zero = 1});
  cases.push_back({.family = "moe", .dp = 2, .pp = 2, .ep = 2});
  cases.push_back({.family = "moe", .dp = 4, .ep = 2, .zero = 3, .recompute = "full"});
  // A capacity factor (copies over an expert's capacity dropped per sequence) trains the same
  // under every layout.
  cases.push_back({.family = "moecap", .dp = 2, .ep = 2});
  cases.push_back({.family = "moecap", .tp = 2, .pp = 2, .sp = true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Plans, TrainEquivalence, ::testing::ValuesIn(equivalence_cases()),
                         [](const auto& p) { return case_name(p.param); });

} // namespace
