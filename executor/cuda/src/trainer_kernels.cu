// The kernels the device trainer needs around the layer ops: embeddings, rotary positions,
// vocabulary-parallel cross-entropy pieces, elementwise sums and the gradient norm.
#include "parallax/executor/cuda/ops.hpp"

#include "kernel_utils.cuh"

#include <algorithm>

namespace parallax::cuda {

namespace {

constexpr int kBlock = 256;

__global__ void embedding_forward_kernel(const std::int32_t* tokens, const float* table,
                                         std::int64_t table_rows, std::int64_t vocab_begin,
                                         float* out, std::int64_t rows, std::int64_t cols,
                                         bool accumulate) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = detail::global_thread(); i < n; i += detail::grid_threads()) {
    const std::int64_t r = i / cols;
    const std::int64_t c = i % cols;
    const std::int64_t local = static_cast<std::int64_t>(tokens[r]) - vocab_begin;
    const float v = local >= 0 && local < table_rows ? table[local * cols + c] : 0.0f;
    out[i] = accumulate ? out[i] + v : v;
  }
}

// Block g owns token group g: its threads stride over the columns, each adding the group's
// rows in row order (the CPU op's order, so the same bits).
__global__ void embedding_backward_kernel(const std::int32_t* order, const std::int32_t* starts,
                                          const std::int32_t* tokens, const float* dout,
                                          std::int64_t cols, std::int64_t vocab_begin,
                                          float* dtable, std::int64_t table_rows) {
  const std::int64_t local = static_cast<std::int64_t>(tokens[blockIdx.x]) - vocab_begin;
  if (local < 0 || local >= table_rows)
    return;
  const std::int32_t first = starts[blockIdx.x];
  const std::int32_t last = starts[blockIdx.x + 1];
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float acc = dtable[local * cols + c];
    for (std::int32_t i = first; i < last; ++i)
      acc += dout[static_cast<std::int64_t>(order[i]) * cols + c];
    dtable[local * cols + c] = acc;
  }
}

__global__ void rope_kernel(float* x, std::int64_t rows, std::int64_t cols, int head_dim,
                            const std::int32_t* positions, float theta, float direction) {
  const int half = head_dim / 2;
  const std::int64_t heads = cols / head_dim;
  const std::int64_t n = rows * heads * half;
  for (std::int64_t idx = detail::global_thread(); idx < n; idx += detail::grid_threads()) {
    const int i = static_cast<int>(idx % half);
    const std::int64_t h = (idx / half) % heads;
    const std::int64_t r = idx / (static_cast<std::int64_t>(half) * heads);
    const float inv_freq =
        powf(theta, -2.0f * static_cast<float>(i) / static_cast<float>(head_dim));
    const float angle = static_cast<float>(positions[r]) * inv_freq;
    const float c = cosf(angle);
    const float s = direction * sinf(angle);
    float* a = x + r * cols + h * head_dim + i;
    float* b = a + half;
    const float a0 = *a;
    const float b0 = *b;
    *a = a0 * c - b0 * s;
    *b = a0 * s + b0 * c;
  }
}

// One block per row for the row reductions.
__global__ void row_max_kernel(const float* logits, std::int64_t cols, float* max) {
  __shared__ float scratch[detail::kWarpSize];
  const float* l = logits + static_cast<std::int64_t>(blockIdx.x) * cols;
  float m = -INFINITY;
  for (std::int64_t v = threadIdx.x; v < cols; v += blockDim.x)
    m = fmaxf(m, l[v]);
  m = detail::block_max(m, scratch);
  if (threadIdx.x == 0)
    max[blockIdx.x] = m;
}

__global__ void row_sum_exp_kernel(const float* logits, std::int64_t cols, const float* max,
                                   float* sum) {
  __shared__ float scratch[detail::kWarpSize];
  const float* l = logits + static_cast<std::int64_t>(blockIdx.x) * cols;
  const float m = max[blockIdx.x];
  float s = 0.0f;
  for (std::int64_t v = threadIdx.x; v < cols; v += blockDim.x)
    s += expf(l[v] - m);
  s = detail::block_sum(s, scratch);
  if (threadIdx.x == 0)
    sum[blockIdx.x] = s;
}

