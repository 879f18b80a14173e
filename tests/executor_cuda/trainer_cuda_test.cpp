// The CUDA trainer against the CPU trainer on one rank: the same plan, seed and data give the
// same losses and gradient norms step for step (fp32 GEMMs: within fp32 reordering error), for
// GPT and Llama, with recomputation and every ZeRO stage; checkpoints move between the backends
// both ways; bf16 mixed precision tracks fp32; memory is accounted; a recorded step has its
// events. Skips itself without a device.
#include "parallax/executor/cuda/device.hpp"
#include "parallax/executor/cuda/trainer.hpp"
#include "parallax/models/model_loader.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace parallax::cuda {
namespace {

#define SKIP_WITHOUT_GPU()                                                                         \
  if (!gpu_available())                                                                            \
  GTEST_SKIP() << "no CUDA device: the CUDA trainer is compiled but cannot run here; run "         \
                  "`ctest -L gpu` on a GPU machine"

ExecModel tiny(const std::string& name) {
  MpiRuntime::init(nullptr, nullptr);
  LoadedModel m = model_load(name);
  return ExecModel::from_config(*m.config, m.source);
}

Plan one_rank(Recompute rc = Recompute::none, int zero = 0) {
  Plan p;
  p.micro_batch_size = 2;
  p.global_batch_size = 4;
  p.recompute = rc;
  p.zero_stage = zero;
  p.precision = Precision::fp32;
  p.stages = {{0, 2}};
  return p;
}

TrainOptions options() {
  TrainOptions o;
  o.steps = 6;
  o.seed = 5;
  o.lr = 2e-3;
  o.warmup_steps = 1;
  return o;
}

std::vector<StepStats> run(Trainer& t, int steps) {
  std::vector<StepStats> out;
  for (int i = 0; i < steps; ++i)
    out.push_back(t.step());
  return out;
}

// fp32 on both sides; the device sums in other orders (GEMM tiling, block reductions), so the
// runs agree to float rounding amplified over a few optimizer steps.
void expect_same_run(const std::vector<StepStats>& cuda, const std::vector<StepStats>& cpu) {
  ASSERT_EQ(cuda.size(), cpu.size());
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    SCOPED_TRACE("step " + std::to_string(i + 1));
    EXPECT_NEAR(cuda[i].loss, cpu[i].loss, 2e-4 * std::abs(cpu[i].loss));
    EXPECT_NEAR(cuda[i].grad_norm, cpu[i].grad_norm, 2e-3 * cpu[i].grad_norm + 1e-6);
    EXPECT_DOUBLE_EQ(cuda[i].lr, cpu[i].lr);
  }
}

TEST(CudaTrainer, MatchesTheCpuTrainerStepForStep) {
  SKIP_WITHOUT_GPU();
  for (const char* name : {"gpt-tiny", "llama-tiny"}) {
    const ExecModel m = tiny(name);
    Trainer cpu(m, one_rank(), options(), "plan");
    const auto want = run(cpu, 6);
    for (const AttentionKernel kernel : {AttentionKernel::gemm, AttentionKernel::flash}) {
      SCOPED_TRACE(std::string(name) + (kernel == AttentionKernel::gemm ? " gemm" : " flash"));
      const auto cuda = make_trainer(m, one_rank(), options(), "plan",
                                     {.precision = GemmPrecision::f32, .attention = kernel});
      expect_same_run(run(*cuda, 6), want);
    }
  }
}

TEST(CudaTrainer, RecomputationAndZeroStagesMatchTheCpuTrainer) {
  SKIP_WITHOUT_GPU();
  const ExecModel m = tiny("gpt-tiny");
  for (const Recompute rc : {Recompute::selective, Recompute::full}) {
    for (int zero = 0; zero <= 3; ++zero) {
      SCOPED_TRACE(std::string(recompute_name(rc)) + " zero " + std::to_string(zero));
      Trainer cpu(m, one_rank(rc, zero), options(), "plan");
      const auto want = run(cpu, 3);
      const auto cuda =
          make_trainer(m, one_rank(rc, zero), options(), "plan", {.precision = GemmPrecision::f32});
      expect_same_run(run(*cuda, 3), want);
    }
  }
}

