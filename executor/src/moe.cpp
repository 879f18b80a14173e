#include "parallax/executor/moe.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/ops.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace parallax {
namespace {

using Index = Eigen::Index;

std::string expert(int j, const char* w) {
  return fmt::format("moe.e{}.{}", j, w);
}

// The rows routed to expert j, in row order, with the slot (0..k−1) that chose it.
struct Routed {
  std::vector<Index> rows;
  std::vector<Index> slot;
};

std::vector<Routed> routing(const Tensor& chosen, int experts) {
  std::vector<Routed> r(static_cast<std::size_t>(experts));
  const auto c = chosen.m();
  for (Index i = 0; i < c.rows(); ++i) {
    for (Index s = 0; s < c.cols(); ++s) {
      Routed& e = r[static_cast<std::size_t>(std::lround(c(i, s)))];
      e.rows.push_back(i);
      e.slot.push_back(s);
    }
  }
  return r;
}

Tensor gather_rows(ConstMatRef x, const std::vector<Index>& rows) {
  Tensor g(static_cast<Index>(rows.size()), x.cols, Tensor::uninitialized);
  auto gm = g.m();
  const auto xm = x.m();
  for (std::size_t i = 0; i < rows.size(); ++i)
    gm.row(static_cast<Index>(i)) = xm.row(rows[i]);
  return g;
}

} // namespace

void moe_forward(const ExecModel& model, const BlockBuffers& b, const Tensor& x,
                 std::vector<Tensor>& t, std::size_t first, Tensor& out) {
  const MoeConfig& moe = model.config.moe;
  const int E = moe.num_experts;
  const int k = moe.experts_per_token;
  const Index n = x.rows();
  PARALLAX_CHECK(t.size() >= first + moe_slot_count(moe),
                 "MoE forward: the cache has no room for the experts");

  // Router: scores over the experts, the k best per row, their weights normalised to sum 1.
  Tensor logits(n, E, Tensor::uninitialized);
  ops::linear_forward(x, b.p("moe.router"), ConstMatRef{}, logits);
  Tensor scores(n, E, Tensor::uninitialized);
  auto sm = scores.m();
  const auto lm = logits.m();
  if (moe.router_scoring == "sigmoid") {
    sm = (1.0f + (-lm.array()).exp()).inverse().matrix();
  } else {
    for (Index i = 0; i < n; ++i) {
      const float mx = lm.row(i).maxCoeff();
      sm.row(i) = (lm.row(i).array() - mx).exp().matrix();
      sm.row(i) /= sm.row(i).sum();
    }
  }
  Tensor chosen(n, k, Tensor::uninitialized);
  Tensor weights(n, k, Tensor::uninitialized);
  std::vector<int> order(static_cast<std::size_t>(E));
  for (Index i = 0; i < n; ++i) {
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int c) {
      return sm(i, a) > sm(i, c) || (sm(i, a) == sm(i, c) && a < c);
    });
    float z = 0;
    for (int s = 0; s < k; ++s)
      z += sm(i, order[static_cast<std::size_t>(s)]);
    for (int s = 0; s < k; ++s) {
      const int j = order[static_cast<std::size_t>(s)];
      chosen.m()(i, s) = static_cast<float>(j);
      weights.m()(i, s) = sm(i, j) / z;
    }
  }

  // Each expert over its rows; the weighted outputs add into `out` (partial over TP ranks).
  const std::vector<Routed> routed = routing(chosen, E);
  for (int j = 0; j < E; ++j) {
    const Routed& r = routed[static_cast<std::size_t>(j)];
    const std::size_t s0 = moe_expert_slot(first, j);
    if (r.rows.empty())
      continue;
    const Tensor xj = gather_rows(x, r.rows);
    const ConstMatRef wg = b.p(expert(j, "wg"));
    const Index rows = xj.rows();
    Tensor g(rows, wg.cols, Tensor::uninitialized);
    Tensor u(rows, wg.cols, Tensor::uninitialized);
    Tensor a(rows, wg.cols, Tensor::uninitialized);
    Tensor y(rows, model.config.hidden_size, Tensor::uninitialized);
    ops::linear_forward(xj, wg, ConstMatRef{}, g);
    ops::linear_forward(xj, b.p(expert(j, "wu")), ConstMatRef{}, u);
    ops::swiglu_forward(g, u, a);
    ops::linear_forward(a, b.p(expert(j, "w2")), ConstMatRef{}, y);
    auto om = out.m();
    const auto ym = y.m();
    for (Index q = 0; q < rows; ++q) {
      const Index i = r.rows[static_cast<std::size_t>(q)];
      om.row(i) += weights.m()(i, r.slot[static_cast<std::size_t>(q)]) * ym.row(q);
    }
    t[s0] = std::move(g);
    t[s0 + 1] = std::move(u);
    t[s0 + 2] = std::move(a);
    t[s0 + 3] = std::move(y);
  }
  t[first + kMoeScores] = std::move(scores);
  t[first + kMoeChosen] = std::move(chosen);
  t[first + kMoeWeights] = std::move(weights);
}

