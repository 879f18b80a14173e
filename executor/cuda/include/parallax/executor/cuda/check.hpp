// Check macros for CUDA runtime, cuBLAS(Lt) and NCCL calls.
//
//   PARALLAX_CUDA_CHECK(cudaMemcpy(...));
//   PARALLAX_CUBLAS_CHECK(cublasLtMatmul(...));
//   PARALLAX_NCCL_CHECK(ncclAllReduce(...));
//
// A failing call throws std::runtime_error whose message names the file:line, the MPI world
// rank (when MPI is running), the call and the library's error string. Kernel launches are
// checked with PARALLAX_CUDA_CHECK(cudaGetLastError()) right after the launch.
//
// Plain C headers only: host C++ compiled by g++/clang includes this without nvcc.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

namespace parallax::cuda {

[[noreturn]] void cuda_fail(const char* file, int line, const char* call, const char* library,
                            const char* error);

} // namespace parallax::cuda

#define PARALLAX_CUDA_CHECK(call)                                                                  \
  do {                                                                                             \
    const cudaError_t parallax_status_ = (call);                                                   \
    if (parallax_status_ != cudaSuccess) {                                                         \
      ::parallax::cuda::cuda_fail(__FILE__, __LINE__, #call, "CUDA",                               \
                                  cudaGetErrorString(parallax_status_));                           \
    }                                                                                              \
  } while (false)

#define PARALLAX_CUBLAS_CHECK(call)                                                                \
  do {                                                                                             \
    const cublasStatus_t parallax_status_ = (call);                                                \
    if (parallax_status_ != CUBLAS_STATUS_SUCCESS) {                                               \
      ::parallax::cuda::cuda_fail(__FILE__, __LINE__, #call, "cuBLAS",                             \
                                  cublasLtGetStatusString(parallax_status_));                      \
    }                                                                                              \
  } while (false)

#define PARALLAX_NCCL_CHECK(call)                                                                  \
  do {                                                                                             \
    const ncclResult_t parallax_status_ = (call);                                                  \
    if (parallax_status_ != ncclSuccess) {                                                         \
      ::parallax::cuda::cuda_fail(__FILE__, __LINE__, #call, "NCCL",                               \
                                  ncclGetErrorString(parallax_status_));                           \
    }                                                                                              \
  } while (false)
