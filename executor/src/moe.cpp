#include "parallax/executor/moe.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/ops.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <span>

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

// The expert-parallel exchange of one MoE layer. Rank r of the EP group computes experts
// [r·L, (r+1)·L), L = E / ep. Dispatch sends each rank the rows routed to its experts (for
// destination d: expert d·L's rows, then d·L + 1's, …, in row order); the owner sees, for each
// local expert, the rows of source 0, then source 1, …. Combine sends the owners' per-row
// results back the same way reversed. With ep = 1 both are local copies.
class ExpertExchange {
public:
  // The forward: exchanges the per-expert row counts. The backward passes the counts the
  // forward received (its kMoeCounts slot) and exchanges nothing for them.
  ExpertExchange(const TpContext& tp, int experts, const std::vector<Routed>& routed,
                 const Tensor* received_counts = nullptr)
      : tp_(&tp), comm_(tp.ep_comm), ep_(tp.ep_size()), me_(tp.ep_rank()),
        local_(experts / tp.ep_size()) {
    PARALLAX_CHECK(experts % ep_ == 0, "expert parallelism must divide the experts");
    // Rows this rank sends each owner, per expert, and receives per local expert.
    for (const Routed& r : routed)
      sent_.push_back(static_cast<float>(r.rows.size()));
    if (received_counts != nullptr) {
      PARALLAX_CHECK(received_counts->size() == experts, "MoE backward: one count per expert");
      received_.assign(received_counts->span().begin(), received_counts->span().end());
      return;
    }
    received_.assign(static_cast<std::size_t>(experts), 0.0f);
    exchange(sent_, std::vector<int>(static_cast<std::size_t>(ep_), local_), received_,
             std::vector<int>(static_cast<std::size_t>(ep_), local_));
  }

  int first_local() const { return me_ * local_; }
  int local() const { return local_; }
  Tensor received_counts() const {
    Tensor c(ep_, local_, Tensor::uninitialized);
    std::copy(received_.begin(), received_.end(), c.data());
    return c;
  }
  // Rows of local expert l over all sources.
  Index rows_of_local(int l) const {
    Index n = 0;
    for (int src = 0; src < ep_; ++src)
      n += count(received_, src * local_ + l);
    return n;
  }

  // Dispatch: per expert j, the rows `rows_of(j)` of this rank (rows of src, width w) → per
  // local expert l, its rows from every source.
  template <class RowsOf> std::vector<Tensor> dispatch(Index w, RowsOf rows_of) const {
    std::vector<float> out_buf;
    std::vector<int> send(static_cast<std::size_t>(ep_), 0);
    std::vector<float> in_buf;
    for (int d = 0; d < ep_; ++d) {
      for (int l = 0; l < local_; ++l) {
        const int j = d * local_ + l;
        const Tensor rows = rows_of(j);
        in_buf.insert(in_buf.end(), rows.span().begin(), rows.span().end());
        send[static_cast<std::size_t>(d)] += static_cast<int>(rows.size());
      }
    }
    std::vector<int> recv(static_cast<std::size_t>(ep_), 0);
    for (int src = 0; src < ep_; ++src)
      for (int l = 0; l < local_; ++l)
        recv[static_cast<std::size_t>(src)] +=
            static_cast<int>(count(received_, src * local_ + l) * w);
    out_buf.resize(static_cast<std::size_t>(std::accumulate(recv.begin(), recv.end(), 0)));
    exchange(in_buf, send, out_buf, recv);
    // Regroup source-major blocks into one tensor per local expert.
    std::vector<Tensor> per_expert;
    for (int l = 0; l < local_; ++l)
      per_expert.emplace_back(rows_of_local(l), w, Tensor::uninitialized);
    std::vector<Index> filled(static_cast<std::size_t>(local_), 0);
    std::size_t at = 0;
    for (int src = 0; src < ep_; ++src) {
      for (int l = 0; l < local_; ++l) {
        const Index rows = count(received_, src * local_ + l);
        Tensor& dst = per_expert[static_cast<std::size_t>(l)];
        std::copy_n(out_buf.data() + at, rows * w,
                    dst.data() + filled[static_cast<std::size_t>(l)] * w);
        filled[static_cast<std::size_t>(l)] += rows;
        at += static_cast<std::size_t>(rows * w);
      }
    }
    return per_expert;
  }

