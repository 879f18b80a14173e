// The order in which one pipeline rank runs forward and backward passes of its micro-batches
// and model chunks — shared by the simulator and the executor so both run the same schedule.
//
//   GPipe:       all forwards, then all backwards.
//   1F1B:        min(p − r − 1, m) warm-up forwards, then one forward / one backward, then the
//                remaining backwards (Narayanan et al. 2021, PipeDream-Flush).
//   interleaved: the same over m·v virtual micro-steps with 2·(p − r − 1) + (v − 1)·p warm-up
//                steps; virtual step k runs chunk (k / p) mod v (reversed for backwards) of
//                micro-batch (k / (p·v))·p + k mod p (Megatron-LM).
#pragma once

#include "parallax/core/plan.hpp"

#include <vector>

namespace parallax {

struct PipelineOp {
  bool forward = true;
  int chunk = 0; // model chunk index in [0, pp·v): chunk = local_chunk·pp + pp_rank
  int micro_batch = 0;
  bool operator==(const PipelineOp&) const = default;
};

// The ops of pipeline rank `pp_rank`, in execution order: m·v forwards and m·v backwards.
std::vector<PipelineOp> pipeline_schedule(const Plan& plan, int pp_rank);

} // namespace parallax
