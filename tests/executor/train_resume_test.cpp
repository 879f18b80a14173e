// Executor robustness end to end: resuming under another plan, surviving kill -9, failing
// cleanly on bad input and dead ranks, token files, measured traces.
#include <gtest/gtest.h>

#include "train_harness.hpp"

#include "parallax/core/timeline_json.hpp"

#include <chrono>
#include <csignal>
#include <set>
#include <thread>

namespace {

using namespace parallax_test;

// 10 steps under plan A, a checkpoint, then 10 more under plan B with another rank count,
// equal 20 straight steps.
TEST(TrainResume, ContinuesUnderAnotherPlanAndRankCount) {
  for (const std::string family : {"gpt", "llama"}) {
    SCOPED_TRACE(family);
    const TrainRun straight = train({.family = family}, {.steps = 20, .dir = family + "-straight"});
    const std::string dir = family + "-resumed";
    const TrainRun first = train({.family = family, .dp = 2, .zero = 1}, {.steps = 10, .dir = dir});
    ASSERT_EQ(first.final_state.step, 10);
    const TrainRun second = train({.family = family, .tp = 2, .pp = 2, .zero = 3},
                                  {.extra = "--resume", .steps = 20, .dir = dir, .fresh = false});
    ASSERT_EQ(second.steps.size(), 20u) << second.output; // the log file holds both halves
    EXPECT_NE(second.output.find("resumed from step 10"), std::string::npos) << second.output;
    // Twenty fp32 steps under different reduction orders drift apart by ~1e-5 relative (the
    // equivalence matrix bounds five steps at 1e-5); the bound here is 1e-4.
    expect_same_training(second, straight, 1e-4);
  }
}

// Checkpoints hold whole tensors whatever the context-parallel split: a cp = 2 run resumes
// under cp = 1 (and more data parallelism) where an uninterrupted run would be.
TEST(TrainResume, ContextParallelRunResumesWithoutIt) {
  const TrainRun straight = train({.family = "llama"}, {.steps = 10, .dir = "cp-straight"});
  const TrainRun first =
      train({.family = "llama", .cp = 2, .zero = 1}, {.steps = 5, .dir = "cp-resumed"});
  ASSERT_EQ(first.final_state.step, 5);
  const TrainRun second =
      train({.family = "llama", .dp = 2, .zero = 2},
            {.extra = "--resume", .steps = 10, .dir = "cp-resumed", .fresh = false});
  ASSERT_EQ(second.steps.size(), 10u) << second.output;
  EXPECT_NE(second.output.find("resumed from step 5"), std::string::npos) << second.output;
  expect_same_training(second, straight, 1e-4);
}

// Experts are logical tensors in the checkpoint: an ep = 2 run resumes under ep = 1.
TEST(TrainResume, ExpertParallelRunResumesWithoutIt) {
  const TrainRun straight = train({.family = "moe"}, {.steps = 10, .dir = "ep-straight"});
  const TrainRun first =
      train({.family = "moe", .dp = 2, .ep = 2, .zero = 1}, {.steps = 5, .dir = "ep-resumed"});
  ASSERT_EQ(first.final_state.step, 5);
  const TrainRun second =
      train({.family = "moe", .dp = 2, .zero = 2},
            {.extra = "--resume", .steps = 10, .dir = "ep-resumed", .fresh = false});
  ASSERT_EQ(second.steps.size(), 10u) << second.output;
  EXPECT_NE(second.output.find("resumed from step 5"), std::string::npos) << second.output;
  expect_same_training(second, straight, 1e-4);
}

std::optional<Checkpoint> latest(const fs::path& dir) {
  try {
    return parallax::read_latest_checkpoint(dir);
  } catch (const std::exception&) {
    return std::nullopt; // mid-update: retry
  }
}

// A run killed with SIGKILL at an arbitrary moment resumes from its last checkpoint and ends
// exactly where an uninterrupted run ends.
TEST(TrainResume, SurvivesKillNineAndLosesNothingBeyondTheLastCheckpoint) {
  const Case c{.family = "gpt"};
  const TrainRun straight = train(c, {.steps = 30, .dir = "kill-straight"});
  const fs::path dir = work_dir() / "kill-resumed";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path plan = write_plan(c, dir / "plan.json");
  const std::string args =
      fmt::format("train --model {} --plan {} --seed 7 --lr 1e-3 --warmup-steps 2 --decay-steps 20 "
                  "--checkpoint-dir {} --checkpoint-every 3 --log {}",
                  model_file("gpt").string(), plan.string(), (dir / "ckpt").string(),
                  (dir / "log.jsonl").string());
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const std::string cmd =
        std::string(PARALLAX_BINARY) + " " + args + " --steps 100000 >/dev/null 2>&1";
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // Kill it somewhere after its fourth checkpoint.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  std::int64_t seen = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    if (auto ck = latest(dir / "ckpt"))
      seen = ck->step;
    if (seen >= 12)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_GE(seen, 12) << "the run did not reach its fourth checkpoint";
  // The newest checkpoint is whole (never torn) and resuming from it reproduces the run.
  const std::optional<Checkpoint> after_kill = parallax::read_latest_checkpoint(dir / "ckpt");
  ASSERT_TRUE(after_kill.has_value());
  ASSERT_LT(after_kill->step, 30);
  const Result r = shell(fmt::format("{} {} --steps 30 --resume", PARALLAX_BINARY, args));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find(fmt::format("resumed from step {}", after_kill->step)), std::string::npos)
      << r.out;
  const Checkpoint end = parallax::read_latest_checkpoint(dir / "ckpt").value();
  ASSERT_EQ(end.step, 30);
  ASSERT_EQ(end.tensors.size(), straight.final_state.tensors.size());
  for (std::size_t i = 0; i < end.tensors.size(); ++i) {
    // Same plan, same process count: bit for bit.
    EXPECT_EQ(end.tensors[i], straight.final_state.tensors[i]) << end.tensors[i].name;
  }
}

