#include "parallax/executor/ops.hpp"

#include "parallax/core/error.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

namespace parallax::ops {
namespace {

using Eigen::Index;

void check_shape(ConstMatRef a, Index rows, Index cols, const char* what) {
  PARALLAX_CHECK(a.rows == rows && a.cols == cols,
                 std::string(what) + " has shape [" + std::to_string(a.rows) + ", " +
                     std::to_string(a.cols) + "], expected [" + std::to_string(rows) + ", " +
                     std::to_string(cols) + "]");
}

constexpr float kGeluC = 0.7978845608028654f; // sqrt(2/pi)
constexpr float kGeluA = 0.044715f;

} // namespace

void linear_forward(ConstMatRef x, ConstMatRef w, ConstMatRef b, MatRef y) {
  check_shape(w, x.cols, y.cols, "linear weight");
  check_shape(y, x.rows, w.cols, "linear output");
  auto ym = y.m();
  ym.noalias() = x.m() * w.m();
  if (b) {
    check_shape(b, 1, w.cols, "linear bias");
    ym.rowwise() += b.m().row(0);
  }
}

void linear_backward(ConstMatRef x, ConstMatRef w, ConstMatRef dy, MatRef dx, MatRef dw, MatRef db,
                     bool accumulate_dx) {
  check_shape(dy, x.rows, w.cols, "linear output gradient");
  check_shape(dw, w.rows, w.cols, "linear weight gradient");
  if (dx) {
    check_shape(dx, x.rows, x.cols, "linear input gradient");
    if (accumulate_dx) {
      dx.m().noalias() += dy.m() * w.m().transpose();
    } else {
      dx.m().noalias() = dy.m() * w.m().transpose();
    }
  }
  dw.m().noalias() += x.m().transpose() * dy.m();
  if (db) {
    check_shape(db, 1, w.cols, "linear bias gradient");
    db.m().row(0) += dy.m().colwise().sum();
  }
}

void layernorm_forward(ConstMatRef x, ConstMatRef gamma, ConstMatRef beta, MatRef y, MatRef mean,
                       MatRef rstd, float eps) {
  const Index n = x.rows;
  const Index h = x.cols;
  check_shape(gamma, 1, h, "layernorm gamma");
  check_shape(beta, 1, h, "layernorm beta");
  check_shape(y, n, h, "layernorm output");
  check_shape(mean, n, 1, "layernorm mean");
  check_shape(rstd, n, 1, "layernorm rstd");
  const auto xm = x.m();
  auto ym = y.m();
  const auto g = gamma.m().row(0);
  const auto b = beta.m().row(0);
  for (Index r = 0; r < n; ++r) {
    const float mu = xm.row(r).mean();
    const float var = (xm.row(r).array() - mu).square().mean();
    const float rs = 1.0f / std::sqrt(var + eps);
    mean.data[r] = mu;
    rstd.data[r] = rs;
    ym.row(r) = ((xm.row(r).array() - mu) * rs * g.array() + b.array()).matrix();
  }
}

void layernorm_backward(ConstMatRef x, ConstMatRef gamma, ConstMatRef mean, ConstMatRef rstd,
                        ConstMatRef dy, MatRef dx, MatRef dgamma, MatRef dbeta) {
  const Index n = x.rows;
  const Index h = x.cols;
  check_shape(dy, n, h, "layernorm output gradient");
  check_shape(dx, n, h, "layernorm input gradient");
  check_shape(dgamma, 1, h, "layernorm gamma gradient");
  check_shape(dbeta, 1, h, "layernorm beta gradient");
  const auto xm = x.m();
  const auto dym = dy.m();
  auto dxm = dx.m();
  const auto g = gamma.m().row(0).array();
  auto dg = dgamma.m().row(0);
  auto dbv = dbeta.m().row(0);
  Eigen::RowVectorXf xhat(h);
  Eigen::RowVectorXf dxhat(h);
  for (Index r = 0; r < n; ++r) {
    const float rs = rstd.data[r];
    xhat = (xm.row(r).array() - mean.data[r]) * rs;
    dg.array() += dym.row(r).array() * xhat.array();
    dbv += dym.row(r);
    dxhat = (dym.row(r).array() * g).matrix();
    const float mean_dxhat = dxhat.mean();
    const float mean_dxhat_xhat = (dxhat.array() * xhat.array()).mean();
    dxm.row(r) = ((dxhat.array() - mean_dxhat - xhat.array() * mean_dxhat_xhat) * rs).matrix();
  }
}

void rmsnorm_forward(ConstMatRef x, ConstMatRef gamma, MatRef y, MatRef rstd, float eps) {
  const Index n = x.rows;
  const Index h = x.cols;
  check_shape(gamma, 1, h, "rmsnorm gamma");
  check_shape(y, n, h, "rmsnorm output");
  check_shape(rstd, n, 1, "rmsnorm rstd");
  const auto xm = x.m();
  auto ym = y.m();
  const auto g = gamma.m().row(0).array();
  for (Index r = 0; r < n; ++r) {
    const float rs = 1.0f / std::sqrt(xm.row(r).squaredNorm() / static_cast<float>(h) + eps);
    rstd.data[r] = rs;
    ym.row(r) = (xm.row(r).array() * rs * g).matrix();
  }
}

void rmsnorm_backward(ConstMatRef x, ConstMatRef gamma, ConstMatRef rstd, ConstMatRef dy, MatRef dx,
                      MatRef dgamma) {
  const Index n = x.rows;
  const Index h = x.cols;
  check_shape(dy, n, h, "rmsnorm output gradient");
  check_shape(dx, n, h, "rmsnorm input gradient");
  check_shape(dgamma, 1, h, "rmsnorm gamma gradient");
  const auto xm = x.m();
  const auto dym = dy.m();
  auto dxm = dx.m();
  const auto g = gamma.m().row(0).array();
  auto dg = dgamma.m().row(0);
  Eigen::RowVectorXf dxhat(h);
  for (Index r = 0; r < n; ++r) {
    const float rs = rstd.data[r];
    dg.array() += dym.row(r).array() * xm.row(r).array() * rs;
    dxhat = (dym.row(r).array() * g).matrix();
    // y = x·rs·g with rs = (mean x² + eps)^(−1/2): dx = rs·dxhat − x·rs³·mean(dxhat ⊙ x).
    const float dot = (dxhat.array() * xm.row(r).array()).mean();
    dxm.row(r) = (dxhat.array() * rs - xm.row(r).array() * (rs * rs * rs * dot)).matrix();
  }
}

// Elements per chunk of the vectorised element-wise backwards (a 4 KiB scratch on the stack).
constexpr Index kElementwiseChunk = 1024;

void gelu_forward(ConstMatRef x, MatRef y) {
  check_shape(y, x.rows, x.cols, "gelu output");
  const auto xa = x.m().array();
  y.m().array() = 0.5f * xa * (1.0f + (kGeluC * (xa + kGeluA * xa.cube())).tanh());
}

void gelu_backward(ConstMatRef x, ConstMatRef dy, MatRef dx) {
  check_shape(dy, x.rows, x.cols, "gelu output gradient");
  check_shape(dx, x.rows, x.cols, "gelu input gradient");
  // In cache-sized chunks so tanh is evaluated once per element, vectorised by Eigen (the
  // scalar libm tanh made this backward cost a fifth of a CPU training step).
  const Index n = x.size();
  std::array<float, kElementwiseChunk> tanh_buf{};
  for (Index start = 0; start < n; start += kElementwiseChunk) {
    const Index len = std::min<Index>(kElementwiseChunk, n - start);
    const Eigen::Map<const Eigen::ArrayXf> v(x.data + start, len);
    const Eigen::Map<const Eigen::ArrayXf> g(dy.data + start, len);
    Eigen::Map<Eigen::ArrayXf> t(tanh_buf.data(), len);
    t = (kGeluC * (v + kGeluA * v.cube())).tanh();
    Eigen::Map<Eigen::ArrayXf>(dx.data + start, len) =
        g * (0.5f * (1.0f + t) +
             0.5f * v * (1.0f - t.square()) * kGeluC * (1.0f + 3.0f * kGeluA * v.square()));
  }
}

void swiglu_forward(ConstMatRef gate, ConstMatRef up, MatRef y) {
  check_shape(up, gate.rows, gate.cols, "swiglu up");
  check_shape(y, gate.rows, gate.cols, "swiglu output");
  const auto g = gate.m().array();
  y.m().array() = g / (1.0f + (-g).exp()) * up.m().array();
}

void swiglu_backward(ConstMatRef gate, ConstMatRef up, ConstMatRef dy, MatRef dgate, MatRef dup) {
  check_shape(dy, gate.rows, gate.cols, "swiglu output gradient");
  check_shape(dgate, gate.rows, gate.cols, "swiglu gate gradient");
  check_shape(dup, gate.rows, gate.cols, "swiglu up gradient");
  const Index n = gate.size();
  std::array<float, kElementwiseChunk> sig_buf{};
  for (Index start = 0; start < n; start += kElementwiseChunk) {
    const Index len = std::min<Index>(kElementwiseChunk, n - start);
    const Eigen::Map<const Eigen::ArrayXf> g(gate.data + start, len);
    const Eigen::Map<const Eigen::ArrayXf> u(up.data + start, len);
    const Eigen::Map<const Eigen::ArrayXf> d(dy.data + start, len);
    Eigen::Map<Eigen::ArrayXf> sig(sig_buf.data(), len);
    sig = 1.0f / (1.0f + (-g).exp());
    Eigen::Map<Eigen::ArrayXf>(dup.data + start, len) = d * g * sig;
    Eigen::Map<Eigen::ArrayXf>(dgate.data + start, len) = d * u * (sig * (1.0f + g * (1.0f - sig)));
  }
}

namespace {

void rope_rotate(MatRef x, int head_dim, std::span<const std::int32_t> positions, float theta,
                 float direction) {
  PARALLAX_CHECK(head_dim % 2 == 0, "rotary embedding needs an even head dimension");
  PARALLAX_CHECK(x.cols % head_dim == 0, "rotary input width is not a multiple of head_dim");
  PARALLAX_CHECK(static_cast<Index>(positions.size()) == x.rows, "one position per row");
  const int half = head_dim / 2;
  const Index heads = x.cols / head_dim;
  std::vector<float> inv_freq(static_cast<std::size_t>(half));
  for (int i = 0; i < half; ++i) {
    inv_freq[static_cast<std::size_t>(i)] =
        std::pow(theta, -2.0f * static_cast<float>(i) / static_cast<float>(head_dim));
  }
  for (Index r = 0; r < x.rows; ++r) {
    const float pos = static_cast<float>(positions[static_cast<std::size_t>(r)]);
    float* row = x.data + r * x.cols;
    for (int i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[static_cast<std::size_t>(i)];
      const float c = std::cos(angle);
      const float s = direction * std::sin(angle);
      for (Index hd = 0; hd < heads; ++hd) {
        float* a = row + hd * head_dim + i;
        float* b = a + half;
        const float a0 = *a;
        const float b0 = *b;
        *a = a0 * c - b0 * s;
        *b = a0 * s + b0 * c;
      }
    }
  }
}

} // namespace

void rope_forward(MatRef x, int head_dim, std::span<const std::int32_t> positions, float theta) {
  rope_rotate(x, head_dim, positions, theta, 1.0f);
}

void rope_backward(MatRef dx, int head_dim, std::span<const std::int32_t> positions, float theta) {
  rope_rotate(dx, head_dim, positions, theta, -1.0f);
}

namespace {

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
  check_shape(dq, q.rows, q.cols, "attention q gradient");
  check_shape(dk, k.rows, k.cols, "attention k gradient");
  check_shape(dv, v.rows, v.cols, "attention v gradient");
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
  check_shape(dq, q.rows, q.cols, "ring attention q gradient");
  check_shape(dk, k.rows, k.cols, "ring attention k gradient");
  check_shape(dv, v.rows, v.cols, "ring attention v gradient");
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

void embedding_forward(std::span<const std::int32_t> tokens, ConstMatRef table,
                       std::int64_t vocab_begin, MatRef out) {
  check_shape(out, static_cast<Index>(tokens.size()), table.cols, "embedding output");
  const auto tm = table.m();
  auto om = out.m();
  for (Index r = 0; r < out.rows; ++r) {
    const std::int64_t local = tokens[static_cast<std::size_t>(r)] - vocab_begin;
    if (local >= 0 && local < table.rows) {
      om.row(r) = tm.row(local);
    } else {
      om.row(r).setZero();
    }
  }
}

void embedding_backward(std::span<const std::int32_t> tokens, ConstMatRef dout,
                        std::int64_t vocab_begin, MatRef dtable) {
  check_shape(dout, static_cast<Index>(tokens.size()), dtable.cols, "embedding output gradient");
  const auto dm = dout.m();
  auto tm = dtable.m();
  for (Index r = 0; r < dout.rows; ++r) {
    const std::int64_t local = tokens[static_cast<std::size_t>(r)] - vocab_begin;
    if (local >= 0 && local < dtable.rows)
      tm.row(local) += dm.row(r);
  }
}

void row_max(ConstMatRef logits, MatRef max) {
  check_shape(max, logits.rows, 1, "row max");
  max.m().col(0) = logits.m().rowwise().maxCoeff();
}

void row_sum_exp(ConstMatRef logits, ConstMatRef max, MatRef sum) {
  check_shape(max, logits.rows, 1, "row max");
  check_shape(sum, logits.rows, 1, "row sum");
  // Row by row over contiguous memory, so Eigen vectorises exp (a column-wise broadcast over
  // the row-major matrix fell back to scalar libm calls).
  for (Index r = 0; r < logits.rows; ++r) {
    const Eigen::Map<const Eigen::ArrayXf> row(logits.data + r * logits.cols, logits.cols);
    sum.data[r] = (row - max.data[r]).exp().sum();
  }
}

void target_logits(ConstMatRef logits, std::span<const std::int32_t> targets,
                   std::int64_t vocab_begin, MatRef out) {
  check_shape(out, logits.rows, 1, "target logits");
  PARALLAX_CHECK(static_cast<Index>(targets.size()) == logits.rows, "one target per row");
  for (Index r = 0; r < logits.rows; ++r) {
    const std::int64_t local = targets[static_cast<std::size_t>(r)] - vocab_begin;
    out.data[r] = local >= 0 && local < logits.cols ? logits.data[r * logits.cols + local] : 0.0f;
  }
}

void cross_entropy_backward(ConstMatRef logits, ConstMatRef max, ConstMatRef sum,
                            std::span<const std::int32_t> targets, std::int64_t vocab_begin,
                            float scale, MatRef dlogits) {
  check_shape(dlogits, logits.rows, logits.cols, "logits gradient");
  PARALLAX_CHECK(static_cast<Index>(targets.size()) == logits.rows, "one target per row");
  for (Index r = 0; r < logits.rows; ++r) {
    const Eigen::Map<const Eigen::ArrayXf> row(logits.data + r * logits.cols, logits.cols);
    Eigen::Map<Eigen::ArrayXf> out(dlogits.data + r * logits.cols, logits.cols);
    out = (row - max.data[r]).exp() * (scale / sum.data[r]);
    const std::int64_t local = targets[static_cast<std::size_t>(r)] - vocab_begin;
    if (local >= 0 && local < logits.cols)
      out(local) -= scale;
  }
}

AdamwStep adamw_step(const AdamwHyper& h) {
  const double t = static_cast<double>(h.step);
  const double bc1 = 1.0 - std::pow(h.beta1, t);
  const double bc2 = 1.0 - std::pow(h.beta2, t);
  return {.beta1 = static_cast<float>(h.beta1),
          .beta2 = static_cast<float>(h.beta2),
          .clip = static_cast<float>(h.clip_coef),
          .keep = static_cast<float>(1.0 - h.lr * (h.decay ? h.weight_decay : 0.0)),
          .step_size = static_cast<float>(h.lr / bc1),
          .inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2)),
          .eps = static_cast<float>(h.eps)};
}

void adamw_update(float* p, const float* g, float* m1, float* m2, std::int64_t n,
                  const AdamwStep& s) {
  const float one_minus_b1 = 1.0f - s.beta1;
  const float one_minus_b2 = 1.0f - s.beta2;
  for (std::int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * s.clip;
    m1[i] = s.beta1 * m1[i] + one_minus_b1 * gi;
    m2[i] = s.beta2 * m2[i] + one_minus_b2 * gi * gi;
    p[i] = p[i] * s.keep - s.step_size * m1[i] / (std::sqrt(m2[i]) * s.inv_sqrt_bc2 + s.eps);
  }
}

} // namespace parallax::ops
