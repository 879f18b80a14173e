// Resilience end to end: `parallax train` flags a delayed rank as a straggler, and `parallax
// launch --elastic` survives a killed rank by resuming from the newest checkpoint on the
// surviving ranks with a plan made for them, the loss curve continuous across the restart.
#include <gtest/gtest.h>

#include "parallax/executor/straggler.hpp"
#include "train_harness.hpp"

#include <fstream>

namespace {

using namespace parallax_test;

TEST(Stragglers, MedianRule) {
  using parallax::find_stragglers;
  EXPECT_TRUE(find_stragglers(std::vector<double>{1.0}).empty());
  EXPECT_TRUE(find_stragglers(std::vector<double>{1.0, 1.05, 0.98, 1.02}).empty());
  EXPECT_EQ(find_stragglers(std::vector<double>{1.0, 1.0, 1.5, 1.0}), std::vector<int>{2});
  // Median of an even count is the mean of the middle two: 1.0 and 1.3 → 1.15; 1.3 > 1.265.
  EXPECT_EQ(find_stragglers(std::vector<double>{1.0, 1.3}), std::vector<int>{1});
}

TEST(Stragglers, TrainFlagsTheDelayedRank) {
  // Rank 1 sleeps 300 ms before every step (the fault injector): its busy time is its compute
  // plus the sleep; rank 0's wait for it is blocked time, not busy. (A loaded machine can
  // stretch one step's compute past the sleep, so one step of four may go unflagged.)
  const TrainRun run = train({.family = "gpt", .dp = 2},
                             {.steps = 4, .dir = "straggler", .env = "PARALLAX_FAULT=slow:1:300"});
  ASSERT_EQ(run.steps.size(), 4u) << run.output;
  int flagged = 0;
  for (const Json& line : run.steps) {
    ASSERT_TRUE(line.contains("stragglers")) << line.dump();
    for (const Json& r : line["stragglers"])
      EXPECT_EQ(r, 1) << line.dump(); // never the rank that waits
    flagged += line["stragglers"] == Json::array({1}) ? 1 : 0;
  }
  EXPECT_GE(flagged, 3);
  EXPECT_NE(run.output.find("rank 1 flagged in"), std::string::npos) << run.output;
}

std::vector<Json> read_lines(const fs::path& file) {
  std::vector<Json> out;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);)
    out.push_back(Json::parse(line));
  return out;
}

TEST(ElasticLaunch, KilledRankResumesOnTheSurvivors) {
  const fs::path dir = work_dir() / "elastic";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string train_args =
      fmt::format("train --model {} --steps 8 --seed 7 --lr 1e-3 --warmup-steps 2 --decay-steps 20 "
                  "--checkpoint-every 1 --comm-timeout 60",
                  model_file("gpt").string());
  // The reference: the same job on one process, uninterrupted.
  const Result ref = shell(fmt::format("{} launch --np 1 --global-batch 16 -- {} --log {} "
                                       "--checkpoint-dir {}",
                                       PARALLAX_BINARY, train_args, (dir / "ref.jsonl").string(),
                                       (dir / "ref-ckpt").string()));
  ASSERT_EQ(ref.code, 0) << ref.out;
  // Rank 3 of 4 dies at step 5 (after its checkpoint): the job goes on on 3 ranks (or fewer,
  // where 3 have no plan), re-planned, from step 5.
  const Result r = shell(fmt::format(
      "PARALLAX_FAULT=kill:3:5 {} launch --np 4 --min-np 2 --elastic --global-batch 16 -- {} "
      "--log {} --checkpoint-dir {}",
      PARALLAX_BINARY, train_args, (dir / "log.jsonl").string(), (dir / "ckpt").string()));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("rank 3 died"), std::string::npos) << r.out;
  const std::vector<Json> steps = read_lines(dir / "log.jsonl");
  const std::vector<Json> expected = read_lines(dir / "ref.jsonl");
  ASSERT_EQ(steps.size(), 8u) << r.out;
  ASSERT_EQ(expected.size(), 8u) << ref.out;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    EXPECT_EQ(steps[i]["step"], static_cast<int>(i) + 1); // no step lost or repeated
    const double a = steps[i]["loss"].get<double>();
    const double b = expected[i]["loss"].get<double>();
    EXPECT_NEAR(a, b, 1e-4 * std::abs(b)) << "step " << i + 1;
  }
  const std::vector<Json> restarts = read_lines(dir / "ckpt" / "launch.jsonl");
  ASSERT_EQ(restarts.size(), 1u);
  EXPECT_EQ(restarts[0]["dead_rank"], 3);
  EXPECT_EQ(restarts[0]["resume_step"], 5);
  EXPECT_EQ(restarts[0]["old_ranks"], 4);
  EXPECT_LT(restarts[0]["new_ranks"].get<int>(), 4);
  EXPECT_TRUE(restarts[0]["new_plan"].is_string());
}

TEST(ElasticLaunch, BadInputExitsTwo) {
  const std::string tail = fmt::format("-- train --model {} --steps 2", model_file("gpt").string());
  for (const std::string& flags : {std::string("--np 2 --min-np 3 --elastic"),
                                   std::string("--np 2 --elastic"), std::string("--np 0")}) {
    const Result r = shell(fmt::format("{} launch {} {}", PARALLAX_BINARY, flags, tail));
    EXPECT_EQ(r.code, 2) << flags << "\n" << r.out;
  }
}

} // namespace