  // Combine: per local expert l, one row of width w per row it received (dispatch's order) →
  // per expert j, its rows for this rank, in routed order.
  std::vector<Tensor> combine(Index w, const std::vector<Tensor>& per_local) const {
    std::vector<float> in_buf;
    std::vector<int> send(static_cast<std::size_t>(ep_), 0);
    std::vector<Index> taken(static_cast<std::size_t>(local_), 0);
    for (int src = 0; src < ep_; ++src) {
      for (int l = 0; l < local_; ++l) {
        const Index rows = count(received_, src * local_ + l);
        const Tensor& t = per_local[static_cast<std::size_t>(l)];
        const float* from = t.data() + taken[static_cast<std::size_t>(l)] * w;
        in_buf.insert(in_buf.end(), from, from + rows * w);
        taken[static_cast<std::size_t>(l)] += rows;
        send[static_cast<std::size_t>(src)] += static_cast<int>(rows * w);
      }
    }
    std::vector<int> recv(static_cast<std::size_t>(ep_), 0);
    for (int d = 0; d < ep_; ++d)
      for (int l = 0; l < local_; ++l)
        recv[static_cast<std::size_t>(d)] += static_cast<int>(count(sent_, d * local_ + l) * w);
    std::vector<float> out_buf(
        static_cast<std::size_t>(std::accumulate(recv.begin(), recv.end(), 0)));
    exchange(in_buf, send, out_buf, recv);
    std::vector<Tensor> per_expert;
    std::size_t at = 0;
    for (std::size_t j = 0; j < sent_.size(); ++j) {
      const Index rows = count(sent_, static_cast<int>(j));
      per_expert.emplace_back(rows, w, Tensor::uninitialized);
      std::copy_n(out_buf.data() + at, rows * w, per_expert.back().data());
      at += static_cast<std::size_t>(rows * w);
    }
    return per_expert;
  }

private:
  static Index count(const std::vector<float>& c, int i) {
    return static_cast<Index>(std::lround(c[static_cast<std::size_t>(i)]));
  }
  void exchange(std::span<const float> in, const std::vector<int>& send, std::span<float> out,
                const std::vector<int>& recv) const {
    if (comm_ == nullptr) {
      PARALLAX_CHECK(in.size() == out.size(), "a local exchange keeps its size");
      std::copy(in.begin(), in.end(), out.begin());
      return;
    }
    // Reported with the layer's tensor-parallel collectives, where the simulator costs it.
    const double start = steady_seconds();
    comm_->all_to_allv(in, send, out, recv);
    if (tp_->on_comm)
      tp_->on_comm("ep all-to-all", start, steady_seconds(),
                   static_cast<double>(in.size()) * sizeof(float));
  }

  const TpContext* tp_;
  Communicator* comm_;
  int ep_;
  int me_;
  int local_;
  std::vector<float> sent_;     // [E]: rows this rank routes to expert j
  std::vector<float> received_; // [ep][L]: rows source s routes to local expert l
};

// With a capacity factor an expert takes at most C = ⌈cf · s·k / E⌉ of each sequence's routed
// copies (GShard's capacity with the sequence as the group, as the layer graph costs it, so
// the drops do not depend on how sequences are batched or laid out): those with the largest
// weights, the earlier row first on a tie; the others are dropped (they add nothing and get no
// gradient). Dropless (cf = 0) keeps every copy.
void drop_over_capacity(std::vector<Routed>& routed, const Tensor& weights, const MoeConfig& moe,
                        Index seq) {
  if (moe.capacity_factor <= 0)
    return;
  const double fair = static_cast<double>(seq) * moe.experts_per_token / moe.num_experts;
  const auto capacity = static_cast<std::size_t>(
      std::max<long long>(1, std::llround(std::ceil(moe.capacity_factor * fair))));
  const auto w = weights.m();
  for (Routed& r : routed) {
    Routed kept;
    for (std::size_t a = 0; a < r.rows.size();) {
      std::size_t e = a; // [a, e): the copies of one sequence (rows are in row order)
      while (e < r.rows.size() && r.rows[e] / seq == r.rows[a] / seq)
        ++e;
      std::vector<std::size_t> order(e - a);
      std::iota(order.begin(), order.end(), a);
      std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) {
        return w(r.rows[x], r.slot[x]) > w(r.rows[y], r.slot[y]);
      });
      if (order.size() > capacity)
        order.resize(capacity);
      std::sort(order.begin(), order.end());
      for (std::size_t q : order) {
        kept.rows.push_back(r.rows[q]);
        kept.slot.push_back(r.slot[q]);
      }
      a = e;
    }
    r = std::move(kept);
  }
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

