// Causal attention with grouped-query heads, flash-style: scores are computed a tile of 32
// keys (or queries) at a time in shared memory and never stored; the forward keeps each
// query's log-sum-exp so the backward recomputes probabilities exactly.
//
// Letters: b batch, i query position, j key position, h query head, g = h / group its kv head,
// d head dim. q, out, dout: [b·seq, heads·d]; k, v, dk, dv: [b·seq, kv_heads·d];
// lse, delta: [b·heads, seq].
//
// Work split (correctness first; a tensor-core version is future work):
//   forward   block = 8 queries (one warp each) of one (b, h); lane j scores key j of the tile;
//             online softmax with the running max m and sum l; out = o / l, lse = m + log l.
//   delta     one warp per (b, i, h): Σ_d dout ⊙ out.
//   dq        the forward's split again: dq_i = Σ_j ds_ij k_j, ds = p (dp − delta) / √d.
//   dk, dv    block = 8 keys (one warp each) of one (b, g); lanes walk 32 queries at a time over
//             every query head of the group, so GQA's sum over heads needs no atomics.
#include "parallax/executor/cuda/ops.hpp"

#include "kernel_utils.cuh"

#include <cmath>

namespace parallax::cuda {

namespace {

using detail::check_view;
using detail::kFullMask;
using detail::kWarpSize;
using detail::warp_max;
using detail::warp_sum;

constexpr int kRowsPerBlock = 8; // warps per block, one query (or key) row each
constexpr int kTile = 32;        // keys (or queries) per shared-memory tile, one per lane
constexpr int kPerLane = kMaxAttentionHeadDim / kWarpSize;
constexpr int kBlockThreads = kRowsPerBlock * kWarpSize;
constexpr int kDefaultSharedBytes = 48 * 1024;

struct Dims {
  std::int64_t seq;
  int heads;
  int kv_heads;
  int d;
  float scale;
  std::int64_t q_ld;  // heads·d
  std::int64_t kv_ld; // kv_heads·d
};

__device__ inline float dot_row(const float* a, const float* b, int d) {
  float acc = 0.0f;
  for (int c = 0; c < d; ++c)
    acc += a[c] * b[c];
  return acc;
}

// Loads rows first .. first+kTile-1 of a [b·seq, ld] matrix's head `head` into a
// [kTile][d+1] shared tile (zeros past the sequence end), with the whole block.
__device__ inline void load_tile(const float* src, std::int64_t b, std::int64_t first, int head,
                                 const Dims& dims, std::int64_t ld, float* tile) {
  const int stride = dims.d + 1;
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * dims.d; idx += blockDim.x) {
    const int r = idx / dims.d;
    const int c = idx % dims.d;
    const std::int64_t pos = first + r;
    tile[r * stride + c] =
        pos < dims.seq ? src[(b * dims.seq + pos) * ld + std::int64_t{head} * dims.d + c] : 0.0f;
  }
}

// Copies one row (position pos, head `head`) into shared memory with the calling warp.
__device__ inline void load_row(const float* src, std::int64_t b, std::int64_t pos, int head,
                                const Dims& dims, std::int64_t ld, float* row, int lane) {
  for (int c = lane; c < dims.d; c += kWarpSize)
    row[c] = src[(b * dims.seq + pos) * ld + std::int64_t{head} * dims.d + c];
}

__global__ void attention_forward_kernel(const float* q, const float* k, const float* v, float* out,
                                         float* lse, Dims dims) {
  extern __shared__ float smem[];
  const int d = dims.d;
  const int stride = d + 1;
  float* q_rows = smem;                       // [kRowsPerBlock][d]
  float* k_tile = q_rows + kRowsPerBlock * d; // [kTile][d+1]
  float* v_tile = k_tile + kTile * stride;    // [kTile][d+1]
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const std::int64_t b = blockIdx.z;
  const int h = static_cast<int>(blockIdx.y);
  const int g = h / (dims.heads / dims.kv_heads);
  const std::int64_t first_query = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock;
  const std::int64_t i = first_query + warp;
  const bool active = i < dims.seq;
  float* q_row = q_rows + warp * d;
  if (active)
    load_row(q, b, i, h, dims, dims.q_ld, q_row, lane);

  float m = -INFINITY;
  float l = 0.0f;
  float o[kPerLane];
#pragma unroll
  for (int r = 0; r < kPerLane; ++r)
    o[r] = 0.0f;

  const std::int64_t last_query = min(first_query + kRowsPerBlock, dims.seq) - 1;
  for (std::int64_t first_key = 0; first_key <= last_query; first_key += kTile) {
    __syncthreads(); // the previous tile is consumed (and q_rows written on the first pass)
    load_tile(k, b, first_key, g, dims, dims.kv_ld, k_tile);
    load_tile(v, b, first_key, g, dims, dims.kv_ld, v_tile);
    __syncthreads();
    if (!active || first_key > i)
      continue; // warp-uniform: the whole warp skips
    const std::int64_t j = first_key + lane;
    const bool visible = j <= i;
    const float s = visible ? dot_row(q_row, k_tile + lane * stride, d) * dims.scale : -INFINITY;
    // Key first_key ≤ i is visible, so m_new is finite; on the first tile m = −inf and the
    // correction is exp(−inf) = 0.
    const float m_new = fmaxf(m, warp_max(s));
    const float p = visible ? expf(s - m_new) : 0.0f;
    const float correction = expf(m - m_new);
    l = l * correction + warp_sum(p);
#pragma unroll
    for (int r = 0; r < kPerLane; ++r)
      o[r] *= correction;
    for (int jj = 0; jj < kTile; ++jj) {
      const float pj = __shfl_sync(kFullMask, p, jj);
#pragma unroll
      for (int r = 0; r < kPerLane; ++r) {
        const int c = lane + r * kWarpSize;
        if (c < d)
          o[r] += pj * v_tile[jj * stride + c];
      }
    }
    m = m_new;
  }
  if (!active)
    return;
  const float inv_l = 1.0f / l;
  float* out_row = out + (b * dims.seq + i) * dims.q_ld + std::int64_t{h} * d;
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) {
    const int c = lane + r * kWarpSize;
    if (c < d)
      out_row[c] = o[r] * inv_l;
  }
  if (lane == 0)
    lse[(b * dims.heads + h) * dims.seq + i] = m + logf(l);
}

