// LayerNorm and RMSNorm, forward and backward, with the pre-norm residual add fused in.
//
// One block per row for the row-wise work (statistics, normalisation, dx); a second kernel
// sums dγ and dβ down the columns in a fixed order (no atomics, so results are reproducible).
#include "parallax/executor/cuda/ops.hpp"

#include "kernel_utils.cuh"

namespace parallax::cuda {

namespace {

using detail::block_sum;
using detail::check_view;

constexpr int kRowBlock = 256;
constexpr int kColumnTile = 32;
constexpr int kRowLanes = 8;

// Writes u = x (+ residual) to `sum` when fused and returns the row to normalise, summing u
// (and u² for RMSNorm) on the way. Each thread touches the columns c ≡ threadIdx.x, so later
// passes by the same thread see its own writes.
__device__ inline const float* prepare_row(const float* x, const float* residual, float* sum,
                                           std::int64_t h, float& acc, float& acc_sq) {
  acc = 0.0f;
  acc_sq = 0.0f;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    float v = x[c];
    if (residual != nullptr) {
      v += residual[c];
      sum[c] = v;
    }
    acc += v;
    acc_sq += v * v;
  }
  return residual != nullptr ? sum : x;
}

__global__ void layernorm_forward_kernel(const float* x, const float* residual, float* sum,
                                         const float* gamma, const float* beta, float* y,
                                         float* mean, float* rstd, std::int64_t h, float eps) {
  __shared__ float scratch[detail::kWarpSize];
  const std::int64_t row = blockIdx.x;
  const std::int64_t offset = row * h;
  float acc = 0.0f;
  float unused = 0.0f;
  const float* u = prepare_row(x + offset, residual ? residual + offset : nullptr,
                               sum ? sum + offset : nullptr, h, acc, unused);
  const float inv_h = 1.0f / static_cast<float>(h);
  const float mu = block_sum(acc, scratch) * inv_h;
  float dev = 0.0f;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    const float d = u[c] - mu;
    dev += d * d;
  }
  const float var = block_sum(dev, scratch) * inv_h;
  const float rs = 1.0f / sqrtf(var + eps);
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
  float* yr = y + offset;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x)
    yr[c] = (u[c] - mu) * rs * gamma[c] + beta[c];
}

__global__ void layernorm_backward_kernel(const float* u, const float* gamma, const float* mean,
                                          const float* rstd, const float* dy,
                                          const float* dresidual, float* dx, std::int64_t h) {
  __shared__ float scratch[detail::kWarpSize];
  const std::int64_t row = blockIdx.x;
  const std::int64_t offset = row * h;
  const float mu = mean[row];
  const float rs = rstd[row];
  const float* ur = u + offset;
  const float* dyr = dy + offset;
  float sum_dxhat = 0.0f;
  float sum_dxhat_xhat = 0.0f;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    const float xhat = (ur[c] - mu) * rs;
    const float dxhat = dyr[c] * gamma[c];
    sum_dxhat += dxhat;
    sum_dxhat_xhat += dxhat * xhat;
  }
  const float inv_h = 1.0f / static_cast<float>(h);
  const float mean_dxhat = block_sum(sum_dxhat, scratch) * inv_h;
  const float mean_dxhat_xhat = block_sum(sum_dxhat_xhat, scratch) * inv_h;
  float* dxr = dx + offset;
  const float* dres = dresidual ? dresidual + offset : nullptr;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    const float xhat = (ur[c] - mu) * rs;
    const float dxhat = dyr[c] * gamma[c];
    float g = (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * rs;
    if (dres != nullptr)
      g += dres[c];
    dxr[c] = g;
  }
}

__global__ void rmsnorm_forward_kernel(const float* x, const float* residual, float* sum,
                                       const float* gamma, float* y, float* rstd, std::int64_t h,
                                       float eps) {
  __shared__ float scratch[detail::kWarpSize];
  const std::int64_t row = blockIdx.x;
  const std::int64_t offset = row * h;
  float unused = 0.0f;
  float acc_sq = 0.0f;
  const float* u = prepare_row(x + offset, residual ? residual + offset : nullptr,
                               sum ? sum + offset : nullptr, h, unused, acc_sq);
  const float ms = block_sum(acc_sq, scratch) / static_cast<float>(h);
  const float rs = 1.0f / sqrtf(ms + eps);
  if (threadIdx.x == 0)
    rstd[row] = rs;
  float* yr = y + offset;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x)
    yr[c] = u[c] * rs * gamma[c];
}

