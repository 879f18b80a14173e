// GEMMs through cuBLASLt, and the linear layer built on them (the device twin of
// ops::linear_forward / ops::linear_backward).
//
// Precisions (inputs → accumulation → output):
//   f32   fp32 A, B → fp32 (CUBLAS_COMPUTE_32F, full-precision FMAs) → fp32
//   tf32  fp32 A, B → fp32 with inputs rounded to tf32 in the tensor cores → fp32
//   bf16  bf16 A, B → fp32 → fp32 (C/D stay fp32, so dW accumulates in fp32)
//
// Row-major on the host side, column-major inside cuBLASLt: a row-major M[r, c] is the
// column-major Mᵀ with leading dimension c, so C = op(A)·op(B) is issued as
// Cᵀ = op(B)ᵀ·op(A)ᵀ with the operands swapped and no data movement.
#pragma once

#include "parallax/executor/cuda/device_tensor.hpp"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace parallax::cuda {

enum class GemmPrecision : std::uint8_t { f32, tf32, bf16 };

const char* gemm_precision_name(GemmPrecision p);
// The input dtype a precision expects (bf16 for bf16, f32 otherwise).
DType gemm_input_dtype(GemmPrecision p);

// A cuBLASLt handle and its workspace (taken from the allocator, so counted in its
// bytes_in_use). One per device (and per thread using it).
class Blas {
public:
  static constexpr std::size_t kWorkspaceBytes = std::size_t{32} << 20;

  explicit Blas(DeviceAllocator& allocator);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  cublasLtHandle_t handle() const { return handle_; }
  void* workspace() const { return workspace_; }

private:
  DeviceAllocator* allocator_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
};

// C = alpha·op(A)·op(B) + beta·C (+ bias broadcast over rows), all row-major; op(X) is X or
// Xᵀ. C is fp32 [m, n]; A and B have the precision's input dtype; bias is fp32 [1, n] or
// absent. The bias goes through cuBLASLt's bias epilogue, or a separate kernel when no
// algorithm with the epilogue fits.
void matmul(Blas& blas, GemmPrecision precision, DeviceView a, bool transpose_a, DeviceView b,
            bool transpose_b, DeviceView c, float alpha, float beta, DeviceView bias,
            cudaStream_t stream);

// `count` matmuls at once (no bias): the views describe the first of each operand's matrices,
// the others follow at the given strides (in elements). Strides of 0 reuse one matrix.
struct GemmBatch {
  std::int64_t count = 1;
  std::int64_t stride_a = 0;
  std::int64_t stride_b = 0;
  std::int64_t stride_c = 0;
};
void matmul_batched(Blas& blas, GemmPrecision precision, DeviceView a, bool transpose_a,
                    DeviceView b, bool transpose_b, DeviceView c, float alpha, float beta,
                    const GemmBatch& batch, cudaStream_t stream);

// y = x·W (+ b). x [tokens, in], w [in, out] in the precision's input dtype; b [1, out] and
// y [tokens, out] fp32.
void linear_forward(Blas& blas, DeviceView x, DeviceView w, DeviceView b, DeviceView y,
                    GemmPrecision precision, cudaStream_t stream);
// dx = dy·Wᵀ (skipped when dx is absent; added to dx when accumulate_dx), dW += xᵀ·dy,
// db += Σ_rows dy (skipped when absent). x, w, dy in the precision's input dtype; dx, dw, db fp32.
void linear_backward(Blas& blas, DeviceView x, DeviceView w, DeviceView dy, DeviceView dx,
                     DeviceView dw, DeviceView db, GemmPrecision precision, cudaStream_t stream,
                     bool accumulate_dx = false);

// Elementwise helpers the GEMM path uses (linear_kernels.cu).
// y[r, :] += b[0, :] (fp32).
void add_bias(DeviceView y, DeviceView b, cudaStream_t stream);
// db[0, :] += Σ_rows dy[r, :] (dy fp32 or bf16, db fp32), in a fixed order (deterministic).
void accumulate_column_sums(DeviceView dy, DeviceView db, cudaStream_t stream);

} // namespace parallax::cuda
