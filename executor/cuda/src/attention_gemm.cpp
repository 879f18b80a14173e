// Causal attention as batched GEMMs (see attention_gemm.hpp): the heads are split into
// contiguous [seq, d] matrices, and the products of each (batch, kv head) run as one strided
// cuBLASLt call over the group of query heads that share it — a group's query heads are
// adjacent, so stacked they form one [group·seq, d] matrix against the kv head's [seq, d], and
// the probabilities of the group are one [group·seq, seq] block. No kv head is copied per query
// head, and dK, dV sum over the group inside their GEMM. The causal softmax runs over the
// materialised scores (row r's query position is r % seq, whatever the stacking).
#include "parallax/executor/cuda/attention_gemm.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/cuda/device_allocator.hpp"

#include <cmath>
#include <string>

namespace parallax::cuda {

namespace {

struct Dims {
  std::int64_t batch, seq, d, pairs; // pairs = batch · heads
  int heads, kv_heads, group;
  std::int64_t units() const { return batch * kv_heads; }         // one GEMM per (batch, kv head)
  std::int64_t rows() const { return std::int64_t{group} * seq; } // query rows per unit
};

Dims dims_of(const AttentionShape& s) {
  PARALLAX_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0,
                 "query heads must be a multiple of key/value heads");
  PARALLAX_CHECK(s.batch > 0 && s.seq > 0 && s.head_dim > 0,
                 "attention needs a positive batch, sequence and head dimension");
  return {s.batch, s.seq, s.head_dim, s.batch * s.heads, s.heads, s.kv_heads, s.heads / s.kv_heads};
}

void check_operands(DeviceView q, DeviceView k, DeviceView v, const Dims& g) {
  const std::int64_t rows = g.batch * g.seq;
  PARALLAX_CHECK(q.rows == rows && q.cols == g.heads * g.d && q.dtype == DType::f32,
                 "attention q is not [batch·seq, heads·d] f32");
  PARALLAX_CHECK(k.rows == rows && k.cols == g.kv_heads * g.d && k.dtype == DType::f32,
                 "attention k is not [batch·seq, kv_heads·d] f32");
  if (v) {
    PARALLAX_CHECK(v.rows == rows && v.cols == g.kv_heads * g.d && v.dtype == DType::f32,
                   "attention v is not [batch·seq, kv_heads·d] f32");
  }
}

// x's `heads` heads as contiguous [seq, d] matrices, (batch, head) pairs in order.
DeviceTensor split(DeviceAllocator& alloc, DeviceView x, const Dims& g, int heads, DType dtype,
                   cudaStream_t stream) {
  DeviceTensor out(alloc, g.batch * heads * g.seq, g.d, dtype);
  split_heads(x, g.batch, g.seq, heads, 1, static_cast<int>(g.d), out, stream);
  return out;
}

// The first matrix of a batch laid out back to back.
DeviceView first(const DeviceTensor& t, std::int64_t rows, std::int64_t cols) {
  return {t.data(), rows, cols, t.dtype()};
}
DeviceView first(DeviceView t, std::int64_t rows, std::int64_t cols) {
  return {t.data, rows, cols, t.dtype};
}

// The probabilities (or their gradient) as a GEMM input: themselves, or a bf16 copy.
DeviceTensor gemm_copy(DeviceAllocator& alloc, GemmPrecision precision, DeviceView x,
                       cudaStream_t stream) {
  if (gemm_input_dtype(precision) == DType::f32)
    return DeviceTensor();
  DeviceTensor copy(alloc, x.rows, x.cols, DType::bf16);
  convert_f32_to_bf16(x, copy, stream);
  return copy;
}

float softmax_scale(const Dims& g) {
  return 1.0f / std::sqrt(static_cast<float>(g.d)); // as the CPU op
}

} // namespace

void attention_gemm_probs(Blas& blas, GemmPrecision precision, DeviceAllocator& alloc, DeviceView q,
                          DeviceView k, const AttentionShape& shape, DeviceView probs,
                          cudaStream_t stream) {
  const Dims g = dims_of(shape);
  check_operands(q, k, {}, g);
  PARALLAX_CHECK(probs.rows == g.pairs && probs.cols == g.seq * g.seq && probs.dtype == DType::f32,
                 "attention probabilities are not [batch·heads, seq·seq] f32");
  const DType in = gemm_input_dtype(precision);
  const DeviceTensor qh = split(alloc, q, g, g.heads, in, stream);
  const DeviceTensor kh = split(alloc, k, g, g.kv_heads, in, stream);
  const std::int64_t td = g.seq * g.d;
  // S of a group = scale · [its query heads stacked] · Kᵀ.
  matmul_batched(blas, precision, first(qh, g.rows(), g.d), false, first(kh, g.seq, g.d), true,
                 first(probs, g.rows(), g.seq), softmax_scale(g), 0.0f,
                 {g.units(), g.rows() * g.d, td, g.rows() * g.seq}, stream);
  causal_softmax_forward({probs.data, g.pairs * g.seq, g.seq, DType::f32}, g.seq, stream);
}