// delta[b·heads + h, i] = Σ_c dout ⊙ out over head h of row (b, i). One warp per entry.
__global__ void attention_delta_kernel(const float* out, const float* dout, float* delta,
                                       std::int64_t batch, Dims dims) {
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const std::int64_t total = batch * dims.heads * dims.seq;
  for (std::int64_t e = detail::global_thread() / kWarpSize; e < total; e += warps) {
    const std::int64_t bh = e / dims.seq; // b·heads + h
    const std::int64_t i = e % dims.seq;
    const std::int64_t b = bh / dims.heads;
    const int h = static_cast<int>(bh % dims.heads);
    const std::int64_t offset = (b * dims.seq + i) * dims.q_ld + std::int64_t{h} * dims.d;
    float acc = 0.0f;
    for (int c = lane; c < dims.d; c += kWarpSize)
      acc += dout[offset + c] * out[offset + c];
    acc = warp_sum(acc);
    if (lane == 0)
      delta[e] = acc;
  }
}

__global__ void attention_dq_kernel(const float* q, const float* k, const float* v,
                                    const float* dout, const float* lse, const float* delta,
                                    float* dq, Dims dims) {
  extern __shared__ float smem[];
  const int d = dims.d;
  const int stride = d + 1;
  float* q_rows = smem;                        // [kRowsPerBlock][d]
  float* do_rows = q_rows + kRowsPerBlock * d; // [kRowsPerBlock][d]
  float* k_tile = do_rows + kRowsPerBlock * d; // [kTile][d+1]
  float* v_tile = k_tile + kTile * stride;     // [kTile][d+1]
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const std::int64_t b = blockIdx.z;
  const int h = static_cast<int>(blockIdx.y);
  const int g = h / (dims.heads / dims.kv_heads);
  const std::int64_t first_query = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock;
  const std::int64_t i = first_query + warp;
  const bool active = i < dims.seq;
  float* q_row = q_rows + warp * d;
  float* do_row = do_rows + warp * d;
  float row_lse = 0.0f;
  float row_delta = 0.0f;
  if (active) {
    load_row(q, b, i, h, dims, dims.q_ld, q_row, lane);
    load_row(dout, b, i, h, dims, dims.q_ld, do_row, lane);
    row_lse = lse[(b * dims.heads + h) * dims.seq + i];
    row_delta = delta[(b * dims.heads + h) * dims.seq + i];
  }
  float acc[kPerLane];
#pragma unroll
  for (int r = 0; r < kPerLane; ++r)
    acc[r] = 0.0f;

  const std::int64_t last_query = min(first_query + kRowsPerBlock, dims.seq) - 1;
  for (std::int64_t first_key = 0; first_key <= last_query; first_key += kTile) {
    __syncthreads();
    load_tile(k, b, first_key, g, dims, dims.kv_ld, k_tile);
    load_tile(v, b, first_key, g, dims, dims.kv_ld, v_tile);
    __syncthreads();
    if (!active || first_key > i)
      continue;
    const std::int64_t j = first_key + lane;
    float ds = 0.0f;
    if (j <= i) {
      const float s = dot_row(q_row, k_tile + lane * stride, d) * dims.scale;
      const float p = expf(s - row_lse);
      const float dp = dot_row(do_row, v_tile + lane * stride, d);
      ds = p * (dp - row_delta) * dims.scale;
    }
    for (int jj = 0; jj < kTile; ++jj) {
      const float dsj = __shfl_sync(kFullMask, ds, jj);
#pragma unroll
      for (int r = 0; r < kPerLane; ++r) {
        const int c = lane + r * kWarpSize;
        if (c < d)
          acc[r] += dsj * k_tile[jj * stride + c];
      }
    }
  }
  if (!active)
    return;
  float* dq_row = dq + (b * dims.seq + i) * dims.q_ld + std::int64_t{h} * d;
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) {
    const int c = lane + r * kWarpSize;
    if (c < d)
      dq_row[c] = acc[r];
  }
}