__global__ void target_logits_kernel(const float* logits, std::int64_t rows, std::int64_t cols,
                                     const std::int32_t* targets, std::int64_t vocab_begin,
                                     float* out) {
  for (std::int64_t r = detail::global_thread(); r < rows; r += detail::grid_threads()) {
    const std::int64_t local = static_cast<std::int64_t>(targets[r]) - vocab_begin;
    out[r] = local >= 0 && local < cols ? logits[r * cols + local] : 0.0f;
  }
}

__global__ void cross_entropy_backward_kernel(const float* logits, std::int64_t rows,
                                              std::int64_t cols, const float* max, const float* sum,
                                              const std::int32_t* targets, std::int64_t vocab_begin,
                                              float scale, float* dlogits) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = detail::global_thread(); i < n; i += detail::grid_threads()) {
    const std::int64_t r = i / cols;
    const std::int64_t v = i % cols;
    float g = expf(logits[i] - max[r]) * (scale / sum[r]);
    if (v == static_cast<std::int64_t>(targets[r]) - vocab_begin)
      g -= scale;
    dlogits[i] = g;
  }
}

__global__ void add_kernel(const float* a, const float* b, float* y, std::int64_t n) {
  for (std::int64_t i = detail::global_thread(); i < n; i += detail::grid_threads())
    y[i] = a[i] + b[i];
}

__device__ inline double warp_sum_double(double v) {
  for (int offset = detail::kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(detail::kFullMask, v, offset);
  return v;
}

// Block b sums the elements b, b + G·B, … of its grid-stride share into partials[b].
__global__ void sum_squares_partials_kernel(const float* x, std::int64_t n, double* partials) {
  __shared__ double scratch[detail::kWarpSize];
  double acc = 0.0;
  for (std::int64_t i = detail::global_thread(); i < n; i += detail::grid_threads()) {
    const double v = x[i];
    acc += v * v;
  }
  const int lane = static_cast<int>(threadIdx.x) % detail::kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / detail::kWarpSize;
  acc = warp_sum_double(acc);
  if (lane == 0)
    scratch[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x) / detail::kWarpSize; ++w)
      total += scratch[w];
    partials[blockIdx.x] = total;
  }
}

__global__ void sum_partials_kernel(const double* partials, int count, double* total) {
  double acc = 0.0;
  for (int i = 0; i < count; ++i)
    acc += partials[i];
  *total += acc;
}

void check_rows(DeviceView v, std::int64_t rows, const char* what) {
  detail::check_view(v, rows, 1, DType::f32, what);
}

} // namespace

void embedding_forward(const std::int32_t* tokens, DeviceView table, std::int64_t vocab_begin,
                       DeviceView out, bool accumulate, cudaStream_t stream) {
  PARALLAX_CHECK(out.cols == table.cols && out.dtype == DType::f32 && table.dtype == DType::f32,
                 "embedding output and table widths differ");
  if (out.size() == 0)
    return;
  embedding_forward_kernel<<<detail::grid_for(out.size(), kBlock), kBlock, 0, stream>>>(
      tokens, table.f32(), table.rows, vocab_begin, out.f32(), out.rows, out.cols, accumulate);
  detail::check_launch();
}

TokenGroups TokenGroups::of(std::span<const std::int32_t> row_tokens) {
  TokenGroups g;
  g.order.resize(row_tokens.size());
  for (std::size_t r = 0; r < row_tokens.size(); ++r)
    g.order[r] = static_cast<std::int32_t>(r);
  std::stable_sort(g.order.begin(), g.order.end(), [&](std::int32_t a, std::int32_t b) {
    return row_tokens[static_cast<std::size_t>(a)] < row_tokens[static_cast<std::size_t>(b)];
  });
  for (std::size_t i = 0; i < g.order.size(); ++i) {
    const std::int32_t t = row_tokens[static_cast<std::size_t>(g.order[i])];
    if (g.tokens.empty() || g.tokens.back() != t) {
      g.tokens.push_back(t);
      g.starts.push_back(static_cast<std::int32_t>(i));
    }
  }
  g.starts.push_back(static_cast<std::int32_t>(g.order.size()));
  return g;
}

void embedding_backward(const std::int32_t* order, const std::int32_t* starts,
                        const std::int32_t* tokens, std::int64_t groups, DeviceView dout,
                        std::int64_t vocab_begin, DeviceView dtable, cudaStream_t stream) {
  PARALLAX_CHECK(dout.cols == dtable.cols && dout.dtype == DType::f32 && dtable.dtype == DType::f32,
                 "embedding gradient and table widths differ");
  if (groups == 0 || dout.cols == 0)
    return;
  embedding_backward_kernel<<<static_cast<unsigned>(groups), kBlock, 0, stream>>>(
      order, starts, tokens, dout.f32(), dout.cols, vocab_begin, dtable.f32(), dtable.rows);
  detail::check_launch();
}

