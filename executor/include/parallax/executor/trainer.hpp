// The trainer: runs a Plan for real on this process's rank — pipeline schedule, tensor- and
// sequence-parallel layers, data-parallel gradient buckets overlapped with backward, ZeRO 0–3,
// recomputation, AdamW with clipping and a warm-up + cosine learning rate, checkpoints.
#pragma once

#include "parallax/core/plan.hpp"
#include "parallax/core/timeline.hpp"
#include "parallax/executor/checkpoint.hpp"
#include "parallax/executor/comm.hpp"
#include "parallax/executor/data.hpp"
#include "parallax/executor/model.hpp"

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace parallax {

struct TrainOptions {
  std::int64_t steps = 20;        // train until this many optimizer steps are done
  std::uint64_t seed = 1;         // initial weights and synthetic data
  double lr = 1e-3;               // peak learning rate
  double min_lr_ratio = 0.1;      // cosine decays to lr · min_lr_ratio
  std::int64_t warmup_steps = -1; // < 0: steps / 10
  std::int64_t decay_steps = -1;  // cosine horizon; < 0: steps
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double clip_grad_norm = 1.0; // <= 0: no clipping
  std::string data_path;       // empty: synthetic tokens
  std::chrono::duration<double> comm_timeout{300.0};
  double peak_flops_per_rank = 0; // MFU denominator (the cluster profile's device peak)
};

struct StepStats {
  std::int64_t step = 0; // optimizer steps done after this one
  double loss = 0;
  double grad_norm = 0; // before clipping
  double lr = 0;
  double step_time_s = 0; // slowest rank
  double tokens_per_s = 0;
  double mfu = 0;
  std::int64_t peak_memory_bytes = 0; // largest rank, executor's own accounting
  // The asynchronous parameter server: the most steps any worker's parameters lagged in this
  // step (−1: a synchronous plan).
  int staleness = -1;
};

// Checks a plan for training on `world_size` processes: dp·tp·pp equal to the process count,
// then the one feasibility rule (plan_validate on the model's layer graph) — the planner
// proposes only plans that pass it. Throws InputError naming `plan_source`. The CLI calls it on
// every rank before any communicator exists.
void trainer_check_plan(const ExecModel& model, const Plan& plan, int world_size,
                        const std::string& plan_source);

class Trainer {
public:
  // What every backend's trainer implements (TrainerCore<Backend> in detail/trainer_core.hpp).
  class Impl {
  public:
    virtual ~Impl() = default;
    virtual StepStats step(bool record) = 0;
    virtual std::int64_t steps_done() const = 0;
    virtual Checkpoint checkpoint() = 0;
    virtual void restore(const Checkpoint& ckpt, const std::string& source) = 0;
    virtual Timeline timeline() = 0;
    virtual std::vector<StepStats> finished_steps() = 0;
    virtual void drain() = 0;
  };

  // The CPU backend (Eigen ops on host memory, MPI). Collective over MPI_COMM_WORLD, whose
  // size must equal plan.world_size(). plan.stages must be filled (the CLI assigns the
  // planner's balanced partition when the plan file has none).
  Trainer(const ExecModel& model, const Plan& plan, const TrainOptions& options,
          const std::string& plan_source);
  // Another backend's trainer (cuda::make_trainer).
  explicit Trainer(std::unique_ptr<Impl> impl);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // One optimizer step (collective). When `record` is set, this step's measured events are
  // kept for timeline().
  StepStats step(bool record = false);
  std::int64_t steps_done() const;

  // Collective: the logical, plan-independent state, complete on world rank 0 (empty
  // elsewhere). Checkpoints do not depend on the backend that wrote them.
  Checkpoint checkpoint();
  // Collective: restore from a checkpoint of the same model (any plan it was written under).
  void restore(const Checkpoint& ckpt, const std::string& source);

  // Collective: the recorded step's events of every rank, on world rank 0.
  Timeline timeline();

  // The steps whose figures (every rank's loss, the gradient norm) are complete since the
  // last call, in order, on world rank 0: the step just done, or under the asynchronous
  // parameter server each step once the servers have applied it (possibly none, possibly
  // several). Empty on the other ranks.
  std::vector<StepStats> finished_steps();
  // Collective: waits until every rank's steps are applied and every rank holds the newest
  // parameters (a no-op for synchronous plans); call before the end of a run.
  void drain();

private:
  std::unique_ptr<Impl> impl_;
};

} // namespace parallax