__global__ void attention_dkdv_kernel(const float* q, const float* k, const float* v,
                                      const float* dout, const float* lse, const float* delta,
                                      float* dk, float* dv, Dims dims) {
  extern __shared__ float smem[];
  const int d = dims.d;
  const int stride = d + 1;
  float* k_rows = smem;                       // [kRowsPerBlock][d]
  float* v_rows = k_rows + kRowsPerBlock * d; // [kRowsPerBlock][d]
  float* q_tile = v_rows + kRowsPerBlock * d; // [kTile][d+1]
  float* do_tile = q_tile + kTile * stride;   // [kTile][d+1]
  float* lse_tile = do_tile + kTile * stride; // [kTile]
  float* delta_tile = lse_tile + kTile;       // [kTile]
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const std::int64_t b = blockIdx.z;
  const int g = static_cast<int>(blockIdx.y);
  const int group = dims.heads / dims.kv_heads;
  const std::int64_t first_key = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock;
  const std::int64_t j = first_key + warp;
  const bool active = j < dims.seq;
  float* k_row = k_rows + warp * d;
  float* v_row = v_rows + warp * d;
  if (active) {
    load_row(k, b, j, g, dims, dims.kv_ld, k_row, lane);
    load_row(v, b, j, g, dims, dims.kv_ld, v_row, lane);
  }
  float dk_acc[kPerLane];
  float dv_acc[kPerLane];
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) {
    dk_acc[r] = 0.0f;
    dv_acc[r] = 0.0f;
  }

  for (int h = g * group; h < (g + 1) * group; ++h) {
    const float* lse_h = lse + (b * dims.heads + h) * dims.seq;
    const float* delta_h = delta + (b * dims.heads + h) * dims.seq;
    // Queries before the block's first key see none of its keys.
    for (std::int64_t first_query = first_key; first_query < dims.seq; first_query += kTile) {
      __syncthreads();
      load_tile(q, b, first_query, h, dims, dims.q_ld, q_tile);
      load_tile(dout, b, first_query, h, dims, dims.q_ld, do_tile);
      if (threadIdx.x < kTile) {
        const std::int64_t pos = first_query + threadIdx.x;
        lse_tile[threadIdx.x] = pos < dims.seq ? lse_h[pos] : 0.0f;
        delta_tile[threadIdx.x] = pos < dims.seq ? delta_h[pos] : 0.0f;
      }
      __syncthreads();
      if (!active)
        continue;
      const std::int64_t i = first_query + lane;
      float p = 0.0f;
      float ds = 0.0f;
      if (i >= j && i < dims.seq) {
        const float s = dot_row(q_tile + lane * stride, k_row, d) * dims.scale;
        p = expf(s - lse_tile[lane]);
        const float dp = dot_row(do_tile + lane * stride, v_row, d);
        ds = p * (dp - delta_tile[lane]) * dims.scale;
      }
      for (int ii = 0; ii < kTile; ++ii) {
        const float pi = __shfl_sync(kFullMask, p, ii);
        const float dsi = __shfl_sync(kFullMask, ds, ii);
#pragma unroll
        for (int r = 0; r < kPerLane; ++r) {
          const int c = lane + r * kWarpSize;
          if (c < d) {
            dv_acc[r] += pi * do_tile[ii * stride + c];
            dk_acc[r] += dsi * q_tile[ii * stride + c];
          }
        }
      }
    }
  }
  if (!active)
    return;
  const std::int64_t offset = (b * dims.seq + j) * dims.kv_ld + std::int64_t{g} * d;
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) {
    const int c = lane + r * kWarpSize;
    if (c < d) {
      dk[offset + c] = dk_acc[r];
      dv[offset + c] = dv_acc[r];
    }
  }
}

