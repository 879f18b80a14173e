// Gradient compression end to end: `parallax train` under mpirun with a compressed
// data-parallel reduction. bf16 communication trains like fp32; PowerSGD rank 4 and top-k 5 %
// with error feedback stay within 10 % of uncompressed training after 40 steps; without error
// feedback top-k ends worse than with it.
#include <gtest/gtest.h>

#include "train_harness.hpp"

namespace {

using namespace parallax_test;

constexpr int kLongSteps = 40;

// The mean loss of the last five steps (one step's loss is noisy on the synthetic stream).
double final_loss(const TrainRun& run) {
  EXPECT_EQ(run.steps.size(), static_cast<std::size_t>(kLongSteps)) << run.output;
  double sum = 0;
  int n = 0;
  for (std::size_t i = run.steps.size() >= 5 ? run.steps.size() - 5 : 0; i < run.steps.size();
       ++i, ++n) {
    sum += run.steps[i]["loss"].get<double>();
  }
  return n > 0 ? sum / n : 0.0;
}

Case compressed(std::string method, bool error_feedback = true) {
  return {.family = "gpt",
          .dp = 2,
          .compression = std::move(method),
          .error_feedback = error_feedback,
          .compression_warmup = 5};
}

const TrainRun& uncompressed() {
  static const TrainRun run =
      train({.family = "gpt", .dp = 2}, {.steps = kLongSteps, .dir = "gc_reference"});
  return run;
}

TEST(GradCompressionTraining, Bf16CommunicationTrainsLikeFp32) {
  Case c{.family = "gpt", .dp = 2, .compression = "bf16"};
  const TrainRun got = train(c);
  const TrainRun ref = train({.family = "gpt", .dp = 2}, {.dir = "gc_bf16_reference"});
  ASSERT_EQ(got.steps.size(), ref.steps.size()) << got.output;
  for (std::size_t i = 0; i < ref.steps.size(); ++i) {
    // 8 significant bits per message: close, but the rounding shows.
    EXPECT_NEAR(got.steps[i]["loss"].get<double>(), ref.steps[i]["loss"].get<double>(), 2e-3);
  }
}

TEST(GradCompressionTraining, PowerSgdAndTopkStayWithinTenPercentOfUncompressed) {
  const double none = final_loss(uncompressed());
  const double powersgd = final_loss(train(compressed("powersgd:4"), {.steps = kLongSteps}));
  const double topk = final_loss(train(compressed("topk:0.05"), {.steps = kLongSteps}));
  EXPECT_LT(powersgd, 1.1 * none) << "powersgd:4 " << powersgd << " vs " << none;
  EXPECT_LT(topk, 1.1 * none) << "topk:0.05 " << topk << " vs " << none;
  // And they are compressed: both lose something against the exact reduction.
  EXPECT_GT(powersgd, none);
  EXPECT_GT(topk, none);
}

TEST(GradCompressionTraining, TopkWithoutErrorFeedbackEndsWorse) {
  const double with =
      final_loss(train(compressed("topk:0.05"), {.steps = kLongSteps, .dir = "gc_topk_ef"}));
  const double without = final_loss(train(compressed("topk:0.05", false), {.steps = kLongSteps}));
  EXPECT_GT(without, with) << "error feedback should help: " << with << " vs " << without;
}

} // namespace
