// The discrete-event simulation of one training iteration: what `parallax simulate` and the
// planner's final ranking use.
//
// Every pipeline rank runs its schedule (GPipe, 1F1B, interleaved) op by op: per unit (block)
// a forward or backward compute task, its tensor-parallel collective, recomputation where the
// plan asks, pipeline sends between stages, data-parallel gradient buckets launched as the last
// backward produces them (ZeRO-2/3 reduce-scatter each micro-batch, ZeRO-3 all-gathers
// prefetched one unit ahead), and the optimizer step. Each rank has a compute stream and one
// stream per communicator; its intra-node and network links are shared fairly between the
// flows that overlap on them, so contention shows up in step time.
//
// Symmetry: data-parallel replicas and tensor-parallel peers run identical programs, so by
// default one representative rank per pipeline stage is simulated (pp ranks, not dp·tp·pp);
// `symmetric = false` simulates every rank with explicit group synchronisation and gives the
// same answer, which the tests check.
#pragma once

#include "parallax/core/timeline.hpp"
#include "parallax/simulator/cost_model.hpp"

namespace parallax {

struct SimulationOptions {
  bool symmetric = true;
  bool record_timeline = true;
};

struct SimulationResult {
  PlanEstimate estimate; // figures and breakdown taken from the simulated timeline
  Timeline timeline;     // empty unless record_timeline; peak memory for every rank of the plan
  std::vector<double> stage_peak_bytes; // peak memory of one rank of each pipeline stage
  std::int64_t events = 0;
  std::int64_t tasks = 0;
  int simulated_ranks = 0;
};

SimulationResult simulate_iteration(CostModel& model, const Plan& plan,
                                    const SimulationOptions& options = {});

} // namespace parallax
