// The executor's CPU operators (fp32, Eigen): each forward with its hand-written backward.
//
// Shapes: activations are [tokens, features] with tokens = batch · seq in batch-major order
// (row b·seq + t is position t of sequence b). Weights are [in, out] (y = x·W + b). Backward
// functions overwrite input gradients (dx) and accumulate parameter gradients (dW += …), so
// micro-batch gradient accumulation is just calling them again.
#pragma once

#include "parallax/executor/adamw.hpp"
#include "parallax/executor/tensor.hpp"

#include <cstdint>
#include <span>

namespace parallax::ops {

// y = x·W (+ b). b is [1, out] or absent.
void linear_forward(ConstMatRef x, ConstMatRef w, ConstMatRef b, MatRef y);
// dx = dy·Wᵀ (skipped when dx is absent; added to dx when accumulate_dx), dW += xᵀ·dy,
// db += Σ_rows dy (skipped when absent).
void linear_backward(ConstMatRef x, ConstMatRef w, ConstMatRef dy, MatRef dx, MatRef dw, MatRef db,
                     bool accumulate_dx = false);

// LayerNorm over each row: y = (x − μ)·rstd·γ + β; mean and rstd ([rows, 1]) are saved.
void layernorm_forward(ConstMatRef x, ConstMatRef gamma, ConstMatRef beta, MatRef y, MatRef mean,
                       MatRef rstd, float eps);
void layernorm_backward(ConstMatRef x, ConstMatRef gamma, ConstMatRef mean, ConstMatRef rstd,
                        ConstMatRef dy, MatRef dx, MatRef dgamma, MatRef dbeta);

// RMSNorm: y = x·rstd·γ with rstd = 1/sqrt(mean(x²) + eps) ([rows, 1], saved).
void rmsnorm_forward(ConstMatRef x, ConstMatRef gamma, MatRef y, MatRef rstd, float eps);
void rmsnorm_backward(ConstMatRef x, ConstMatRef gamma, ConstMatRef rstd, ConstMatRef dy, MatRef dx,
                      MatRef dgamma);

// GELU, tanh approximation (GPT-2).
void gelu_forward(ConstMatRef x, MatRef y);
void gelu_backward(ConstMatRef x, ConstMatRef dy, MatRef dx);

// SwiGLU: y = silu(gate) ⊙ up.
void swiglu_forward(ConstMatRef gate, ConstMatRef up, MatRef y);
void swiglu_backward(ConstMatRef gate, ConstMatRef up, ConstMatRef dy, MatRef dgate, MatRef dup);

// Rotary position embedding in place on x = [tokens, heads·head_dim], rotating the pairs
// (i, i + head_dim/2) of each head by position·theta^(−2i/head_dim); positions[row] gives each
// row's position. The backward rotates the gradient by the opposite angle.
void rope_forward(MatRef x, int head_dim, std::span<const std::int32_t> positions, float theta);
void rope_backward(MatRef dx, int head_dim, std::span<const std::int32_t> positions, float theta);

struct AttentionShape {
  Eigen::Index batch = 1;
  Eigen::Index seq = 1; // queries per sequence
  int heads = 1;        // query heads (local to this tensor-parallel rank)
  int kv_heads = 1;     // key/value heads; query head j reads kv head j / (heads / kv_heads)
  int head_dim = 1;
  // Context parallelism: the keys of the whole sequence (kv_seq of them, 0: seq) against this
  // rank's queries, query i of a sequence sitting at position q_positions[i] of it (empty:
  // position i). Query i sees the keys at positions <= its own.
  Eigen::Index kv_seq = 0;
  std::span<const std::int32_t> q_positions;
  Eigen::Index keys() const { return kv_seq > 0 ? kv_seq : seq; }
  Eigen::Index query_position(Eigen::Index i) const {
    return q_positions.empty() ? i : q_positions[static_cast<std::size_t>(i)];
  }
};

// Causal softmax(q·kᵀ/√d) probabilities: probs is [batch·heads, seq·keys] (row i·keys + j of
// the flattened rectangle holds query i, key j; zero where key j comes after query i).
void attention_probs(ConstMatRef q, ConstMatRef k, const AttentionShape& shape, MatRef probs);
// out = probs·v per head. q: [batch·seq, heads·d], k and v: [batch·keys, kv_heads·d].
void attention_forward(ConstMatRef q, ConstMatRef k, ConstMatRef v, const AttentionShape& shape,
                       MatRef probs, MatRef out);
// dq, dk, dv overwritten from the saved (or recomputed) probs.
void attention_backward(ConstMatRef q, ConstMatRef k, ConstMatRef v, ConstMatRef probs,
                        ConstMatRef dout, const AttentionShape& shape, MatRef dq, MatRef dk,
                        MatRef dv);

// Ring attention (context parallelism): this rank's queries (at shape.q_positions) against one
// K/V block of shape.seq keys per sequence at k_positions, folded into a running softmax —
// row max m and row sum l ([batch·heads, seq]) and the unnormalised output acc ([batch·seq,
// heads·d]); start from m = −∞, l = 0, acc = 0. attention_block_finish turns them into the
// output and the log-sum-exp ([batch·heads, seq]).
void attention_block_forward(ConstMatRef q, ConstMatRef k, ConstMatRef v, const AttentionShape& s,
                             std::span<const std::int32_t> k_positions, MatRef m, MatRef l,
                             MatRef acc);
void attention_block_finish(ConstMatRef m, ConstMatRef l, const AttentionShape& s, MatRef out,
                            MatRef lse);
// Its backward on one block: adds to dq, and to the block's dk and dv, from the output
// gradient, the log-sum-exp and delta = Σ_d dout ⊙ out per query and head ([batch·heads, seq]).
void attention_block_backward(ConstMatRef q, ConstMatRef k, ConstMatRef v, ConstMatRef dout,
                              ConstMatRef lse, ConstMatRef delta, const AttentionShape& s,
                              std::span<const std::int32_t> k_positions, MatRef dq, MatRef dk,
                              MatRef dv);
// delta for attention_block_backward.
void attention_delta(ConstMatRef dout, ConstMatRef out, const AttentionShape& s, MatRef delta);

// Vocabulary-parallel embedding: table holds rows [vocab_begin, vocab_begin + table.rows) of
// the full table; out row r = table[tokens[r] − vocab_begin], or zero when the token is another
// rank's.
void embedding_forward(std::span<const std::int32_t> tokens, ConstMatRef table,
                       std::int64_t vocab_begin, MatRef out);
void embedding_backward(std::span<const std::int32_t> tokens, ConstMatRef dout,
                        std::int64_t vocab_begin, MatRef dtable);

// Vocabulary-parallel cross-entropy in three local pieces around two all-reduces (max, then
// sum): loss_r = log Σ_v exp(l_rv − M_r) + M_r − l_r,target.
void row_max(ConstMatRef logits, MatRef max);                      // [rows, 1]
void row_sum_exp(ConstMatRef logits, ConstMatRef max, MatRef sum); // Σ exp(l − M)
void target_logits(ConstMatRef logits, std::span<const std::int32_t> targets,
                   std::int64_t vocab_begin, MatRef out); // 0 where the target is not local
// dlogits = scale · (exp(l − M)/S − onehot(target)).
void cross_entropy_backward(ConstMatRef logits, ConstMatRef max, ConstMatRef sum,
                            std::span<const std::int32_t> targets, std::int64_t vocab_begin,
                            float scale, MatRef dlogits);

// One AdamW update of n parameters in place (fp32 throughout, one pass over p, g, m1, m2), as
// AdamwStep (parallax/executor/adamw.hpp) states it.
void adamw_update(float* p, const float* g, float* m1, float* m2, std::int64_t n,
                  const AdamwStep& s);

} // namespace parallax::ops
