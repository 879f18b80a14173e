// Fused softmax + cross-entropy: one block per row, two passes over the logits, no stored
// probabilities (the vocabulary row is the largest activation of a language model).
#include "parallax/executor/cuda/ops.hpp"

#include "kernel_utils.cuh"

namespace parallax::cuda {

namespace {

constexpr int kBlock = 256;

__global__ void softmax_cross_entropy_kernel(const float* logits, const std::int32_t* targets,
                                             float scale, float* loss, float* dlogits,
                                             std::int64_t vocab) {
  __shared__ float scratch[detail::kWarpSize];
  const std::int64_t row = blockIdx.x;
  const float* l = logits + row * vocab;
  float* dl = dlogits + row * vocab;
  // Pass 1: each thread's running max and Σ exp(l − max) (online softmax), then the block's.
  float m = -INFINITY;
  float s = 0.0f;
  for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float x = l[v];
    if (x > m) {
      s = s * expf(m - x) + 1.0f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }
  const float row_max = detail::block_max(m, scratch);
  // A thread that saw no element has m = −inf and s = 0: it contributes 0.
  const float row_sum = detail::block_sum(m == -INFINITY ? 0.0f : s * expf(m - row_max), scratch);
  const std::int64_t target = targets[row];
  const bool local = target >= 0 && target < vocab;
  const float target_logit = local ? l[target] : 0.0f;
  if (threadIdx.x == 0)
    loss[row] = logf(row_sum) + row_max - target_logit;
  // Every thread has read the target logit before any thread overwrites it (in place).
  __syncthreads();
  // Pass 2: the gradient, written over the logits when they alias (each element is read
  // before it is written, by the same thread).
  const float inv_sum = 1.0f / row_sum;
  for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    float g = expf(l[v] - row_max) * inv_sum * scale;
    if (v == target)
      g -= scale;
    dl[v] = g;
  }
}

} // namespace

void softmax_cross_entropy(DeviceView logits, const std::int32_t* targets, float scale,
                           DeviceView loss, DeviceView dlogits, cudaStream_t stream) {
  const std::int64_t rows = logits.rows;
  const std::int64_t vocab = logits.cols;
  detail::check_view(logits, rows, vocab, DType::f32, "cross-entropy logits");
  detail::check_view(loss, rows, 1, DType::f32, "cross-entropy loss");
  detail::check_view(dlogits, rows, vocab, DType::f32, "cross-entropy logits gradient");
  PARALLAX_CHECK(targets != nullptr || rows == 0, "cross-entropy targets are missing");
  if (rows == 0)
    return;
  softmax_cross_entropy_kernel<<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(
      logits.f32(), targets, scale, loss.f32(), dlogits.f32(), vocab);
  detail::check_launch();
}

} // namespace parallax::cuda
