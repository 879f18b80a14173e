// The attention kernels of ops.hpp: causal attention over whole sequences (or this rank's
// queries against whole sequences, context parallelism's all-gather), and ring attention's
// per-block running softmax and its backward.
#include "parallax/executor/ops.hpp"

#include "ops_check.hpp"
#include "parallax/core/error.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace parallax::ops {
namespace {

using detail::check_shape;
using Eigen::Index;

void check_attention(ConstMatRef q, ConstMatRef k, ConstMatRef v, const AttentionShape& s) {
  PARALLAX_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0,
                 "query heads must be a multiple of key/value heads");
  PARALLAX_CHECK(s.q_positions.empty() || static_cast<Index>(s.q_positions.size()) == s.seq,
                 "one position per query of a sequence");
  check_shape(q, s.batch * s.seq, Index{s.heads} * s.head_dim, "attention q");
  check_shape(k, s.batch * s.keys(), Index{s.kv_heads} * s.head_dim, "attention k");
  if (v)
    check_shape(v, s.batch * s.keys(), Index{s.kv_heads} * s.head_dim, "attention v");
}

// The gradients of a backward, shaped like q, k and v.
void check_gradients(ConstMatRef q, ConstMatRef k, ConstMatRef v, MatRef dq, MatRef dk, MatRef dv) {
  check_shape(dq, q.rows, q.cols, "attention q gradient");
  check_shape(dk, k.rows, k.cols, "attention k gradient");
  check_shape(dv, v.rows, v.cols, "attention v gradient");
}

} // namespace

void attention_probs(ConstMatRef q, ConstMatRef k, const AttentionShape& s, MatRef probs) {
  check_attention(q, k, ConstMatRef{}, s);
  const Index keys = s.keys();
  check_shape(probs, s.batch * s.heads, s.seq * keys, "attention probabilities");
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const int group = s.heads / s.kv_heads;
  const auto qm = q.m();
  const auto km = k.m();
  for (Index b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      const int kvh = h / group;
      MatMap p(probs.data + (b * s.heads + h) * s.seq * keys, s.seq, keys);
      p.noalias() = qm.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim) *
                    km.block(b * keys, Index{kvh} * s.head_dim, keys, s.head_dim).transpose();
      for (Index i = 0; i < s.seq; ++i) {
        auto row = p.row(i);
        const Index seen = s.query_position(i) + 1;
        PARALLAX_CHECK(seen >= 1 && seen <= keys, "a query position outside the sequence");
        const float mx = row.head(seen).maxCoeff() * scale;
        row.head(seen) = (row.head(seen).array() * scale - mx).exp().matrix();
        row.head(seen) /= row.head(seen).sum();
        row.tail(keys - seen).setZero();
      }
    }
  }
}

void attention_forward(ConstMatRef q, ConstMatRef k, ConstMatRef v, const AttentionShape& s,
                       MatRef probs, MatRef out) {
  check_attention(q, k, v, s);
  check_shape(out, s.batch * s.seq, Index{s.heads} * s.head_dim, "attention output");
  attention_probs(q, k, s, probs);
  const int group = s.heads / s.kv_heads;
  const Index keys = s.keys();
  const auto vm = v.m();
  auto om = out.m();
  for (Index b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      ConstMatMap p(probs.data + (b * s.heads + h) * s.seq * keys, s.seq, keys);
      om.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim).noalias() =
          p * vm.block(b * keys, Index{h / group} * s.head_dim, keys, s.head_dim);
    }
  }
}