void rope(DeviceView x, int head_dim, const std::int32_t* positions, float theta, float direction,
          cudaStream_t stream) {
  PARALLAX_CHECK(head_dim > 0 && head_dim % 2 == 0 && x.cols % head_dim == 0,
                 "rotary input width is not a multiple of an even head_dim");
  const std::int64_t n = x.rows * (x.cols / head_dim) * (head_dim / 2);
  if (n == 0)
    return;
  rope_kernel<<<detail::grid_for(n, kBlock), kBlock, 0, stream>>>(x.f32(), x.rows, x.cols, head_dim,
                                                                  positions, theta, direction);
  detail::check_launch();
}

void row_max(DeviceView logits, DeviceView max, cudaStream_t stream) {
  check_rows(max, logits.rows, "row max");
  if (logits.rows == 0)
    return;
  row_max_kernel<<<static_cast<unsigned>(logits.rows), kBlock, 0, stream>>>(logits.f32(),
                                                                            logits.cols, max.f32());
  detail::check_launch();
}

void row_sum_exp(DeviceView logits, DeviceView max, DeviceView sum, cudaStream_t stream) {
  check_rows(max, logits.rows, "row max");
  check_rows(sum, logits.rows, "row sum");
  if (logits.rows == 0)
    return;
  row_sum_exp_kernel<<<static_cast<unsigned>(logits.rows), kBlock, 0, stream>>>(
      logits.f32(), logits.cols, max.f32(), sum.f32());
  detail::check_launch();
}

void target_logits(DeviceView logits, const std::int32_t* targets, std::int64_t vocab_begin,
                   DeviceView out, cudaStream_t stream) {
  check_rows(out, logits.rows, "target logits");
  if (logits.rows == 0)
    return;
  target_logits_kernel<<<detail::grid_for(logits.rows, kBlock), kBlock, 0, stream>>>(
      logits.f32(), logits.rows, logits.cols, targets, vocab_begin, out.f32());
  detail::check_launch();
}

void cross_entropy_backward(DeviceView logits, DeviceView max, DeviceView sum,
                            const std::int32_t* targets, std::int64_t vocab_begin, float scale,
                            DeviceView dlogits, cudaStream_t stream) {
  check_rows(max, logits.rows, "row max");
  check_rows(sum, logits.rows, "row sum");
  detail::check_view(dlogits, logits.rows, logits.cols, DType::f32, "logits gradient");
  if (logits.size() == 0)
    return;
  cross_entropy_backward_kernel<<<detail::grid_for(logits.size(), kBlock), kBlock, 0, stream>>>(
      logits.f32(), logits.rows, logits.cols, max.f32(), sum.f32(), targets, vocab_begin, scale,
      dlogits.f32());
  detail::check_launch();
}

void add(DeviceView a, DeviceView b, DeviceView y, cudaStream_t stream) {
  detail::check_view(b, a.rows, a.cols, DType::f32, "sum operand");
  detail::check_view(y, a.rows, a.cols, DType::f32, "sum");
  if (a.size() == 0)
    return;
  add_kernel<<<detail::grid_for(a.size(), kBlock), kBlock, 0, stream>>>(a.f32(), b.f32(), y.f32(),
                                                                        a.size());
  detail::check_launch();
}

void add_inplace(float* dst, const float* src, std::int64_t n, cudaStream_t stream) {
  if (n == 0)
    return;
  add_kernel<<<detail::grid_for(n, kBlock), kBlock, 0, stream>>>(dst, src, dst, n);
  detail::check_launch();
}

void accumulate_sum_squares(const float* x, std::int64_t n, double* total, double* partials,
                            cudaStream_t stream) {
  if (n == 0)
    return;
  sum_squares_partials_kernel<<<kSumSquaresBlocks, kBlock, 0, stream>>>(x, n, partials);
  detail::check_launch();
  sum_partials_kernel<<<1, 1, 0, stream>>>(partials, kSumSquaresBlocks, total);
  detail::check_launch();
}

} // namespace parallax::cuda