__global__ void rmsnorm_backward_kernel(const float* u, const float* gamma, const float* rstd,
                                        const float* dy, const float* dresidual, float* dx,
                                        std::int64_t h) {
  __shared__ float scratch[detail::kWarpSize];
  const std::int64_t row = blockIdx.x;
  const std::int64_t offset = row * h;
  const float rs = rstd[row];
  const float* ur = u + offset;
  const float* dyr = dy + offset;
  float dot = 0.0f;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x)
    dot += dyr[c] * gamma[c] * ur[c];
  dot = block_sum(dot, scratch) / static_cast<float>(h);
  // y = u·rs·γ with rs = (mean u² + eps)^(−1/2): du = rs·dû − u·rs³·mean(dû ⊙ u), dû = dy ⊙ γ.
  const float rs3_dot = rs * rs * rs * dot;
  float* dxr = dx + offset;
  const float* dres = dresidual ? dresidual + offset : nullptr;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    float g = dyr[c] * gamma[c] * rs - ur[c] * rs3_dot;
    if (dres != nullptr)
      g += dres[c];
    dxr[c] = g;
  }
}

// dγ[c] += Σ_r dy[r, c]·û[r, c] and dβ[c] += Σ_r dy[r, c], with û = (u − mean)·rstd
// (mean absent for RMSNorm, dβ absent too). A block owns 32 columns.
__global__ void norm_param_grads_kernel(const float* u, const float* dy, const float* mean,
                                        const float* rstd, float* dgamma, float* dbeta,
                                        std::int64_t rows, std::int64_t h) {
  __shared__ float part_g[kRowLanes][kColumnTile + 1];
  __shared__ float part_b[kRowLanes][kColumnTile + 1];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  float acc_g = 0.0f;
  float acc_b = 0.0f;
  if (c < h) {
    for (std::int64_t r = threadIdx.y; r < rows; r += kRowLanes) {
      const float d = dy[r * h + c];
      const float centred = mean != nullptr ? u[r * h + c] - mean[r] : u[r * h + c];
      acc_g += d * (centred * rstd[r]);
      acc_b += d;
    }
  }
  part_g[threadIdx.y][threadIdx.x] = acc_g;
  part_b[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && c < h) {
    float total_g = 0.0f;
    float total_b = 0.0f;
    for (int i = 0; i < kRowLanes; ++i) {
      total_g += part_g[i][threadIdx.x];
      total_b += part_b[i][threadIdx.x];
    }
    dgamma[c] += total_g;
    if (dbeta != nullptr)
      dbeta[c] += total_b;
  }
}

void launch_param_grads(DeviceView u, DeviceView dy, const float* mean, DeviceView rstd,
                        DeviceView dgamma, float* dbeta, cudaStream_t stream) {
  const dim3 block(kColumnTile, kRowLanes);
  const dim3 grid(static_cast<unsigned>((u.cols + kColumnTile - 1) / kColumnTile));
  norm_param_grads_kernel<<<grid, block, 0, stream>>>(u.f32(), dy.f32(), mean, rstd.f32(),
                                                      dgamma.f32(), dbeta, u.rows, u.cols);
  detail::check_launch();
}

// The optional residual pair of a fused forward: both present or both absent.
void check_residual(DeviceView x, DeviceView residual, DeviceView sum) {
  PARALLAX_CHECK(static_cast<bool>(residual) == static_cast<bool>(sum),
                 "a fused residual add needs both `residual` and `sum`");
  if (residual) {
    check_view(residual, x.rows, x.cols, DType::f32, "norm residual");
    check_view(sum, x.rows, x.cols, DType::f32, "norm residual sum");
  }
}

float* optional_f32(DeviceView v) {
  return v ? v.f32() : nullptr;
}

} // namespace

