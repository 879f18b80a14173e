// AdamW on device: the update of executor/src/trainer.cpp (Trainer's adamw()), element for
// element, on fp32 master weights, optionally writing the bf16 copy the next forward's GEMMs
// read (mixed precision) in the same pass.
//
//   g  = grad · clip_coef
//   m1 = β1·m1 + (1 − β1)·g
//   m2 = β2·m2 + (1 − β2)·g²
//   p  = p·(1 − lr·wd) − (lr / (1 − β1^t)) · m1 / (sqrt(m2) / sqrt(1 − β2^t) + ε)
// with wd = 0 for tensors without decay (norms, biases). The scalar factors are computed in
// double on the host and rounded to float as the CPU trainer does, and the kernel rounds every
// operation separately (no fused multiply-add), so the two backends agree to the bit.
#pragma once

#include "parallax/executor/adamw.hpp"
#include "parallax/executor/cuda/device_tensor.hpp"

#include <cuda_runtime_api.h>

#include <cstdint>

namespace parallax::cuda {

// The step's hyper-parameters, the CPU update's (rounded by ops::adamw_step on both sides).
using AdamWParams = ops::AdamwHyper;

// params, grads, exp_avg, exp_avg_sq: fp32 of one shape; params_bf16: bf16 of that shape or
// absent.
void adamw_update(DeviceView params, DeviceView grads, DeviceView exp_avg, DeviceView exp_avg_sq,
                  DeviceView params_bf16, const AdamWParams& hyper, cudaStream_t stream);

} // namespace parallax::cuda
