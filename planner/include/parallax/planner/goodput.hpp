// Goodput under failures: what a plan trains per second once checkpoints and the work lost to
// failed GPUs are paid for (plan --objective goodput --gpu-mtbf-hours H).
//
// A job on n GPUs, each failing on average every H hours with its share of the host, fails
// every M = 3600·H / n seconds. It checkpoints every τ seconds, each checkpoint stalling
// training for C seconds (the write; with asynchronous checkpointing only the copy to host
// memory), and a failure costs the restart R (relaunch, plus loading the checkpoint) and on
// average half a period of work. The interval that maximises the useful fraction is Young's
// √(2·C·M), refined by Daly (2006) for C comparable to M; the fraction is
//     τ / (τ + C) · (1 − (R + (τ + C) / 2) / M),
// and goodput is the plan's tokens/s times it. Pure: no clocks, files or globals.
#pragma once

#include <string>

#include "parallax/core/cluster.hpp"
#include "parallax/core/plan.hpp"
#include "parallax/core/stack.hpp"

namespace parallax {

struct CheckpointCost {
  double bytes = 0;      // model state: weights and optimizer state of every parameter
  double write_s = 0;    // to storage, every writer in parallel
  double blocking_s = 0; // the stall training sees (write_s, or the host copy when async)
  double load_s = 0;     // reading it back at a restart
  double restart_s = 0;  // relaunch overhead plus load_s
};

struct Goodput {
  double job_mtbf_s = 0;
  double interval_s = 0; // between checkpoints, whole steps
  double efficiency = 0; // useful fraction of wall-clock time, in [0, 1]
  double goodput_tokens_per_s = 0;
  double lost_per_failure_s = 0; // restart plus the expected half period
  CheckpointCost checkpoint;
};

// Young's interval √(2·C·M), and Daly's higher-order one (M when C >= 2M).
double young_interval_s(double checkpoint_s, double mtbf_s);
double daly_interval_s(double checkpoint_s, double mtbf_s);
// The useful fraction with checkpoint period τ, stall C, restart R and job MTBF M.
double checkpoint_efficiency(double interval_s, double checkpoint_s, double restart_s,
                             double mtbf_s);

// The checkpoint of `params` parameters trained with `plan` on `gpus` of `cluster`'s devices.
CheckpointCost checkpoint_cost(double params, const Plan& plan, const Cluster& cluster,
                               const Stack& stack, int gpus);
// Goodput of a plan stepping every `step_s` at `tokens_per_s`.
Goodput goodput_of(double params, const Plan& plan, const Cluster& cluster, const Stack& stack,
                   int gpus, double step_s, double tokens_per_s, double gpu_mtbf_hours);

// What failures cost a plan, in a few lines for --explain.
std::string goodput_explain(const Goodput& g, double tokens_per_s);

} // namespace parallax