TEST(CudaTrainer, Tf32StaysCloseToFp32) {
  SKIP_WITHOUT_GPU();
  const ExecModel m = tiny("gpt-tiny");
  const auto f32 =
      make_trainer(m, one_rank(), options(), "plan", {.precision = GemmPrecision::f32});
  const auto tf32 =
      make_trainer(m, one_rank(), options(), "plan", {.precision = GemmPrecision::tf32});
  const auto a = run(*f32, 4);
  const auto b = run(*tf32, 4);
  for (std::size_t i = 0; i < a.size(); ++i)
    EXPECT_NEAR(b[i].loss, a[i].loss, 1e-2 * a[i].loss); // tf32 keeps 10 mantissa bits
}

TEST(CudaTrainer, CheckpointsMoveBetweenBackends) {
  SKIP_WITHOUT_GPU();
  const ExecModel m = tiny("llama-tiny");
  // CPU for two steps, then both backends continue from its checkpoint.
  Trainer cpu(m, one_rank(), options(), "plan");
  run(cpu, 2);
  const Checkpoint after_cpu = cpu.checkpoint();
  const auto cuda = make_trainer(m, one_rank(Recompute::none, 3), options(), "plan",
                                 {.precision = GemmPrecision::f32});
  cuda->restore(after_cpu, "checkpoint");
  EXPECT_EQ(cuda->steps_done(), 2);
  expect_same_run(run(*cuda, 2), run(cpu, 2));
  // And back: the device's state restored on the CPU continues as the device does.
  const Checkpoint after_cuda = cuda->checkpoint();
  Trainer cpu2(m, one_rank(), options(), "plan");
  cpu2.restore(after_cuda, "checkpoint");
  expect_same_run(run(*cuda, 1), run(cpu2, 1));
}

TEST(CudaTrainer, AccountsDeviceMemoryAndRecordsEvents) {
  SKIP_WITHOUT_GPU();
  const ExecModel m = tiny("gpt-tiny");
  const auto keep_all =
      make_trainer(m, one_rank(), options(), "plan", {.precision = GemmPrecision::f32});
  const auto recompute = make_trainer(m, one_rank(Recompute::full), options(), "plan",
                                      {.precision = GemmPrecision::f32});
  const StepStats a = keep_all->step(true);
  const StepStats b = recompute->step();
  EXPECT_GT(a.peak_memory_bytes, 0);
  EXPECT_LT(b.peak_memory_bytes, a.peak_memory_bytes);
  const Timeline t = keep_all->timeline();
  int forward = 0, backward = 0, optimizer = 0;
  for (const Event& e : t.events) {
    EXPECT_LE(e.start_s, e.end_s);
    forward += e.category == Category::forward;
    backward += e.category == Category::backward;
    optimizer += e.category == Category::optimizer;
  }
  EXPECT_GT(forward, 0);
  EXPECT_GT(backward, 0);
  EXPECT_EQ(optimizer, 1);
}

TEST(CudaTrainer, Bf16MixedPrecisionTracksFp32) {
  SKIP_WITHOUT_GPU();
  for (const char* name : {"gpt-tiny", "llama-tiny"}) {
    SCOPED_TRACE(name);
    const ExecModel m = tiny(name);
    const auto f32 =
        make_trainer(m, one_rank(), options(), "plan", {.precision = GemmPrecision::f32});
    const auto bf16 = make_trainer(m, one_rank(Recompute::full, 3), options(), "plan",
                                   {.precision = GemmPrecision::bf16});
    const auto a = run(*f32, 6);
    const auto b = run(*bf16, 6);
    for (std::size_t i = 0; i < a.size(); ++i) {
      // bf16 keeps 8 significant bits of each GEMM input; the loss of a tiny model moves by
      // a few parts in a thousand, far less than one step's progress.
      EXPECT_NEAR(b[i].loss, a[i].loss, 2e-2 * a[i].loss) << "step " << i + 1;
      EXPECT_NEAR(b[i].grad_norm, a[i].grad_norm, 0.1 * a[i].grad_norm) << "step " << i + 1;
    }
    EXPECT_LT(b.back().loss, b.front().loss); // it trains
  }
}

