// AdamW, element for element the CPU trainer's update (see adamw.hpp).
#include "parallax/executor/cuda/adamw.hpp"

#include "kernel_utils.cuh"

#include <cuda_bf16.h>

#include <cmath>

namespace parallax::cuda {

namespace {

// The float factors of one step, computed as trainer.cpp computes them.
struct AdamWFactors {
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float clip;
  float step_size;    // lr / (1 − β1^t)
  float inv_sqrt_bc2; // 1 / sqrt(1 − β2^t)
  float eps;
  float keep; // 1 − lr·wd
};

// Every operation rounded on its own (__f*_rn never fuse into an FMA), matching the CPU
// build's -ffp-contract=off.
__global__ void adamw_kernel(float* p, const float* grad, float* m1, float* m2,
                             __nv_bfloat16* p_bf16, AdamWFactors f, std::int64_t n) {
  for (std::int64_t i = detail::global_thread(); i < n; i += detail::grid_threads()) {
    const float g = __fmul_rn(grad[i], f.clip);
    const float a = __fadd_rn(__fmul_rn(f.beta1, m1[i]), __fmul_rn(f.one_minus_beta1, g));
    const float b =
        __fadd_rn(__fmul_rn(f.beta2, m2[i]), __fmul_rn(__fmul_rn(f.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(b), f.inv_sqrt_bc2), f.eps);
    const float update = __fdiv_rn(__fmul_rn(f.step_size, a), denom);
    const float value = __fsub_rn(__fmul_rn(p[i], f.keep), update);
    m1[i] = a;
    m2[i] = b;
    p[i] = value;
    if (p_bf16 != nullptr)
      p_bf16[i] = __float2bfloat16_rn(value);
  }
}

} // namespace

void adamw_update(DeviceView params, DeviceView grads, DeviceView exp_avg, DeviceView exp_avg_sq,
                  DeviceView params_bf16, const AdamWParams& hyper, cudaStream_t stream) {
  const std::int64_t rows = params.rows;
  const std::int64_t cols = params.cols;
  detail::check_view(params, rows, cols, DType::f32, "adamw parameters");
  detail::check_view(grads, rows, cols, DType::f32, "adamw gradients");
  detail::check_view(exp_avg, rows, cols, DType::f32, "adamw first moment");
  detail::check_view(exp_avg_sq, rows, cols, DType::f32, "adamw second moment");
  if (params_bf16)
    detail::check_view(params_bf16, rows, cols, DType::bf16, "adamw bf16 parameters");
  PARALLAX_CHECK(hyper.step >= 1, "adamw step counts from 1");
  if (params.size() == 0)
    return;
  const ops::AdamwStep step = ops::adamw_step(hyper); // the CPU update's rounding
  AdamWFactors f{};
  f.beta1 = step.beta1;
  f.beta2 = step.beta2;
  f.one_minus_beta1 = 1.0f - f.beta1;
  f.one_minus_beta2 = 1.0f - f.beta2;
  f.clip = step.clip;
  f.step_size = step.step_size;
  f.inv_sqrt_bc2 = step.inv_sqrt_bc2;
  f.eps = step.eps;
  f.keep = step.keep;
  constexpr int kBlock = 256;
  adamw_kernel<<<detail::grid_for(params.size(), kBlock), kBlock, 0, stream>>>(
      params.f32(), grads.f32(), exp_avg.f32(), exp_avg_sq.f32(),
      params_bf16 ? reinterpret_cast<__nv_bfloat16*>(params_bf16.bf16_bits()) : nullptr, f,
      params.size());
  detail::check_launch();
}

} // namespace parallax::cuda