Dims make_dims(const AttentionShape& s) {
  PARALLAX_CHECK(s.kv_heads > 0 && s.heads > 0 && s.heads % s.kv_heads == 0,
                 "query heads must be a positive multiple of key/value heads");
  PARALLAX_CHECK(s.head_dim > 0 && s.head_dim <= kMaxAttentionHeadDim,
                 "attention head_dim " + std::to_string(s.head_dim) + " is outside [1, " +
                     std::to_string(kMaxAttentionHeadDim) + "]");
  return {s.seq,
          s.heads,
          s.kv_heads,
          s.head_dim,
          1.0f / std::sqrt(static_cast<float>(s.head_dim)),
          std::int64_t{s.heads} * s.head_dim,
          std::int64_t{s.kv_heads} * s.head_dim};
}

void check_qkv(DeviceView q, DeviceView k, DeviceView v, const AttentionShape& s) {
  check_view(q, s.batch * s.seq, std::int64_t{s.heads} * s.head_dim, DType::f32, "attention q");
  check_view(k, s.batch * s.seq, std::int64_t{s.kv_heads} * s.head_dim, DType::f32, "attention k");
  check_view(v, s.batch * s.seq, std::int64_t{s.kv_heads} * s.head_dim, DType::f32, "attention v");
}

// Shared memory above the 48 KiB default needs an opt-in per kernel (sm_80: up to 163 KiB).
template <class Kernel> void allow_shared_bytes(Kernel kernel, std::size_t bytes) {
  if (bytes > static_cast<std::size_t>(kDefaultSharedBytes)) {
    PARALLAX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(bytes)));
  }
}

