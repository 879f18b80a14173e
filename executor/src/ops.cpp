#include "parallax/executor/ops.hpp"

#include "ops_check.hpp"
#include "parallax/core/error.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

namespace parallax::ops {
namespace {

using Eigen::Index;

using detail::check_shape;

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
