// What the cost model (and later the simulator) predicts for one plan.
#pragma once

#include "parallax/core/json_reader.hpp"
#include "parallax/core/plan.hpp"

#include <string>

namespace parallax {

// Memory of the most loaded rank, in bytes, at three levels: what the training code allocates
// (torch.cuda.max_memory_allocated), what the stack's caching allocator reserves for it
// (max_memory_reserved), and what the device holds in all (nvidia-smi: plus the CUDA context and
// the communicators' buffers). The planner prunes by the last.
struct MemoryBreakdown {
  double params = 0; // working weights
  double grads = 0;
  double optimizer = 0;   // fp32 master weights (mixed precision) and Adam's two moments
  double activations = 0; // kept for backward, times the micro-batches in flight
  double buffers = 0;     // ZeRO-3 gathered layers, FP8 weight workspaces
  double allocator = 0;   // the caching allocator's rounding and fragmentation
  double runtime = 0;     // CUDA context and communicator buffers, outside the allocator
  double allocated() const { return params + grads + optimizer + activations + buffers; }
  double reserved() const { return allocated() + allocator; }
  double total() const { return reserved() + runtime; } // the device's view
  bool operator==(const MemoryBreakdown&) const = default;
};

// Where one iteration's time goes on the critical path, in seconds.
struct TimeBreakdown {
  double compute = 0;   // forward, backward and recomputation
  double tp_comm = 0;   // tensor-parallel collectives (never overlapped)
  double pp_comm = 0;   // pipeline sends and receives
  double dp_comm = 0;   // data-parallel / ZeRO communication not hidden behind compute
  double bubble = 0;    // pipeline fill and drain
  double optimizer = 0; // the optimizer step
  double total() const { return compute + tp_comm + pp_comm + dp_comm + bubble + optimizer; }
  bool operator==(const TimeBreakdown&) const = default;
};

struct PlanEstimate {
  Plan plan;
  double iteration_time_s = 0;
  double tokens_per_s = 0;
  double tflops_per_gpu = 0; // model FLOPs (recomputation not counted) per GPU per second
  double mfu = 0;            // tflops_per_gpu over the device's peak for the plan's precision
  MemoryBreakdown memory;
  double memory_capacity_bytes = 0; // the device's memory; fits when memory.total() is within it
  bool fits = false;
  TimeBreakdown breakdown;
  std::string bottleneck; // the largest share of the iteration ("compute", "dp_comm", ...)
  std::string stack;      // the software stack the figures assume
  // The asynchronous parameter server: the steps a worker's parameters lag in the steady
  // state (0 for every other plan).
  double staleness = 0;
  bool operator==(const PlanEstimate&) const = default;
};

// The figures of the CLI contract (`simulate --json`, one entry of `plan --json`).
Json estimate_to_json(const PlanEstimate& estimate);

} // namespace parallax
