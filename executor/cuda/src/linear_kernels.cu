// The elementwise and reduction kernels around the cuBLASLt GEMMs (gemm.cpp).
#include "parallax/executor/cuda/gemm.hpp"

#include "kernel_utils.cuh"

#include <cuda_bf16.h>

namespace parallax::cuda {

namespace {

using detail::check_launch;

__global__ void add_bias_kernel(float* y, const float* b, std::int64_t rows, std::int64_t cols) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = detail::global_thread(); i < n; i += detail::grid_threads())
    y[i] += b[i % cols];
}

__device__ inline float load_float(const float* p) {
  return *p;
}
__device__ inline float load_float(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

constexpr int kColumnTile = 32; // columns per block (one per lane)
constexpr int kRowLanes = 8;    // threads striding down the rows of each column

// db[c] += Σ_r dy[r, c]: a block owns 32 columns; its 8 row-strided partial sums are added in
// a fixed order, so the result does not depend on scheduling.
template <class T>
__global__ void column_sums_kernel(const T* dy, float* db, std::int64_t rows, std::int64_t cols) {
  __shared__ float partial[kRowLanes][kColumnTile + 1];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  float acc = 0.0f;
  if (c < cols) {
    for (std::int64_t r = threadIdx.y; r < rows; r += kRowLanes)
      acc += load_float(dy + r * cols + c);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.0f;
    for (int i = 0; i < kRowLanes; ++i)
      total += partial[i][threadIdx.x];
    db[c] += total;
  }
}

} // namespace

void add_bias(DeviceView y, DeviceView b, cudaStream_t stream) {
  detail::check_view(b, 1, y.cols, DType::f32, "bias");
  constexpr int kBlock = 256;
  add_bias_kernel<<<detail::grid_for(y.size(), kBlock), kBlock, 0, stream>>>(y.f32(), b.f32(),
                                                                             y.rows, y.cols);
  check_launch();
}

void accumulate_column_sums(DeviceView dy, DeviceView db, cudaStream_t stream) {
  detail::check_view(db, 1, dy.cols, DType::f32, "bias gradient");
  const dim3 block(kColumnTile, kRowLanes);
  const dim3 grid(static_cast<unsigned>((dy.cols + kColumnTile - 1) / kColumnTile));
  if (dy.dtype == DType::f32) {
    column_sums_kernel<<<grid, block, 0, stream>>>(dy.f32(), db.f32(), dy.rows, dy.cols);
  } else {
    column_sums_kernel<<<grid, block, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(dy.bf16_bits()), db.f32(), dy.rows, dy.cols);
  }
  check_launch();
}

} // namespace parallax::cuda
