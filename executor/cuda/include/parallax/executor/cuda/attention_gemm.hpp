// Causal attention on tensor cores: the device twins of ops::attention_probs / _forward /
// _backward (parallax/executor/ops.hpp), with the same operands and the same materialised
// probabilities, computed as cuBLASLt batched GEMMs over (batch, head) pairs around a causal
// softmax kernel. Memory grows as seq² per head (the probabilities), the price of running the
// two seq × seq × head_dim products on tensor cores; attention_forward / _backward in ops.hpp
// are the flash-style alternative (no seq² matrix, CUDA cores).
//
// Layouts: q [batch·seq, heads·d], k and v [batch·seq, kv_heads·d] (query head j reads kv head
// j / (heads / kv_heads)), out and dq like q, dk and dv like k; probs [batch·heads, seq·seq]
// fp32, row b·heads + h holding query i's row at i·seq (zero above the diagonal). The heads are
// copied to [batch·heads, seq, d] (q) and [batch·kv_heads, seq, d] (k, v) layouts in the GEMM
// input dtype, and back; each kv head's query heads run as one stacked GEMM against it (no kv
// copies per query head). Temporaries come from `alloc`. All work is enqueued on `stream`.
#pragma once

#include "parallax/executor/cuda/gemm.hpp"
#include "parallax/executor/cuda/ops.hpp"

namespace parallax::cuda {

class DeviceAllocator;

// probs = causal softmax(q·kᵀ/√d) per (batch, head).
void attention_gemm_probs(Blas& blas, GemmPrecision precision, DeviceAllocator& alloc, DeviceView q,
                          DeviceView k, const AttentionShape& shape, DeviceView probs,
                          cudaStream_t stream);
// probs as above, then out = probs·v per head.
void attention_gemm_forward(Blas& blas, GemmPrecision precision, DeviceAllocator& alloc,
                            DeviceView q, DeviceView k, DeviceView v, const AttentionShape& shape,
                            DeviceView probs, DeviceView out, cudaStream_t stream);
// dq, dk, dv overwritten from the saved (or recomputed) probs; a kv head's gradient sums its
// query heads' inside one GEMM.
void attention_gemm_backward(Blas& blas, GemmPrecision precision, DeviceAllocator& alloc,
                             DeviceView q, DeviceView k, DeviceView v, DeviceView probs,
                             DeviceView dout, const AttentionShape& shape, DeviceView dq,
                             DeviceView dk, DeviceView dv, cudaStream_t stream);

// The kernels around the GEMMs (attention_gemm.cu).
// out[(b·H + h)·T + t, :] = x[b·T + t, (h / group)·d : +d], H = heads_out, in the out dtype
// (f32 or bf16): the heads of x, each contiguous, kv heads repeated for their query heads.
void split_heads(DeviceView x, std::int64_t batch, std::int64_t seq, int heads_out, int group,
                 int head_dim, DeviceView out, cudaStream_t stream);
// out[b·T + t, g·d : +d] = Σ_{j < group} in[(b·H + g·group + j)·T + t, :] (in order), H =
// heads_out·group: back to [batch·seq, heads_out·d], summing the query heads of a kv head.
void merge_heads(DeviceView in, std::int64_t batch, std::int64_t seq, int heads_out, int group,
                 int head_dim, DeviceView out, cudaStream_t stream);
// In place on rows of [rows, seq] scores (row r is query r % seq): causal softmax, zero above
// the diagonal.
void causal_softmax_forward(DeviceView scores, std::int64_t seq, cudaStream_t stream);
// dscores = scale · P ⊙ (dP − Σ_j P ⊙ dP) per row, zero above the diagonal; dscores may alias dP.
void causal_softmax_backward(DeviceView probs, DeviceView dprobs, float scale, DeviceView dscores,
                             std::int64_t seq, cudaStream_t stream);

} // namespace parallax::cuda