TEST(TrainFailures, DeadRankEndsTheJobWithoutHanging) {
  const auto start = std::chrono::steady_clock::now();
  const TrainRun r =
      train({.family = "gpt", .dp = 2, .pp = 2},
            {.steps = 50, .env = "PARALLAX_FAULT=kill:1:2", .expect_success = false});
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60));
  // It did run until the fault: two steps logged, no more.
  std::ifstream log(work_dir() / "gpt_d2t1p2_z0_onefoneb_none_mb2" / "log.jsonl");
  int lines = 0;
  for (std::string line; std::getline(log, line);)
    ++lines;
  EXPECT_EQ(lines, 2) << r.output;
}

// A rank that stops communicating without dying: its peers' collectives time out and the job
// is aborted with a message naming the stuck operation.
TEST(TrainFailures, StuckRankTimesOutInsteadOfHanging) {
  const auto start = std::chrono::steady_clock::now();
  const TrainRun r = train({.family = "gpt", .dp = 2}, {.steps = 50,
                                                        .dir = "hang",
                                                        .env = "PARALLAX_FAULT=hang:1:2",
                                                        .expect_success = false,
                                                        .comm_timeout_s = 3});
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("did not complete within"), std::string::npos) << r.output;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(40));
}

TEST(TrainFailures, BadInputsFailCleanlyNamingTheInput) {
  const fs::path dir = work_dir() / "bad-inputs";
  fs::create_directories(dir);
  const fs::path plan = write_plan({.dp = 2}, dir / "plan-dp2.json");
  const std::string model = model_file("gpt").string();
  // Plan for 2 ranks, 1 process.
  Result r = shell(fmt::format("{} train --model {} --plan {} --steps 1", PARALLAX_BINARY, model,
                               plan.string()));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("plan-dp2.json"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("mpirun -np 2"), std::string::npos) << r.out;
  // Under mpirun with the wrong count, every rank exits 2 and one message is printed.
  r = shell(fmt::format("{}{} train --model {} --plan {} --steps 1", mpirun(3), PARALLAX_BINARY,
                        model, plan.string()));
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("mpirun -np 2"), std::string::npos) << r.out;
  // A plan the trainer cannot run (parameter server with ZeRO): found on every rank before any
  // communicator exists, so the job exits 2 with one message instead of aborting.
  const fs::path ps_zero =
      write_plan({.dp = 2, .zero = 1, .sync = "parameter_server"}, dir / "plan-ps-zero.json");
  r = shell(fmt::format("{}{} train --model {} --plan {} --steps 1", mpirun(2), PARALLAX_BINARY,
                        model, ps_zero.string()));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("/grad_sync"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("MPI_ABORT"), std::string::npos) << r.out;
  // Missing token file.
  r = shell(fmt::format("{}{} train --model {} --plan {} --steps 1 --data {}", mpirun(2),
                        PARALLAX_BINARY, model, plan.string(), (dir / "missing.bin").string()));
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("missing.bin"), std::string::npos) << r.out;
  // Corrupt checkpoint: one flipped byte in the data area.
  const TrainRun ok = train({.family = "gpt"}, {.steps = 2, .dir = "corrupt"});
  const fs::path ckpt_dir = work_dir() / "corrupt" / "ckpt";
  fs::path file;
  for (const auto& e : fs::directory_iterator(ckpt_dir)) {
    if (e.path().extension() == ".ckpt")
      file = e.path();
  }
  ASSERT_FALSE(file.empty());
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(file) - 100));
    const char byte = 0x5a;
    f.write(&byte, 1);
  }
  const TrainRun bad = train(
      {.family = "gpt"},
      {.extra = "--resume", .steps = 4, .dir = "corrupt", .fresh = false, .expect_success = false});
  EXPECT_EQ(bad.code, 2) << bad.output;
  EXPECT_NE(bad.output.find("CRC"), std::string::npos) << bad.output;
  // Unknown backend, no steps.
  EXPECT_EQ(shell(fmt::format("{} train --model {} --plan {} --steps 0", PARALLAX_BINARY, model,
                              plan.string()))
                .code,
            2);
}