void attention_backward(ConstMatRef q, ConstMatRef k, ConstMatRef v, ConstMatRef probs,
                        ConstMatRef dout, const AttentionShape& s, MatRef dq, MatRef dk,
                        MatRef dv) {
  check_attention(q, k, v, s);
  const Index keys = s.keys();
  check_shape(probs, s.batch * s.heads, s.seq * keys, "attention probabilities");
  check_shape(dout, q.rows, q.cols, "attention output gradient");
  check_gradients(q, k, v, dq, dk, dv);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const int group = s.heads / s.kv_heads;
  const auto qm = q.m();
  const auto km = k.m();
  const auto vm = v.m();
  const auto dom = dout.m();
  auto dqm = dq.m();
  auto dkm = dk.m();
  auto dvm = dv.m();
  dkm.setZero();
  dvm.setZero();
  Mat dp(s.seq, keys);
  for (Index b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      const Index kvh = h / group;
      ConstMatMap p(probs.data + (b * s.heads + h) * s.seq * keys, s.seq, keys);
      const auto d_o = dom.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim);
      const auto vb = vm.block(b * keys, kvh * s.head_dim, keys, s.head_dim);
      dvm.block(b * keys, kvh * s.head_dim, keys, s.head_dim).noalias() += p.transpose() * d_o;
      dp.noalias() = d_o * vb.transpose();
      // Softmax backward: dS = P ⊙ (dP − Σ_j P ⊙ dP), then the 1/√d scale.
      const Eigen::VectorXf rowdot = (dp.array() * p.array()).rowwise().sum();
      dp = (p.array() * (dp.array().colwise() - rowdot.array()) * scale).matrix();
      dqm.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim).noalias() =
          dp * km.block(b * keys, kvh * s.head_dim, keys, s.head_dim);
      dkm.block(b * keys, kvh * s.head_dim, keys, s.head_dim).noalias() +=
          dp.transpose() * qm.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim);
    }
  }
}

namespace {

// Query i of a sequence sees key j of the block when the key is not after it.
bool visible(const AttentionShape& s, std::span<const std::int32_t> k_positions, Index i, Index j) {
  return k_positions[static_cast<std::size_t>(j)] <= s.query_position(i);
}

} // namespace

void attention_block_forward(ConstMatRef q, ConstMatRef k, ConstMatRef v, const AttentionShape& s,
                             std::span<const std::int32_t> k_positions, MatRef m, MatRef l,
                             MatRef acc) {
  check_attention(q, k, v, s);
  PARALLAX_CHECK(static_cast<Index>(k_positions.size()) == s.keys(), "one position per key");
  check_shape(m, s.batch * s.heads, s.seq, "ring attention row max");
  check_shape(l, s.batch * s.heads, s.seq, "ring attention row sum");
  check_shape(acc, q.rows, q.cols, "ring attention accumulator");
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const int group = s.heads / s.kv_heads;
  const Index keys = s.keys();
  const auto qm = q.m();
  const auto km = k.m();
  const auto vm = v.m();
  auto mm = m.m();
  auto lm = l.m();
  auto am = acc.m();
  Mat p(s.seq, keys);
  for (Index b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      const Index kvh = h / group;
      const Index row = b * s.heads + h;
      p.noalias() = qm.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim) *
                    km.block(b * keys, kvh * s.head_dim, keys, s.head_dim).transpose();
      for (Index i = 0; i < s.seq; ++i) {
        float mx = -std::numeric_limits<float>::infinity();
        for (Index j = 0; j < keys; ++j) {
          p(i, j) = visible(s, k_positions, i, j) ? p(i, j) * scale
                                                  : -std::numeric_limits<float>::infinity();
          mx = std::max(mx, p(i, j));
        }
        if (mx == -std::numeric_limits<float>::infinity()) {
          p.row(i).setZero(); // nothing of this block is visible to the query
          continue;
        }
        const float old = mm(row, i);
        const float next = std::max(old, mx);
        const float keep =
            old == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(old - next);
        p.row(i) = (p.row(i).array() - next).exp().matrix();
        lm(row, i) = lm(row, i) * keep + p.row(i).sum();
        am.block(b * s.seq + i, Index{h} * s.head_dim, 1, s.head_dim) *= keep;
        mm(row, i) = next;
      }
      am.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim).noalias() +=
          p * vm.block(b * keys, kvh * s.head_dim, keys, s.head_dim);
    }
  }
}

