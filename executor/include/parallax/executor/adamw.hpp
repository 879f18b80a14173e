// AdamW's per-step factors, shared by the CPU update (ops::adamw_update) and the device update
// (cuda::adamw_update): the trainer states a step in doubles (AdamwHyper), adamw_step rounds it
// to the floats both updates use, so the two backends agree to the bit. No Eigen here: the CUDA
// sources include it.
#pragma once

#include <cstdint>

namespace parallax::ops {

// g' = clip·g, m1 = β1·m1 + (1 − β1)·g', m2 = β2·m2 + (1 − β2)·g'²,
// p = keep·p − step_size·m1 / (√m2 · inv_sqrt_bc2 + eps), with keep = 1 − lr·weight_decay
// and the bias corrections folded into step_size = lr / (1 − β1ᵗ), inv_sqrt_bc2 = 1/√(1 − β2ᵗ).
struct AdamwStep {
  float beta1, beta2, clip, keep, step_size, inv_sqrt_bc2, eps;
};

struct AdamwHyper {
  double lr = 0.0;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  std::int64_t step = 1;  // t of the bias corrections, 1-based
  double clip_coef = 1.0; // gradient multiplier from global-norm clipping
  bool decay = true;      // decoupled weight decay (matrices) or none (norms, biases)
};

AdamwStep adamw_step(const AdamwHyper& h);

} // namespace parallax::ops
