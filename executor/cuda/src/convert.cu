// fp32 <-> bf16 conversion (mixed precision: bf16 GEMM operands from fp32 tensors).
#include "parallax/executor/cuda/ops.hpp"

#include "kernel_utils.cuh"

#include <cuda_bf16.h>

namespace parallax::cuda {

namespace {

__global__ void f32_to_bf16_kernel(const float* src, __nv_bfloat16* dst, std::int64_t n) {
  for (std::int64_t i = detail::global_thread(); i < n; i += detail::grid_threads())
    dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void bf16_to_f32_kernel(const __nv_bfloat16* src, float* dst, std::int64_t n) {
  for (std::int64_t i = detail::global_thread(); i < n; i += detail::grid_threads())
    dst[i] = __bfloat162float(src[i]);
}

constexpr int kBlock = 256;

} // namespace

void convert_f32_to_bf16(DeviceView src, DeviceView dst, cudaStream_t stream) {
  detail::check_view(dst, src.rows, src.cols, DType::bf16, "bf16 destination");
  if (src.size() == 0)
    return;
  f32_to_bf16_kernel<<<detail::grid_for(src.size(), kBlock), kBlock, 0, stream>>>(
      src.f32(), reinterpret_cast<__nv_bfloat16*>(dst.bf16_bits()), src.size());
  detail::check_launch();
}

void convert_bf16_to_f32(DeviceView src, DeviceView dst, cudaStream_t stream) {
  detail::check_view(dst, src.rows, src.cols, DType::f32, "f32 destination");
  if (src.size() == 0)
    return;
  bf16_to_f32_kernel<<<detail::grid_for(src.size(), kBlock), kBlock, 0, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(src.bf16_bits()), dst.f32(), src.size());
  detail::check_launch();
}

} // namespace parallax::cuda