void attention_gemm_forward(Blas& blas, GemmPrecision precision, DeviceAllocator& alloc,
                            DeviceView q, DeviceView k, DeviceView v, const AttentionShape& shape,
                            DeviceView probs, DeviceView out, cudaStream_t stream) {
  const Dims g = dims_of(shape);
  check_operands(q, k, v, g);
  PARALLAX_CHECK(out.rows == q.rows && out.cols == q.cols && out.dtype == DType::f32,
                 "attention output is not shaped like q");
  attention_gemm_probs(blas, precision, alloc, q, k, shape, probs, stream);
  const DType in = gemm_input_dtype(precision);
  const DeviceTensor vh = split(alloc, v, g, g.kv_heads, in, stream);
  const DeviceView p_flat{probs.data, g.pairs * g.seq, g.seq, DType::f32};
  const DeviceTensor p_copy = gemm_copy(alloc, precision, p_flat, stream);
  const DeviceView p = p_copy.empty() ? p_flat : p_copy.view();
  DeviceTensor oh(alloc, g.pairs * g.seq, g.d);
  const std::int64_t td = g.seq * g.d;
  // O of a group = P (its [group·seq, seq] block) · V.
  matmul_batched(blas, precision, first(p, g.rows(), g.seq), false, first(vh, g.seq, g.d), false,
                 first(oh, g.rows(), g.d), 1.0f, 0.0f,
                 {g.units(), g.rows() * g.seq, td, g.rows() * g.d}, stream);
  merge_heads(oh, g.batch, g.seq, g.heads, 1, static_cast<int>(g.d), out, stream);
}

void attention_gemm_backward(Blas& blas, GemmPrecision precision, DeviceAllocator& alloc,
                             DeviceView q, DeviceView k, DeviceView v, DeviceView probs,
                             DeviceView dout, const AttentionShape& shape, DeviceView dq,
                             DeviceView dk, DeviceView dv, cudaStream_t stream) {
  const Dims g = dims_of(shape);
  check_operands(q, k, v, g);
  check_operands(dq, dk, dv, g);
  PARALLAX_CHECK(dout.rows == q.rows && dout.cols == q.cols && dout.dtype == DType::f32,
                 "attention output gradient is not shaped like q");
  PARALLAX_CHECK(probs.rows == g.pairs && probs.cols == g.seq * g.seq && probs.dtype == DType::f32,
                 "attention probabilities are not [batch·heads, seq·seq] f32");
  const DType in = gemm_input_dtype(precision);
  const std::int64_t td = g.seq * g.d;
  const std::int64_t stacked_d = g.rows() * g.d;   // a group's stacked [group·seq, d]
  const std::int64_t stacked_t = g.rows() * g.seq; // a group's [group·seq, seq] block
  const int d = static_cast<int>(g.d);
  const DeviceTensor qh = split(alloc, q, g, g.heads, in, stream);
  const DeviceTensor kh = split(alloc, k, g, g.kv_heads, in, stream);
  const DeviceTensor doh = split(alloc, dout, g, g.heads, in, stream);
  const DeviceView p_flat{probs.data, g.pairs * g.seq, g.seq, DType::f32};

  // dP = dO·Vᵀ, and dV = Pᵀ·dO summed over the group inside the GEMM (inner size group·seq).
  DeviceTensor dp(alloc, g.pairs * g.seq, g.seq);
  DeviceTensor dvh(alloc, g.units() * g.seq, g.d);
  {
    const DeviceTensor vh = split(alloc, v, g, g.kv_heads, in, stream);
    matmul_batched(blas, precision, first(doh, g.rows(), g.d), false, first(vh, g.seq, g.d), true,
                   first(dp, g.rows(), g.seq), 1.0f, 0.0f, {g.units(), stacked_d, td, stacked_t},
                   stream);
    const DeviceTensor p_copy = gemm_copy(alloc, precision, p_flat, stream);
    const DeviceView p = p_copy.empty() ? p_flat : p_copy.view();
    matmul_batched(blas, precision, first(p, g.rows(), g.seq), true, first(doh, g.rows(), g.d),
                   false, first(dvh, g.seq, g.d), 1.0f, 0.0f, {g.units(), stacked_t, stacked_d, td},
                   stream);
  }
  // dS = scale · P ⊙ (dP − Σ P ⊙ dP), over dP; then dQ = dS·K and dK = dSᵀ·Q (group-summed).
  causal_softmax_backward(p_flat, dp, softmax_scale(g), dp, g.seq, stream);
  const DeviceTensor ds_copy = gemm_copy(alloc, precision, dp, stream);
  const DeviceView ds = ds_copy.empty() ? dp.view() : ds_copy.view();
  DeviceTensor dqh(alloc, g.pairs * g.seq, g.d);
  DeviceTensor dkh(alloc, g.units() * g.seq, g.d);
  matmul_batched(blas, precision, first(ds, g.rows(), g.seq), false, first(kh, g.seq, g.d), false,
                 first(dqh, g.rows(), g.d), 1.0f, 0.0f, {g.units(), stacked_t, td, stacked_d},
                 stream);
  matmul_batched(blas, precision, first(ds, g.rows(), g.seq), true, first(qh, g.rows(), g.d), false,
                 first(dkh, g.seq, g.d), 1.0f, 0.0f, {g.units(), stacked_t, stacked_d, td}, stream);
  merge_heads(dqh, g.batch, g.seq, g.heads, 1, d, dq, stream);
  merge_heads(dkh, g.batch, g.seq, g.kv_heads, 1, d, dk, stream);
  merge_heads(dvh, g.batch, g.seq, g.kv_heads, 1, d, dv, stream);
}

} // namespace parallax::cuda
