// The executor's device operators: each forward with its backward, the CUDA twins of the CPU
// ops in parallax/executor/ops.hpp (same math, same layouts, checked against them in
// tests/executor_cuda/ops_cuda_test.cpp). GEMMs are in gemm.hpp, AdamW in adamw.hpp.
//
// Shapes: activations are [tokens, features] row-major, tokens = batch · seq batch-major.
// Backward functions overwrite input gradients and accumulate parameter gradients (dγ += …).
// All tensors are fp32 unless a signature says otherwise; every op is enqueued on `stream`
// and returns at once. Sums run in a fixed order, so a run reproduces itself bit for bit.
#pragma once

#include "parallax/executor/cuda/device_tensor.hpp"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>
#include <vector>

namespace parallax::cuda {

// ---- Precision conversion (mixed precision: bf16 copies of fp32 tensors for the GEMMs) ----
// dst = bf16(src), rounded to nearest even; same shape.
void convert_f32_to_bf16(DeviceView src, DeviceView dst, cudaStream_t stream);
// dst = float(src), exact.
void convert_bf16_to_f32(DeviceView src, DeviceView dst, cudaStream_t stream);

// ---- Norms, with the pre-norm residual add fused in ----
// LayerNorm over each row: y = (u − μ)·rstd·γ + β with u = x, or u = x + residual when
// `residual` is given, in which case u is also written to `sum` (the block's new residual
// stream; `sum` may alias x or residual). mean and rstd are [rows, 1], saved for the backward.
void layernorm_forward(DeviceView x, DeviceView residual, DeviceView sum, DeviceView gamma,
                       DeviceView beta, DeviceView y, DeviceView mean, DeviceView rstd, float eps,
                       cudaStream_t stream);
// u is the normalised input (x, or the forward's `sum`). dx = ∂loss/∂u, plus `dresidual` when
// given (the gradient already on the residual stream; dx may alias it). dγ, dβ accumulate.
void layernorm_backward(DeviceView u, DeviceView gamma, DeviceView mean, DeviceView rstd,
                        DeviceView dy, DeviceView dresidual, DeviceView dx, DeviceView dgamma,
                        DeviceView dbeta, cudaStream_t stream);

// RMSNorm: y = u·rstd·γ with rstd = 1/sqrt(mean(u²) + eps) ([rows, 1], saved); residual as above.
void rmsnorm_forward(DeviceView x, DeviceView residual, DeviceView sum, DeviceView gamma,
                     DeviceView y, DeviceView rstd, float eps, cudaStream_t stream);
void rmsnorm_backward(DeviceView u, DeviceView gamma, DeviceView rstd, DeviceView dy,
                      DeviceView dresidual, DeviceView dx, DeviceView dgamma, cudaStream_t stream);

// ---- Activations ----
// GELU, tanh approximation (GPT-2). dx may alias dy.
void gelu_forward(DeviceView x, DeviceView y, cudaStream_t stream);
void gelu_backward(DeviceView x, DeviceView dy, DeviceView dx, cudaStream_t stream);
// SwiGLU: y = silu(gate) ⊙ up.
void swiglu_forward(DeviceView gate, DeviceView up, DeviceView y, cudaStream_t stream);
void swiglu_backward(DeviceView gate, DeviceView up, DeviceView dy, DeviceView dgate,
                     DeviceView dup, cudaStream_t stream);

// ---- Causal attention with grouped-query heads (flash-style: no seq × seq matrix) ----
struct AttentionShape {
  std::int64_t batch = 1;
  std::int64_t seq = 1;
  int heads = 1;    // query heads (local to this tensor-parallel rank)
  int kv_heads = 1; // key/value heads; query head j reads kv head j / (heads / kv_heads)
  int head_dim = 1; // ≤ kMaxAttentionHeadDim
};
constexpr int kMaxAttentionHeadDim = 256;

// out = softmax(q·kᵀ/√d, causal)·v per head. q, out: [batch·seq, heads·d]; k, v:
// [batch·seq, kv_heads·d]; lse: [batch·heads, seq], the log-sum-exp of each query's scaled
// scores (row b·heads + h, column i), saved for the backward instead of the probabilities.
void attention_forward(DeviceView q, DeviceView k, DeviceView v, const AttentionShape& shape,
                       DeviceView out, DeviceView lse, cudaStream_t stream);
// dq, dk, dv overwritten; probabilities are recomputed from q, k and lse. delta is scratch of
// lse's shape (Σ_d dout ⊙ out per query).
void attention_backward(DeviceView q, DeviceView k, DeviceView v, DeviceView out, DeviceView dout,
                        DeviceView lse, const AttentionShape& shape, DeviceView delta,
                        DeviceView dq, DeviceView dk, DeviceView dv, cudaStream_t stream);

// ---- Fused softmax + cross-entropy over the full vocabulary (no tensor-parallel split) ----
// For each row r of logits [rows, V] and its target t_r (device int32 [rows]):
//   loss[r] = log Σ_v exp(l_rv − M_r) + M_r − l_r,t_r        (M_r the row max)
//   dlogits[r, v] = scale · (exp(l_rv − M_r)/S_r − [v = t_r])
// in two passes over the row; probabilities are never stored. dlogits may alias logits. A
// target outside [0, V) contributes no target term (as the CPU ops with another rank's target).
// loss is [rows, 1].
void softmax_cross_entropy(DeviceView logits, const std::int32_t* targets, float scale,
                           DeviceView loss, DeviceView dlogits, cudaStream_t stream);

// ---- Trainer pieces: embeddings, rotary, vocabulary-parallel cross-entropy, flat buffers ----
// The device twins of the CPU ops of the same names (parallax/executor/ops.hpp). Token,
// target and position arrays are device int32 arrays with one entry per row.

// Vocabulary-parallel embedding: out[r, :] = table[tokens[r] − vocab_begin, :], zero when the
// token is another rank's; with `accumulate` the row is added to out instead (learned
// positions: tokens = positions, vocab_begin = 0).
void embedding_forward(const std::int32_t* tokens, DeviceView table, std::int64_t vocab_begin,
                       DeviceView out, bool accumulate, cudaStream_t stream);
// The rows of a micro-batch grouped by token, for a deterministic and parallel embedding
// backward: `order` lists the rows sorted by token (stable: rows of one token stay in row
// order), group g holds order[starts[g] .. starts[g + 1]) and its token is tokens[g]. Built on
// the host (the tokens are there); device copies of the three arrays go to the kernel.
struct TokenGroups {
  std::vector<std::int32_t> order;
  std::vector<std::int32_t> starts; // groups + 1 entries
  std::vector<std::int32_t> tokens; // one per group
  static TokenGroups of(std::span<const std::int32_t> row_tokens);
  std::int64_t groups() const { return static_cast<std::int64_t>(tokens.size()); }
};
// dtable[t − vocab_begin, :] += dout[r, :] for every row r of token t, when t is local. One
// block per token adds its rows in row order, as the CPU op does: the same bits, no atomics.
// order, starts and tokens are device copies of a TokenGroups' arrays.
void embedding_backward(const std::int32_t* order, const std::int32_t* starts,
                        const std::int32_t* tokens, std::int64_t groups, DeviceView dout,
                        std::int64_t vocab_begin, DeviceView dtable, cudaStream_t stream);

// Rotary position embedding in place on x = [tokens, heads·head_dim]: pairs (i, i + d/2) of
// each head rotated by positions[r]·theta^(−2i/d); direction −1 rotates back (the backward).
void rope(DeviceView x, int head_dim, const std::int32_t* positions, float theta, float direction,
          cudaStream_t stream);

// Cross-entropy over a vocabulary shard, in pieces around the tensor-parallel all-reduces:
// max[r] = max_v l[r, v]; sum[r] = Σ_v exp(l[r, v] − max[r]); out[r] = l[r, t_r − vocab_begin]
// or 0 when the target is another rank's; dlogits = scale·(exp(l − max)/sum − onehot(target))
// (dlogits may alias logits). max, sum and out are [rows, 1].
void row_max(DeviceView logits, DeviceView max, cudaStream_t stream);
void row_sum_exp(DeviceView logits, DeviceView max, DeviceView sum, cudaStream_t stream);
void target_logits(DeviceView logits, const std::int32_t* targets, std::int64_t vocab_begin,
                   DeviceView out, cudaStream_t stream);
void cross_entropy_backward(DeviceView logits, DeviceView max, DeviceView sum,
                            const std::int32_t* targets, std::int64_t vocab_begin, float scale,
                            DeviceView dlogits, cudaStream_t stream);

// y = a + b elementwise (y may alias a or b); dst += src over n floats.
void add(DeviceView a, DeviceView b, DeviceView y, cudaStream_t stream);
void add_inplace(float* dst, const float* src, std::int64_t n, cudaStream_t stream);

// *total += Σ x[i]² over n floats, in double, in a fixed order (a fixed grid of partial sums
// added in block order), so the gradient norm reproduces itself bit for bit. `total` is one
// device double; `partials` is device scratch of kSumSquaresBlocks doubles.
constexpr int kSumSquaresBlocks = 128;
void accumulate_sum_squares(const float* x, std::int64_t n, double* total, double* partials,
                            cudaStream_t stream);

} // namespace parallax::cuda