void moe_backward(const ExecModel& model, const BlockBuffers& b, const TpContext& tp,
                  const MicroBatch& mb, const Tensor& x, std::vector<Tensor>& t, std::size_t first,
                  ConstMatRef dout, Tensor& dx) {
  const MoeConfig& moe = model.config.moe;
  const int E = moe.num_experts;
  const int k = moe.experts_per_token;
  const Index n = x.rows();
  PARALLAX_CHECK(t.size() >= first + moe_slot_count(moe), "MoE backward without its forward");
  const Tensor& scores = t[first + kMoeScores];
  const Tensor& weights = t[first + kMoeWeights];
  const std::vector<Routed> routed = routing(t[first + kMoeChosen], E);
  const auto dm = dout.m();

  // Experts: dy_j = w·dout on its rows; the weights' gradient <dout, y_j> (partial over TP).
  Tensor dweights(n, k); // zeros
  for (int j = 0; j < E; ++j) {
    const Routed& r = routed[static_cast<std::size_t>(j)];
    const std::size_t s0 = moe_expert_slot(first, j);
    if (r.rows.empty())
      continue;
    const Index rows = static_cast<Index>(r.rows.size());
    const Tensor& y = t[s0 + 3];
    Tensor dy(rows, dout.cols, Tensor::uninitialized);
    for (Index q = 0; q < rows; ++q) {
      const Index i = r.rows[static_cast<std::size_t>(q)];
      const Index s = r.slot[static_cast<std::size_t>(q)];
      dy.m().row(q) = weights.m()(i, s) * dm.row(i);
      dweights.m()(i, s) = dm.row(i).dot(y.m().row(q));
    }
    const Tensor xj = gather_rows(x, r.rows);
    Tensor da(rows, t[s0].cols(), Tensor::uninitialized);
    ops::linear_backward(t[s0 + 2], b.p(expert(j, "w2")), dy, da, b.g(expert(j, "w2")), MatRef{});
    Tensor dg(rows, t[s0].cols(), Tensor::uninitialized);
    Tensor du(rows, t[s0].cols(), Tensor::uninitialized);
    ops::swiglu_backward(t[s0], t[s0 + 1], da, dg, du);
    Tensor dxj(rows, x.cols(), Tensor::uninitialized);
    ops::linear_backward(xj, b.p(expert(j, "wg")), dg, dxj, b.g(expert(j, "wg")), MatRef{});
    ops::linear_backward(xj, b.p(expert(j, "wu")), du, dxj, b.g(expert(j, "wu")), MatRef{}, true);
    for (Index q = 0; q < rows; ++q)
      dx.m().row(r.rows[static_cast<std::size_t>(q)]) += dxj.m().row(q);
    for (std::size_t s = s0; s < s0 + kMoePerExpert; ++s)
      t[s].release();
  }
  if (tp.size() > 1)
    tp.comm->all_reduce_sum(dweights.span()); // the full outputs' dot products

  // Router: through the weights' normalisation and the scoring, plus the balance loss.
  Tensor dscores(n, E); // zeros
  const auto sm = scores.m();
  const auto& chosen = t[first + kMoeChosen];
  for (Index i = 0; i < n; ++i) {
    float z = 0;
    float wdw = 0;
    for (int s = 0; s < k; ++s) {
      z += sm(i, std::lround(chosen.m()(i, s)));
      wdw += weights.m()(i, s) * dweights.m()(i, s);
    }
    for (int s = 0; s < k; ++s) {
      const auto j = std::lround(chosen.m()(i, s));
      dscores.m()(i, j) += (dweights.m()(i, s) - wdw) / z;
    }
  }
  if (moe.aux_loss_coef > 0) {
    // Per sequence: L = α·E·Σ_j f_j·P_j, f_j the share of its routed copies that went to j,
    // P_j its mean score; ∂L/∂score_tj = α·E·f_j / s, each sequence weighted like s tokens.
    const Index s_len = mb.seq;
    for (Index seq0 = 0; seq0 < n; seq0 += s_len) {
      std::vector<float> f(static_cast<std::size_t>(E), 0.0f);
      for (Index i = seq0; i < seq0 + s_len; ++i)
        for (int s = 0; s < k; ++s)
          f[static_cast<std::size_t>(std::lround(chosen.m()(i, s)))] +=
              1.0f / static_cast<float>(s_len * k);
      for (Index i = seq0; i < seq0 + s_len; ++i)
        for (int j = 0; j < E; ++j)
          dscores.m()(i, j) += static_cast<float>(moe.aux_loss_coef) * static_cast<float>(E) *
                               f[static_cast<std::size_t>(j)] * mb.loss_scale;
    }
  }
  Tensor dlogits(n, E, Tensor::uninitialized);
  if (moe.router_scoring == "sigmoid") {
    dlogits.m() = (dscores.m().array() * sm.array() * (1.0f - sm.array())).matrix();
  } else {
    for (Index i = 0; i < n; ++i) {
      const float dot = dscores.m().row(i).dot(sm.row(i));
      dlogits.m().row(i) = (sm.row(i).array() * (dscores.m().row(i).array() - dot)).matrix();
    }
  }
  // Every TP rank holds the whole router and computes the same gradient; the input's
  // gradient is added once (the layer sums dx over the group).
  Tensor dxr(n, x.cols(), Tensor::uninitialized);
  ops::linear_backward(x, b.p("moe.router"), dlogits, dxr, b.g("moe.router"), MatRef{});
  if (tp.rank() == 0)
    dx.m() += dxr.m();
  for (std::size_t s = first; s < first + kMoeExpertSlots; ++s)
    t[s].release();
}

} // namespace parallax
