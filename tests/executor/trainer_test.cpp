// The trainer in-process on one rank (MPI singleton): recomputation and ZeRO stages leave the
// numbers unchanged, checkpoints restore exactly, the learning-rate schedule, memory accounting,
// measured events and input errors.
#include <gtest/gtest.h>

#include "parallax/core/error.hpp"
#include "parallax/core/plan.hpp"
#include "parallax/core/step_program.hpp"
#include "parallax/executor/trainer.hpp"
#include "parallax/models/model_loader.hpp"

#include <cmath>
#include <map>

namespace parallax {
namespace {

ExecModel tiny(const std::string& name) {
  static const bool mpi = [] {
    MpiRuntime::init(nullptr, nullptr);
    return true;
  }();
  (void)mpi;
  LoadedModel m = model_load(name);
  return ExecModel::from_config(*m.config, m.source);
}

Plan one_rank(Recompute rc = Recompute::none, int zero = 0, std::int64_t micro = 2) {
  Plan p;
  p.micro_batch_size = micro;
  p.global_batch_size = 4;
  p.recompute = rc;
  p.zero_stage = zero;
  p.precision = Precision::fp32;
  p.stages = {{0, 2}};
  return p;
}

TrainOptions options() {
  TrainOptions o;
  o.steps = 4;
  o.seed = 3;
  o.lr = 2e-3;
  o.warmup_steps = 1;
  return o;
}

std::vector<StepStats> run(const ExecModel& m, const Plan& p, int steps = 4) {
  Trainer t(m, p, options(), "plan");
  std::vector<StepStats> out;
  for (int i = 0; i < steps; ++i)
    out.push_back(t.step());
  return out;
}

TEST(Trainer, RecomputationAndZeroDoNotChangeTheNumbers) {
  for (const char* name : {"gpt-tiny", "llama-tiny"}) {
    SCOPED_TRACE(name);
    const ExecModel m = tiny(name);
    const auto base = run(m, one_rank());
    ASSERT_EQ(base.size(), 4u);
    EXPECT_LT(base.back().loss, base.front().loss);
    EXPECT_NEAR(base.front().loss, std::log(256.0), 0.1); // untrained: ≈ ln(vocab)
    for (const Plan& p : {one_rank(Recompute::selective), one_rank(Recompute::full)}) {
      const auto other = run(m, p);
      for (std::size_t i = 0; i < base.size(); ++i) {
        // Recomputation repeats the same operations in the same order: identical to the bit.
        EXPECT_EQ(other[i].loss, base[i].loss) << i;
        EXPECT_EQ(other[i].grad_norm, base[i].grad_norm) << i;
      }
    }
    // ZeRO-3 adds each micro-batch's gradient into its shard instead of accumulating inside
    // the GEMM, so rounding differs in the last bits.
    const auto zero3 = run(m, one_rank(Recompute::none, 3));
    for (std::size_t i = 0; i < base.size(); ++i) {
      EXPECT_NEAR(zero3[i].loss, base[i].loss, 1e-6 * base[i].loss) << i;
      EXPECT_NEAR(zero3[i].grad_norm, base[i].grad_norm, 1e-5 * base[i].grad_norm) << i;
    }
  }
}

TEST(Trainer, FullRecomputationKeepsLessMemory) {
  const ExecModel m = tiny("gpt-tiny");
  const auto none = run(m, one_rank(Recompute::none, 0, 4), 1);
  const auto full = run(m, one_rank(Recompute::full, 0, 4), 1);
  EXPECT_LT(full[0].peak_memory_bytes, none[0].peak_memory_bytes);
  EXPECT_GT(full[0].peak_memory_bytes, 0);
}

TEST(Trainer, CheckpointRestoresExactly) {
  const ExecModel m = tiny("llama-tiny");
  Trainer a(m, one_rank(), options(), "plan");
  a.step();
  a.step();
  const Checkpoint ck = a.checkpoint();
  EXPECT_EQ(ck.step, 2);
  EXPECT_EQ(ck.samples, 8);
  EXPECT_EQ(ck.model, "llama-tiny");
  const StepStats next = a.step();
  // Another plan (ZeRO-3, full recomputation, micro-batch 1) resumes from the same state.
  Trainer b(m, one_rank(Recompute::full, 3, 1), options(), "plan");
  b.restore(ck, "ckpt");
  EXPECT_EQ(b.steps_done(), 2);
  const StepStats again = b.step();
  EXPECT_NEAR(again.loss, next.loss, 1e-6 * next.loss);
  EXPECT_NEAR(again.grad_norm, next.grad_norm, 1e-5 * next.grad_norm);
  EXPECT_EQ(again.lr, next.lr);
}

TEST(Trainer, RestoreRejectsAnotherModelOrMissingTensor) {
  const ExecModel m = tiny("gpt-tiny");
  Trainer a(m, one_rank(), options(), "plan");
  Checkpoint ck = a.checkpoint();
  ck.model = "llama-tiny";
  EXPECT_THROW(a.restore(ck, "ckpt"), InputError);
  ck.model = "gpt-tiny";
  ck.tensors.pop_back();
  EXPECT_THROW(a.restore(ck, "ckpt"), InputError);
}

TEST(Trainer, WarmupThenCosineLearningRate) {
  const ExecModel m = tiny("gpt-tiny");
  TrainOptions o = options();
  o.steps = 10;
  o.warmup_steps = 2;
  o.min_lr_ratio = 0.1;
  Trainer t(m, one_rank(), o, "plan");
  std::vector<double> lr;
  for (int i = 0; i < 10; ++i)
    lr.push_back(t.step().lr);
  EXPECT_DOUBLE_EQ(lr[0], 1e-3); // warm-up: lr · (step + 1) / warmup
  EXPECT_DOUBLE_EQ(lr[1], 2e-3);
  EXPECT_DOUBLE_EQ(lr[2], 2e-3); // cosine starts at the peak
  for (int i = 3; i < 10; ++i)
    EXPECT_LT(lr[i], lr[i - 1]);
  const double progress = 7.0 / 8.0; // step 9 of an 8-step cosine after warm-up
  EXPECT_NEAR(lr[9], 2e-4 + 0.5 * (2e-3 - 2e-4) * (1 + std::cos(M_PI * progress)), 1e-12);
}

TEST(Trainer, RecordsMeasuredEvents) {
  const ExecModel m = tiny("gpt-tiny");
  for (const Recompute rc : {Recompute::none, Recompute::full}) {
    const Plan plan = one_rank(rc);
    Trainer t(m, plan, options(), "plan");
    t.step(true);
    const Timeline tl = t.timeline();
    // One event per op of the step program, named after it, in program order.
    const StepProgram program = step_program(plan, {.units = m.config.num_layers}, 0);
    std::vector<std::string> names;
    for (const Event& e : tl.events) {
      EXPECT_GE(e.end_s, e.start_s);
      names.push_back(e.name);
    }
    std::vector<std::string> expected;
    for (const StepOp& op : program.ops)
      expected.push_back(op.name());
    // 2 micro-batches × 2 units forward and backward (+ recomputation), the optimizer.
    EXPECT_EQ(expected.size(), rc == Recompute::full ? 13u : 9u);
    EXPECT_EQ(names, expected);
    ASSERT_EQ(tl.peak_memory_bytes.size(), 1u);
    EXPECT_GT(tl.peak_memory_bytes[0], 0);
  }
}

TEST(Trainer, PlanForAnotherWorldSizeIsAnInputError) {
  const ExecModel m = tiny("gpt-tiny");
  Plan p = one_rank();
  p.dp = 2;
  EXPECT_THROW(Trainer(m, p, options(), "plan.json"), InputError);
}

TEST(ExecModel, RejectsModelsItCannotTrain) {
  LoadedModel bert = model_load("bert-large");
  EXPECT_THROW(ExecModel::from_config(*bert.config, bert.source), InputError);
}

TEST(ExecModel, LogicalParametersMatchTheModelsParameterCount) {
  for (const char* name : {"gpt-tiny", "llama-tiny", "gpt2-124m"}) {
    LoadedModel m = model_load(name);
    const ExecModel e = ExecModel::from_config(*m.config, m.source);
    std::int64_t total = 0;
    for (const ParamInfo& p : logical_params(e))
      total += p.rows * p.cols;
    EXPECT_EQ(total, m.graph.total_params()) << name;
  }
}

// Expert parallelism: an EP rank's experts blocks hold only its E / ep experts, padded for
// the dp / ep ranks holding them; over the EP and TP ranks they tile every expert once.
TEST(ExecModel, ExpertsBlocksSplitTheExpertsOverEpRanks) {
  LoadedModel m = model_load("moe-tiny");
  const ExecModel e = ExecModel::from_config(*m.config, m.source);
  const int layers = e.config.num_layers;
  for (int tp : {1, 2}) {
    for (int ep : {1, 2, 4}) {
      std::map<std::string, std::int64_t> covered;
      for (int r = 0; r < ep; ++r) {
        for (int t = 0; t < tp; ++t) {
          for (const BlockLayout& b : chunk_layout(e, {0, layers}, tp, t, 8, ep, r)) {
            if (b.kind == BlockKind::experts) {
              EXPECT_EQ(b.padded % (8 / ep), 0);
              EXPECT_EQ(b.params.size(),
                        3u * static_cast<std::size_t>(e.config.moe.num_experts / ep));
            } else if (r > 0) {
              continue; // the same on every EP rank
            }
            for (const ParamInfo& p : b.params) {
              if (p.split == ShardDim::none && t > 0)
                continue;
              covered[p.name] += p.local_size();
            }
          }
        }
      }
      for (const ParamInfo& p : logical_params(e))
        EXPECT_EQ(covered[p.name], p.rows * p.cols) << p.name << " tp " << tp << " ep " << ep;
    }
  }
}

TEST(ExecModel, ShardsTileTheLogicalTensorsExactly) {
  LoadedModel m = model_load("llama-tiny");
  const ExecModel e = ExecModel::from_config(*m.config, m.source);
  for (int tp : {1, 2}) {
    std::map<std::string, std::int64_t> covered;
    for (int r = 0; r < tp; ++r) {
      for (const BlockLayout& b : chunk_layout(e, {0, 2}, tp, r, 3)) {
        EXPECT_EQ(b.padded % 3, 0);
        EXPECT_GE(b.padded, b.numel);
        for (const ParamInfo& p : b.params) {
          if (p.split == ShardDim::none && r > 0)
            continue;
          covered[p.name] += p.local_size();
        }
      }
    }
    for (const ParamInfo& p : logical_params(e))
      EXPECT_EQ(covered[p.name], p.rows * p.cols) << p.name;
  }
}

} // namespace
} // namespace parallax
