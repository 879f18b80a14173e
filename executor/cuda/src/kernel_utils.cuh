// Helpers shared by the .cu files: shape checks, launch sizes, warp and block reductions.
#pragma once

#include "parallax/core/error.hpp"
#include "parallax/executor/cuda/check.hpp"
#include "parallax/executor/cuda/device_tensor.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace parallax::cuda::detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

inline void check_view(DeviceView v, std::int64_t rows, std::int64_t cols, DType dtype,
                       const char* what) {
  PARALLAX_CHECK(v.data != nullptr, std::string(what) + " is missing");
  PARALLAX_CHECK(v.rows == rows && v.cols == cols && v.dtype == dtype,
                 std::string(what) + " is [" + std::to_string(v.rows) + ", " +
                     std::to_string(v.cols) + "] " + dtype_name(v.dtype) + ", expected [" +
                     std::to_string(rows) + ", " + std::to_string(cols) + "] " + dtype_name(dtype));
}

// Blocks for a grid-stride loop over n elements (capped; the loop covers the rest).
inline unsigned grid_for(std::int64_t n, int block) {
  const std::int64_t blocks = (n + block - 1) / block;
  return static_cast<unsigned>(std::clamp<std::int64_t>(blocks, 1, std::int64_t{1} << 16));
}

inline void check_launch() {
  PARALLAX_CUDA_CHECK(cudaGetLastError());
}

__device__ inline std::int64_t global_thread() {
  return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline std::int64_t grid_threads() {
  return static_cast<std::int64_t>(gridDim.x) * blockDim.x;
}

__device__ inline float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ inline float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Reductions over a 1-D block whose size is a multiple of 32; every thread gets the result.
// `scratch` is 32 floats of shared memory, reusable across calls (the leading barrier
// protects it from the previous call's readers).
__device__ inline float block_sum(float v, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0)
    scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : 0.0f);
}

__device__ inline float block_max(float v, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0)
    scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? scratch[lane] : -INFINITY);
}

} // namespace parallax::cuda::detail
