// Kernels around the batched-GEMM attention (attention_gemm.cpp): head layout changes and the
// causal softmax forward and backward over materialised probabilities.
#include "parallax/executor/cuda/attention_gemm.hpp"

#include "kernel_utils.cuh"

#include <cuda_bf16.h>

namespace parallax::cuda {

namespace {

constexpr int kBlock = 256;

__device__ inline void store(float* p, float v) {
  *p = v;
}
__device__ inline void store(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

template <class Out>
__global__ void split_heads_kernel(const float* x, std::int64_t batch, std::int64_t seq,
                                   int heads_out, int group, int head_dim, Out* out) {
  const std::int64_t in_cols = static_cast<std::int64_t>(heads_out / group) * head_dim;
  const std::int64_t n = batch * heads_out * seq * head_dim;
  for (std::int64_t idx = detail::global_thread(); idx < n; idx += detail::grid_threads()) {
    const std::int64_t i = idx % head_dim;
    const std::int64_t t = (idx / head_dim) % seq;
    const std::int64_t h = (idx / (head_dim * seq)) % heads_out;
    const std::int64_t b = idx / (head_dim * seq * heads_out);
    store(out + idx, x[(b * seq + t) * in_cols + (h / group) * head_dim + i]);
  }
}

__global__ void merge_heads_kernel(const float* in, std::int64_t batch, std::int64_t seq,
                                   int heads_out, int group, int head_dim, float* out) {
  const std::int64_t out_cols = static_cast<std::int64_t>(heads_out) * head_dim;
  const std::int64_t heads_in = static_cast<std::int64_t>(heads_out) * group;
  const std::int64_t n = batch * seq * out_cols;
  for (std::int64_t idx = detail::global_thread(); idx < n; idx += detail::grid_threads()) {
    const std::int64_t c = idx % out_cols;
    const std::int64_t row = idx / out_cols; // b·T + t
    const std::int64_t g = c / head_dim;
    const std::int64_t i = c % head_dim;
    const std::int64_t b = row / seq;
    const std::int64_t t = row % seq;
    float acc = 0.0f;
    for (int j = 0; j < group; ++j)
      acc += in[((b * heads_in + g * group + j) * seq + t) * head_dim + i];
    out[idx] = acc;
  }
}

// One block per row: the row's query position is row % seq; columns beyond it are masked.
__global__ void causal_softmax_forward_kernel(float* scores, std::int64_t seq) {
  __shared__ float scratch[detail::kWarpSize];
  const std::int64_t row = blockIdx.x;
  const std::int64_t last = row % seq; // the last key this query sees
  float* s = scores + row * seq;
  float m = -INFINITY;
  for (std::int64_t j = threadIdx.x; j <= last; j += blockDim.x)
    m = fmaxf(m, s[j]);
  m = detail::block_max(m, scratch);
  float sum = 0.0f;
  for (std::int64_t j = threadIdx.x; j <= last; j += blockDim.x)
    sum += expf(s[j] - m);
  sum = detail::block_sum(sum, scratch);
  const float inv = 1.0f / sum;
  for (std::int64_t j = threadIdx.x; j < seq; j += blockDim.x)
    s[j] = j <= last ? expf(s[j] - m) * inv : 0.0f;
}

__global__ void causal_softmax_backward_kernel(const float* probs, const float* dprobs, float scale,
                                               float* dscores, std::int64_t seq) {
  __shared__ float scratch[detail::kWarpSize];
  const std::int64_t row = blockIdx.x;
  const std::int64_t last = row % seq;
  const float* p = probs + row * seq;
  const float* dp = dprobs + row * seq;
  float* ds = dscores + row * seq;
  float dot = 0.0f;
  for (std::int64_t j = threadIdx.x; j <= last; j += blockDim.x)
    dot += p[j] * dp[j];
  dot = detail::block_sum(dot, scratch); // every thread has read its dp before any writes ds
  for (std::int64_t j = threadIdx.x; j < seq; j += blockDim.x)
    ds[j] = j <= last ? scale * p[j] * (dp[j] - dot) : 0.0f;
}

} // namespace

void split_heads(DeviceView x, std::int64_t batch, std::int64_t seq, int heads_out, int group,
                 int head_dim, DeviceView out, cudaStream_t stream) {
  PARALLAX_CHECK(group >= 1 && heads_out % group == 0,
                 "split_heads: heads not a multiple of group");
  detail::check_view(x, batch * seq, static_cast<std::int64_t>(heads_out / group) * head_dim,
                     DType::f32, "split_heads input");
  PARALLAX_CHECK(out.rows == batch * heads_out * seq && out.cols == head_dim,
                 "split_heads output is not [batch·heads·seq, head_dim]");
  const std::int64_t n = out.size();
  if (n == 0)
    return;
  if (out.dtype == DType::f32) {
    split_heads_kernel<<<detail::grid_for(n, kBlock), kBlock, 0, stream>>>(
        x.f32(), batch, seq, heads_out, group, head_dim, out.f32());
  } else {
    split_heads_kernel<<<detail::grid_for(n, kBlock), kBlock, 0, stream>>>(
        x.f32(), batch, seq, heads_out, group, head_dim,
        reinterpret_cast<__nv_bfloat16*>(out.bf16_bits()));
  }
  detail::check_launch();
}

void merge_heads(DeviceView in, std::int64_t batch, std::int64_t seq, int heads_out, int group,
                 int head_dim, DeviceView out, cudaStream_t stream) {
  PARALLAX_CHECK(group >= 1, "merge_heads: group must be at least 1");
  detail::check_view(in, batch * heads_out * group * seq, head_dim, DType::f32,
                     "merge_heads input");
  detail::check_view(out, batch * seq, static_cast<std::int64_t>(heads_out) * head_dim, DType::f32,
                     "merge_heads output");
  if (out.size() == 0)
    return;
  merge_heads_kernel<<<detail::grid_for(out.size(), kBlock), kBlock, 0, stream>>>(
      in.f32(), batch, seq, heads_out, group, head_dim, out.f32());
  detail::check_launch();
}

void causal_softmax_forward(DeviceView scores, std::int64_t seq, cudaStream_t stream) {
  PARALLAX_CHECK(seq > 0 && scores.cols == seq && scores.rows % seq == 0 &&
                     scores.dtype == DType::f32,
                 "causal softmax scores are not [pairs·seq, seq] f32");
  if (scores.rows == 0)
    return;
  causal_softmax_forward_kernel<<<static_cast<unsigned>(scores.rows), kBlock, 0, stream>>>(
      scores.f32(), seq);
  detail::check_launch();
}

void causal_softmax_backward(DeviceView probs, DeviceView dprobs, float scale, DeviceView dscores,
                             std::int64_t seq, cudaStream_t stream) {
  detail::check_view(dprobs, probs.rows, seq, DType::f32, "causal softmax dP");
  detail::check_view(dscores, probs.rows, seq, DType::f32, "causal softmax dS");
  detail::check_view(probs, probs.rows, seq, DType::f32, "causal softmax P");
  PARALLAX_CHECK(seq > 0 && probs.rows % seq == 0, "causal softmax rows are not pairs·seq");
  if (probs.rows == 0)
    return;
  causal_softmax_backward_kernel<<<static_cast<unsigned>(probs.rows), kBlock, 0, stream>>>(
      probs.f32(), dprobs.f32(), scale, dscores.f32(), seq);
  detail::check_launch();
}

} // namespace parallax::cuda