std::size_t tile_bytes(int d) {
  return sizeof(float) * static_cast<std::size_t>(kTile) * (d + 1);
}
std::size_t rows_bytes(int d) {
  return sizeof(float) * static_cast<std::size_t>(kRowsPerBlock) * d;
}

dim3 row_grid(const AttentionShape& s, int heads) {
  return {static_cast<unsigned>((s.seq + kRowsPerBlock - 1) / kRowsPerBlock),
          static_cast<unsigned>(heads), static_cast<unsigned>(s.batch)};
}

} // namespace

void attention_forward(DeviceView q, DeviceView k, DeviceView v, const AttentionShape& shape,
                       DeviceView out, DeviceView lse, cudaStream_t stream) {
  const Dims dims = make_dims(shape);
  check_qkv(q, k, v, shape);
  check_view(out, q.rows, q.cols, DType::f32, "attention output");
  check_view(lse, shape.batch * shape.heads, shape.seq, DType::f32, "attention lse");
  if (shape.batch == 0 || shape.seq == 0)
    return;
  const std::size_t shared = rows_bytes(dims.d) + 2 * tile_bytes(dims.d);
  allow_shared_bytes(attention_forward_kernel, shared);
  attention_forward_kernel<<<row_grid(shape, shape.heads), kBlockThreads, shared, stream>>>(
      q.f32(), k.f32(), v.f32(), out.f32(), lse.f32(), dims);
  detail::check_launch();
}

void attention_backward(DeviceView q, DeviceView k, DeviceView v, DeviceView out, DeviceView dout,
                        DeviceView lse, const AttentionShape& shape, DeviceView delta,
                        DeviceView dq, DeviceView dk, DeviceView dv, cudaStream_t stream) {
  const Dims dims = make_dims(shape);
  check_qkv(q, k, v, shape);
  check_view(out, q.rows, q.cols, DType::f32, "attention output");
  check_view(dout, q.rows, q.cols, DType::f32, "attention output gradient");
  check_view(lse, shape.batch * shape.heads, shape.seq, DType::f32, "attention lse");
  check_view(delta, shape.batch * shape.heads, shape.seq, DType::f32, "attention delta scratch");
  check_view(dq, q.rows, q.cols, DType::f32, "attention q gradient");
  check_view(dk, k.rows, k.cols, DType::f32, "attention k gradient");
  check_view(dv, v.rows, v.cols, DType::f32, "attention v gradient");
  if (shape.batch == 0 || shape.seq == 0)
    return;

  const std::int64_t entries = shape.batch * shape.heads * shape.seq;
  attention_delta_kernel<<<detail::grid_for(entries * kWarpSize, kBlockThreads), kBlockThreads, 0,
                           stream>>>(out.f32(), dout.f32(), delta.f32(), shape.batch, dims);
  detail::check_launch();

  const std::size_t dq_shared = 2 * rows_bytes(dims.d) + 2 * tile_bytes(dims.d);
  allow_shared_bytes(attention_dq_kernel, dq_shared);
  attention_dq_kernel<<<row_grid(shape, shape.heads), kBlockThreads, dq_shared, stream>>>(
      q.f32(), k.f32(), v.f32(), dout.f32(), lse.f32(), delta.f32(), dq.f32(), dims);
  detail::check_launch();

  const std::size_t dkdv_shared =
      2 * rows_bytes(dims.d) + 2 * tile_bytes(dims.d) + 2 * sizeof(float) * kTile;
  allow_shared_bytes(attention_dkdv_kernel, dkdv_shared);
  attention_dkdv_kernel<<<row_grid(shape, shape.kv_heads), kBlockThreads, dkdv_shared, stream>>>(
      q.f32(), k.f32(), v.f32(), dout.f32(), lse.f32(), delta.f32(), dk.f32(), dv.f32(), dims);
  detail::check_launch();
}

} // namespace parallax::cuda
