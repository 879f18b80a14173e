#include "parallax/core/pipeline_schedule.hpp"

#include "parallax/core/error.hpp"

#include <algorithm>

namespace parallax {

namespace {

// Virtual step k of an interleaved schedule → (global chunk, micro-batch).
PipelineOp interleaved_op(int k, bool forward, int pp, int v, int pp_rank) {
  const int local = (k / pp) % v;
  const int local_chunk = forward ? local : v - 1 - local;
  const int mb = (k / (pp * v)) * pp + k % pp;
  return {forward, local_chunk * pp + pp_rank, mb};
}

} // namespace

std::vector<PipelineOp> pipeline_schedule(const Plan& plan, int pp_rank) {
  PARALLAX_CHECK(pp_rank >= 0 && pp_rank < plan.pp, "pipeline rank out of range");
  const int m = static_cast<int>(plan.num_microbatches());
  const int pp = plan.pp;
  const int v = plan.virtual_stages;
  std::vector<PipelineOp> ops;
  ops.reserve(static_cast<std::size_t>(2 * m * v));
  if (plan.schedule == Schedule::gpipe) {
    for (int mb = 0; mb < m; ++mb) {
      ops.push_back({true, pp_rank, mb});
    }
    for (int mb = 0; mb < m; ++mb) {
      ops.push_back({false, pp_rank, mb});
    }
    return ops;
  }
  if (plan.schedule == Schedule::one_f_one_b) {
    const int warmup = std::min(pp - pp_rank - 1, m);
    int next_f = 0;
    int next_b = 0;
    for (; next_f < warmup; ++next_f) {
      ops.push_back({true, pp_rank, next_f});
    }
    while (next_f < m) {
      ops.push_back({true, pp_rank, next_f++});
      ops.push_back({false, pp_rank, next_b++});
    }
    while (next_b < m) {
      ops.push_back({false, pp_rank, next_b++});
    }
    return ops;
  }
  PARALLAX_CHECK(m % pp == 0, "interleaving needs micro-batches divisible by pp");
  const int total = m * v;
  const int warmup = std::min(2 * (pp - pp_rank - 1) + (v - 1) * pp, total);
  int next_f = 0;
  int next_b = 0;
  for (; next_f < warmup; ++next_f) {
    ops.push_back(interleaved_op(next_f, true, pp, v, pp_rank));
  }
  while (next_f < total) {
    ops.push_back(interleaved_op(next_f++, true, pp, v, pp_rank));
    ops.push_back(interleaved_op(next_b++, false, pp, v, pp_rank));
  }
  while (next_b < total) {
    ops.push_back(interleaved_op(next_b++, false, pp, v, pp_rank));
  }
  return ops;
}

} // namespace parallax