void attention_block_finish(ConstMatRef m, ConstMatRef l, const AttentionShape& s, MatRef out,
                            MatRef lse) {
  check_shape(lse, s.batch * s.heads, s.seq, "ring attention log-sum-exp");
  const auto mm = m.m();
  const auto lm = l.m();
  auto om = out.m();
  auto em = lse.m();
  for (Index b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      const Index row = b * s.heads + h;
      for (Index i = 0; i < s.seq; ++i) {
        PARALLAX_CHECK(lm(row, i) > 0, "a query that sees no key (it sees at least itself)");
        om.block(b * s.seq + i, Index{h} * s.head_dim, 1, s.head_dim) /= lm(row, i);
        em(row, i) = mm(row, i) + std::log(lm(row, i));
      }
    }
  }
}

void attention_delta(ConstMatRef dout, ConstMatRef out, const AttentionShape& s, MatRef delta) {
  check_shape(delta, s.batch * s.heads, s.seq, "ring attention delta");
  const auto dm = dout.m();
  const auto om = out.m();
  auto d = delta.m();
  for (Index b = 0; b < s.batch; ++b)
    for (int h = 0; h < s.heads; ++h)
      for (Index i = 0; i < s.seq; ++i)
        d(b * s.heads + h, i) =
            dm.block(b * s.seq + i, Index{h} * s.head_dim, 1, s.head_dim)
                .cwiseProduct(om.block(b * s.seq + i, Index{h} * s.head_dim, 1, s.head_dim))
                .sum();
}

void attention_block_backward(ConstMatRef q, ConstMatRef k, ConstMatRef v, ConstMatRef dout,
                              ConstMatRef lse, ConstMatRef delta, const AttentionShape& s,
                              std::span<const std::int32_t> k_positions, MatRef dq, MatRef dk,
                              MatRef dv) {
  check_attention(q, k, v, s);
  PARALLAX_CHECK(static_cast<Index>(k_positions.size()) == s.keys(), "one position per key");
  check_gradients(q, k, v, dq, dk, dv);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const int group = s.heads / s.kv_heads;
  const Index keys = s.keys();
  const auto qm = q.m();
  const auto km = k.m();
  const auto vm = v.m();
  const auto dom = dout.m();
  const auto em = lse.m();
  const auto dl = delta.m();
  auto dqm = dq.m();
  auto dkm = dk.m();
  auto dvm = dv.m();
  Mat p(s.seq, keys);
  Mat dp(s.seq, keys);
  for (Index b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      const Index kvh = h / group;
      const Index row = b * s.heads + h;
      const auto qb = qm.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim);
      const auto kb = km.block(b * keys, kvh * s.head_dim, keys, s.head_dim);
      const auto vb = vm.block(b * keys, kvh * s.head_dim, keys, s.head_dim);
      const auto d_o = dom.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim);
      p.noalias() = qb * kb.transpose();
      for (Index i = 0; i < s.seq; ++i)
        for (Index j = 0; j < keys; ++j)
          p(i, j) = visible(s, k_positions, i, j) ? std::exp(p(i, j) * scale - em(row, i)) : 0.0f;
      dvm.block(b * keys, kvh * s.head_dim, keys, s.head_dim).noalias() += p.transpose() * d_o;
      dp.noalias() = d_o * vb.transpose();
      for (Index i = 0; i < s.seq; ++i)
        dp.row(i) = (p.row(i).array() * (dp.row(i).array() - dl(row, i)) * scale).matrix();
      dqm.block(b * s.seq, Index{h} * s.head_dim, s.seq, s.head_dim).noalias() += dp * kb;
      dkm.block(b * keys, kvh * s.head_dim, keys, s.head_dim).noalias() += dp.transpose() * qb;
    }
  }
}

} // namespace parallax::ops