// Training on a uint16 token file (nanoGPT format) sharded over data-parallel ranks gives the
// same result as one process reading it.
TEST(TrainData, TokenFileShardedByDataParallelRank) {
  const fs::path file = work_dir() / "tokens.bin";
  {
    std::ofstream out(file, std::ios::binary);
    for (int i = 0; i < 20000; ++i) {
      const auto token = static_cast<std::uint16_t>((i * 7 + i / 13) % 256);
      out.write(reinterpret_cast<const char*>(&token), sizeof token);
    }
  }
  const std::string data = "--data " + file.string();
  const TrainRun one = train({.family = "llama"}, {.extra = data, .dir = "bin-1"});
  const TrainRun four =
      train({.family = "llama", .dp = 4, .zero = 2}, {.extra = data, .dir = "bin-4"});
  expect_same_training(four, one, 1e-5);
  EXPECT_LT(one.steps.back()["loss"].get<double>(), one.steps.front()["loss"].get<double>());
}

// --trace writes the last step's measured timeline: every rank, compute and communication
// streams, in the simulator's Chrome-trace format.
TEST(TrainTrace, WritesMeasuredTimelineOfEveryRank) {
  const fs::path trace = work_dir() / "trace.json";
  const TrainRun r = train({.family = "gpt", .dp = 2, .tp = 2, .pp = 2, .sp = true},
                           {.extra = "--trace " + trace.string(), .steps = 2, .dir = "trace"});
  ASSERT_EQ(r.code, 0);
  const parallax::Timeline t =
      parallax::timeline_from_chrome_trace(parallax::json_load_file(trace), trace.string());
  std::set<int> ranks;
  std::set<parallax::Category> categories;
  for (const parallax::Event& e : t.events) {
    ranks.insert(e.rank);
    categories.insert(e.category);
    EXPECT_LE(e.start_s, e.end_s);
  }
  EXPECT_EQ(ranks.size(), 8u);
  for (auto c :
       {parallax::Category::forward, parallax::Category::backward, parallax::Category::tp_comm,
        parallax::Category::pp_comm, parallax::Category::dp_comm, parallax::Category::optimizer}) {
    EXPECT_TRUE(categories.contains(c)) << parallax::category_name(c);
  }
  ASSERT_EQ(t.peak_memory_bytes.size(), 8u);
  for (auto b : t.peak_memory_bytes)
    EXPECT_GT(b, 0);
  // The per-step JSON reports the largest rank's peak.
  EXPECT_EQ(r.steps.back()["peak_memory_bytes"].get<std::int64_t>() > 0, true);
}

} // namespace