void moe_forward(const ExecModel& model, const BlockBuffers& b, const TpContext& tp, Index seq,
                 const Tensor& x, std::vector<Tensor>& t, std::size_t first, Tensor& out) {
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

  // Each expert over the rows routed to it, on the EP rank holding it; the weighted outputs
  // add into `out` (partial over TP ranks).
  std::vector<Routed> routed = routing(chosen, E);
  drop_over_capacity(routed, weights, moe, seq);
  const ExpertExchange xchg(tp, E, routed);
  const Index h = model.config.hidden_size;
  std::vector<Tensor> inputs = xchg.dispatch(
      x.cols(), [&](int j) { return gather_rows(x, routed[static_cast<std::size_t>(j)].rows); });
  std::vector<Tensor> outputs;
  for (int l = 0; l < xchg.local(); ++l) {
    const int j = xchg.first_local() + l;
    const std::size_t s0 = moe_expert_slot(first, j);
    Tensor& xj = inputs[static_cast<std::size_t>(l)];
    const ConstMatRef wg = b.p(expert(j, "wg"));
    const Index rows = xj.rows();
    Tensor g(rows, wg.cols, Tensor::uninitialized);
    Tensor u(rows, wg.cols, Tensor::uninitialized);
    Tensor a(rows, wg.cols, Tensor::uninitialized);
    Tensor y(rows, h, Tensor::uninitialized);
    if (rows > 0) {
      ops::linear_forward(xj, wg, ConstMatRef{}, g);
      ops::linear_forward(xj, b.p(expert(j, "wu")), ConstMatRef{}, u);
      ops::swiglu_forward(g, u, a);
      ops::linear_forward(a, b.p(expert(j, "w2")), ConstMatRef{}, y);
    }
    t[s0 + kMoeGate] = std::move(g);
    t[s0 + kMoeUp] = std::move(u);
    t[s0 + kMoeAct] = std::move(a);
    t[s0 + kMoeIn] = std::move(xj);
    outputs.push_back(std::move(y));
  }
  std::vector<Tensor> back = xchg.combine(h, outputs);
  auto om = out.m();
  for (int j = 0; j < E; ++j) {
    const Routed& r = routed[static_cast<std::size_t>(j)];
    const auto ym = back[static_cast<std::size_t>(j)].m();
    for (std::size_t q = 0; q < r.rows.size(); ++q) {
      const Index i = r.rows[q];
      om.row(i) += weights.m()(i, r.slot[q]) * ym.row(static_cast<Index>(q));
    }
    t[moe_expert_slot(first, j) + kMoeOut] = std::move(back[static_cast<std::size_t>(j)]);
  }
  t[first + kMoeCounts] = xchg.received_counts();
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
  std::vector<Routed> routed = routing(t[first + kMoeChosen], E);
  drop_over_capacity(routed, weights, moe, mb.seq);
  const auto dm = dout.m();

  // Experts: dy_j = w·dout on this rank's rows; the weights' gradient <dout, y_j> (partial
  // over TP). dy goes to the expert's EP rank, its input gradient comes back.
  Tensor dweights(n, k); // zeros
  std::vector<Tensor> dys;
  for (int j = 0; j < E; ++j) {
    const Routed& r = routed[static_cast<std::size_t>(j)];
    const Tensor& y = t[moe_expert_slot(first, j) + kMoeOut];
    const auto rows = static_cast<Index>(r.rows.size());
    Tensor dy(rows, dout.cols, Tensor::uninitialized);
    for (Index q = 0; q < rows; ++q) {
      const Index i = r.rows[static_cast<std::size_t>(q)];
      const Index s = r.slot[static_cast<std::size_t>(q)];
      dy.m().row(q) = weights.m()(i, s) * dm.row(i);
      dweights.m()(i, s) = dm.row(i).dot(y.m().row(q));
    }
    dys.push_back(std::move(dy));
    t[moe_expert_slot(first, j) + kMoeOut].release();
  }
  const ExpertExchange xchg(tp, E, routed, &t[first + kMoeCounts]);
  std::vector<Tensor> dy_local =
      xchg.dispatch(dout.cols, [&](int j) { return std::move(dys[static_cast<std::size_t>(j)]); });
  std::vector<Tensor> dx_local;
  for (int l = 0; l < xchg.local(); ++l) {
    const int j = xchg.first_local() + l;
    const std::size_t s0 = moe_expert_slot(first, j);
    const Tensor& dy = dy_local[static_cast<std::size_t>(l)];
    const Index rows = dy.rows();
    Tensor dxj(rows, x.cols(), Tensor::uninitialized);
    if (rows > 0) {
      const Index f = t[s0 + kMoeGate].cols();
      Tensor da(rows, f, Tensor::uninitialized);
      ops::linear_backward(t[s0 + kMoeAct], b.p(expert(j, "w2")), dy, da, b.g(expert(j, "w2")),
                           MatRef{});
      Tensor dg(rows, f, Tensor::uninitialized);
      Tensor du(rows, f, Tensor::uninitialized);
      ops::swiglu_backward(t[s0 + kMoeGate], t[s0 + kMoeUp], da, dg, du);
      const Tensor& xj = t[s0 + kMoeIn];
      ops::linear_backward(xj, b.p(expert(j, "wg")), dg, dxj, b.g(expert(j, "wg")), MatRef{});
      ops::linear_backward(xj, b.p(expert(j, "wu")), du, dxj, b.g(expert(j, "wu")), MatRef{}, true);
    }
    dx_local.push_back(std::move(dxj));
    for (std::size_t s = s0; s < s0 + kMoePerExpert; ++s)
      t[s].release();
  }
  const std::vector<Tensor> dx_routed = xchg.combine(x.cols(), dx_local);
  for (int j = 0; j < E; ++j) {
    const Routed& r = routed[static_cast<std::size_t>(j)];
    const auto dm_j = dx_routed[static_cast<std::size_t>(j)].m();
    for (std::size_t q = 0; q < r.rows.size(); ++q)
      dx.m().row(r.rows[q]) += dm_j.row(static_cast<Index>(q));
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