TEST(CudaTrainer, SelectiveRecomputationOnlyDropsTheProbabilities) {
  SKIP_WITHOUT_GPU();
  const ExecModel m = tiny("llama-tiny");
  const DeviceTrainOptions gemm{.precision = GemmPrecision::f32,
                                .attention = AttentionKernel::gemm};
  const auto keep = make_trainer(m, one_rank(), options(), "plan", gemm);
  const auto selective = make_trainer(m, one_rank(Recompute::selective), options(), "plan", gemm);
  for (int i = 0; i < 3; ++i) {
    const StepStats a = keep->step();
    const StepStats b = selective->step();
    // The recomputed probabilities are the same bits: the same GEMMs on the same inputs.
    EXPECT_EQ(a.loss, b.loss) << "step " << i + 1;
    EXPECT_EQ(a.grad_norm, b.grad_norm) << "step " << i + 1;
    EXPECT_LT(b.peak_memory_bytes, a.peak_memory_bytes) << "step " << i + 1;
  }
}

// Pure host code: runs without a device. What `--attention auto` picks.
TEST(CudaTrainer, AutomaticAttentionKeepsProbabilitiesOnlyWhenTheyFit) {
  MpiRuntime::init(nullptr, nullptr);
  LoadedModel loaded = model_load("gpt2-124m");
  const ExecModel m = ExecModel::from_config(*loaded.config, loaded.source);
  Plan p = one_rank();
  p.micro_batch_size = 16;
  p.global_batch_size = 16;
  p.stages = {{0, m.config.num_layers}};
  // 16 sequences × 12 heads × 1024² fp32 probabilities per layer, 12 layers, one in flight.
  const double per_layer = 4.0 * 16 * 12 * 1024.0 * 1024.0;
  EXPECT_DOUBLE_EQ(attention_probability_bytes(m, p, 0), 12 * per_layer);
  EXPECT_EQ(choose_attention(AttentionKernel::automatic, m, p, 0, 80e9), AttentionKernel::gemm);
  EXPECT_EQ(choose_attention(AttentionKernel::automatic, m, p, 0, 24e9), AttentionKernel::flash);
  EXPECT_EQ(choose_attention(AttentionKernel::gemm, m, p, 0, 1e9), AttentionKernel::gemm);
  p.recompute = Recompute::selective; // one layer's at a time
  EXPECT_DOUBLE_EQ(attention_probability_bytes(m, p, 0), 3 * per_layer);
  EXPECT_EQ(choose_attention(AttentionKernel::automatic, m, p, 0, 24e9), AttentionKernel::gemm);
  // GPipe over two stages keeps every micro-batch's: 6 layers × 4 micro-batches on rank 0.
  p.recompute = Recompute::none;
  p.pp = 2;
  p.global_batch_size = 64;
  p.schedule = Schedule::gpipe;
  p.stages = {{0, 6}, {6, 12}};
  EXPECT_DOUBLE_EQ(attention_probability_bytes(m, p, 0), 6 * 4 * per_layer);
  p.schedule = Schedule::one_f_one_b; // at most the pipeline depth
  EXPECT_DOUBLE_EQ(attention_probability_bytes(m, p, 0), 6 * 2 * per_layer);
}

// Pure host code: runs without a device. The profile `train --backend cuda` divides by.
TEST(CudaDevice, ZooProfileForKnownGpuNames) {
  EXPECT_EQ(zoo_profile_for("NVIDIA H100 80GB HBM3"), "dgx-h100");
  EXPECT_EQ(zoo_profile_for("NVIDIA H200"), "dgx-h200");
  EXPECT_EQ(zoo_profile_for("NVIDIA A100-SXM4-80GB"), "dgx-a100-80g");
  EXPECT_EQ(zoo_profile_for("NVIDIA A100-SXM4-40GB"), "dgx-a100-40g");
  EXPECT_EQ(zoo_profile_for("Tesla V100-SXM3-32GB"), "dgx2-v100");
  EXPECT_EQ(zoo_profile_for("NVIDIA GeForce RTX 4090"), "");
  EXPECT_EQ(zoo_profile_for(""), "");
}

} // namespace
} // namespace parallax::cuda