void layernorm_forward(DeviceView x, DeviceView residual, DeviceView sum, DeviceView gamma,
                       DeviceView beta, DeviceView y, DeviceView mean, DeviceView rstd, float eps,
                       cudaStream_t stream) {
  const std::int64_t n = x.rows;
  const std::int64_t h = x.cols;
  check_view(x, n, h, DType::f32, "layernorm input");
  check_residual(x, residual, sum);
  check_view(gamma, 1, h, DType::f32, "layernorm gamma");
  check_view(beta, 1, h, DType::f32, "layernorm beta");
  check_view(y, n, h, DType::f32, "layernorm output");
  check_view(mean, n, 1, DType::f32, "layernorm mean");
  check_view(rstd, n, 1, DType::f32, "layernorm rstd");
  if (n == 0)
    return;
  layernorm_forward_kernel<<<static_cast<unsigned>(n), kRowBlock, 0, stream>>>(
      x.f32(), optional_f32(residual), optional_f32(sum), gamma.f32(), beta.f32(), y.f32(),
      mean.f32(), rstd.f32(), h, eps);
  detail::check_launch();
}

void layernorm_backward(DeviceView u, DeviceView gamma, DeviceView mean, DeviceView rstd,
                        DeviceView dy, DeviceView dresidual, DeviceView dx, DeviceView dgamma,
                        DeviceView dbeta, cudaStream_t stream) {
  const std::int64_t n = u.rows;
  const std::int64_t h = u.cols;
  check_view(u, n, h, DType::f32, "layernorm input");
  check_view(gamma, 1, h, DType::f32, "layernorm gamma");
  check_view(mean, n, 1, DType::f32, "layernorm mean");
  check_view(rstd, n, 1, DType::f32, "layernorm rstd");
  check_view(dy, n, h, DType::f32, "layernorm output gradient");
  if (dresidual)
    check_view(dresidual, n, h, DType::f32, "layernorm residual gradient");
  check_view(dx, n, h, DType::f32, "layernorm input gradient");
  check_view(dgamma, 1, h, DType::f32, "layernorm gamma gradient");
  check_view(dbeta, 1, h, DType::f32, "layernorm beta gradient");
  if (n == 0)
    return;
  // The parameter gradients read dy before the row kernel may overwrite it (dx aliasing dy).
  launch_param_grads(u, dy, mean.f32(), rstd, dgamma, dbeta.f32(), stream);
  layernorm_backward_kernel<<<static_cast<unsigned>(n), kRowBlock, 0, stream>>>(
      u.f32(), gamma.f32(), mean.f32(), rstd.f32(), dy.f32(), optional_f32(dresidual), dx.f32(), h);
  detail::check_launch();
}

void rmsnorm_forward(DeviceView x, DeviceView residual, DeviceView sum, DeviceView gamma,
                     DeviceView y, DeviceView rstd, float eps, cudaStream_t stream) {
  const std::int64_t n = x.rows;
  const std::int64_t h = x.cols;
  check_view(x, n, h, DType::f32, "rmsnorm input");
  check_residual(x, residual, sum);
  check_view(gamma, 1, h, DType::f32, "rmsnorm gamma");
  check_view(y, n, h, DType::f32, "rmsnorm output");
  check_view(rstd, n, 1, DType::f32, "rmsnorm rstd");
  if (n == 0)
    return;
  rmsnorm_forward_kernel<<<static_cast<unsigned>(n), kRowBlock, 0, stream>>>(
      x.f32(), optional_f32(residual), optional_f32(sum), gamma.f32(), y.f32(), rstd.f32(), h, eps);
  detail::check_launch();
}

void rmsnorm_backward(DeviceView u, DeviceView gamma, DeviceView rstd, DeviceView dy,
                      DeviceView dresidual, DeviceView dx, DeviceView dgamma, cudaStream_t stream) {
  const std::int64_t n = u.rows;
  const std::int64_t h = u.cols;
  check_view(u, n, h, DType::f32, "rmsnorm input");
  check_view(gamma, 1, h, DType::f32, "rmsnorm gamma");
  check_view(rstd, n, 1, DType::f32, "rmsnorm rstd");
  check_view(dy, n, h, DType::f32, "rmsnorm output gradient");
  if (dresidual)
    check_view(dresidual, n, h, DType::f32, "rmsnorm residual gradient");
  check_view(dx, n, h, DType::f32, "rmsnorm input gradient");
  check_view(dgamma, 1, h, DType::f32, "rmsnorm gamma gradient");
  if (n == 0)
    return;
  launch_param_grads(u, dy, nullptr, rstd, dgamma, nullptr, stream);
  rmsnorm_backward_kernel<<<static_cast<unsigned>(n), kRowBlock, 0, stream>>>(
      u.f32(), gamma.f32(), rstd.f32(), dy.f32(), optional_f32(dresidual), dx.f32(), h);
  detail::check_launch();
}

} // namespace parallax::cuda
