// The CPU forward and backward passes: the Eigen op set of the transformer layer
// (detail/block.hpp, written once for both backends), the embedding, and the final norm, LM
// head and vocabulary-parallel cross-entropy.
#include "parallax/core/error.hpp"
#include "parallax/executor/detail/block.hpp"
#include "parallax/executor/model.hpp"
#include "parallax/executor/moe.hpp"
#include "parallax/executor/ops.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace parallax {
namespace {

using Index = Eigen::Index;

// The Eigen kernels of ops.hpp as the layer's op set.
struct CpuOps {
  using Tensor = parallax::Tensor;
  using In = ConstMatRef;
  using Out = MatRef;
  using Batch = MicroBatch;
  using Shape = ops::AttentionShape;

  Tensor make(Index rows, Index cols) const { return {rows, cols, Tensor::uninitialized}; }
  Tensor copy(const Tensor& x) const {
    Tensor y = make(x.rows(), x.cols());
    std::copy(x.span().begin(), x.span().end(), y.span().begin());
    return y;
  }
  std::span<float> floats(Tensor& x) const { return x.span(); }
  std::span<const float> floats(const Tensor& x) const { return x.span(); }
  In view(const Tensor& x) const { return x; }
  Tensor gemm_input(Tensor x) const { return x; }
  const MicroBatch& host(const MicroBatch& mb) const { return mb; }
  In param(const BlockBuffers& b, std::string_view s) const { return b.p(s); }
  Out grad(const BlockBuffers& b, std::string_view s) const { return b.g(s); }
  void synchronize() const {}

  void linear(In x, In w, In b, Out y) const { ops::linear_forward(x, w, b, y); }
  void linear_grad(In x, In w, In dy, Out dx, Out dw, Out db, bool accumulate_dx) const {
    ops::linear_backward(x, w, dy, dx, dw, db, accumulate_dx);
  }

  block::NormOut<Tensor> norm_forward(const ExecModel& m, const BlockBuffers& b,
                                      const std::string& prefix, const Tensor& x) const {
    block::NormOut<Tensor> o{make(x.rows(), x.cols()), Tensor(), make(x.rows(), 1)};
    if (m.rmsnorm()) {
      ops::rmsnorm_forward(x, b.p(prefix + ".gamma"), o.y, o.rstd, m.norm_eps);
    } else {
      o.mean = make(x.rows(), 1);
      ops::layernorm_forward(x, b.p(prefix + ".gamma"), b.p(prefix + ".beta"), o.y, o.mean, o.rstd,
                             m.norm_eps);
    }
    return o;
  }
  // dx = norm backward(dy), added to dx's previous value when `accumulate`.
  void norm_backward(const ExecModel& m, const BlockBuffers& b, const std::string& prefix,
                     const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& dy,
                     Tensor& dx, bool accumulate) const {
    Tensor tmp = make(x.rows(), x.cols());
    if (m.rmsnorm()) {
      ops::rmsnorm_backward(x, b.p(prefix + ".gamma"), rstd, dy, tmp, b.g(prefix + ".gamma"));
    } else {
      ops::layernorm_backward(x, b.p(prefix + ".gamma"), mean, rstd, dy, tmp,
                              b.g(prefix + ".gamma"), b.g(prefix + ".beta"));
    }
    if (accumulate) {
      dx.m() += tmp.m();
    } else {
      dx = std::move(tmp);
    }
  }

  void add(In x, In y, Out out) const { out.m() = x.m() + y.m(); }
  void add_bias(Out y, In b) const { y.m().rowwise() += b.m().row(0); }
  void bias_grad(In dy, Out db) const { db.m().row(0) += dy.m().colwise().sum(); }
  void gelu_forward(In x, Out y) const { ops::gelu_forward(x, y); }
  void gelu_backward(In x, In dy, Out dx) const { ops::gelu_backward(x, dy, dx); }
  void swiglu_forward(In g, In u, Out y) const { ops::swiglu_forward(g, u, y); }
  void swiglu_backward(In g, In u, In dy, Out dg, Out du) const {
    ops::swiglu_backward(g, u, dy, dg, du);
  }
  // Rotary embedding at each row's position in the full (not sequence-parallel) sequence.
  void rope(Out q, Out k, int head_dim, const MicroBatch& mb, float theta, bool backward) const {
    std::vector<std::int32_t> pos(static_cast<std::size_t>(mb.batch * mb.seq));
    for (std::size_t r = 0; r < pos.size(); ++r)
      pos[r] = mb.seq_position(static_cast<Index>(r) % mb.seq);
    const auto rotate = backward ? ops::rope_backward : ops::rope_forward;
    rotate(q, head_dim, pos, theta);
    rotate(k, head_dim, pos, theta);
  }

  void set_zero(Tensor& x) const { x.m().setZero(); }
  // Routed experts (executor/src/moe.cpp) over the rows of slot kLn2Full.
  void moe_forward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                   const MicroBatch& mb, std::vector<Tensor>& t, Tensor& out) const {
    t.resize(block::kNumSlots + moe_slot_count(m.config.moe)); // before referring into t
    parallax::moe_forward(m, b, tp, mb.seq, t[block::kLn2Full], t, block::kNumSlots, out);
  }
  void moe_backward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                    const MicroBatch& mb, std::vector<Tensor>& t, In dout, Tensor& dx) const {
    parallax::moe_backward(m, b, tp, mb, t[block::kLn2Full], t, block::kNumSlots, dout, dx);
  }

  // Context parallelism (the all-gather exchange): a K or V block [batch · seq, w] of every CP
  // rank gathered into the whole sequences [batch · cp · seq, w] in position order, and the
  // gradients of whole sequences summed back onto each rank's block.
  Tensor cp_gather(const TpContext& tp, const MicroBatch& mb, const Tensor& local) const {
    const int cp = tp.cp_size();
    Tensor parts = make(local.rows() * cp, local.cols());
    tp.cp_comm->all_gather(local.span(), parts.span());
    Tensor full = make(local.rows() * cp, local.cols());
    for_cp_rows(mb, cp, local.cols(), [&](Index part_row, Index full_row, Index w) {
      std::copy_n(parts.data() + part_row * w, w, full.data() + full_row * w);
    });
    return full;
  }
  Tensor cp_reduce_scatter(const TpContext& tp, const MicroBatch& mb, const Tensor& full) const {
    const int cp = tp.cp_size();
    Tensor parts = make(full.rows(), full.cols());
    for_cp_rows(mb, cp, full.cols(), [&](Index part_row, Index full_row, Index w) {
      std::copy_n(full.data() + full_row * w, w, parts.data() + part_row * w);
    });
    Tensor local = make(full.rows() / cp, full.cols());
    tp.cp_comm->reduce_scatter_sum(parts.span(), local.span());
    return local;
  }
  // What travels around the ring: the rank's K and V, then `extra` zeroed parts of their size
  // (the backward's gradient accumulators).
  static std::vector<float> ring_block(const std::vector<Tensor>& t, int extra) {
    const std::span<const float> k = t[block::kK].span();
    const std::span<const float> v = t[block::kV].span();
    std::vector<float> out(k.size() * static_cast<std::size_t>(2 + extra), 0.0f);
    std::copy(k.begin(), k.end(), out.begin());
    std::copy(v.begin(), v.end(), out.begin() + static_cast<std::ptrdiff_t>(k.size()));
    return out;
  }

  // Ring attention: the rank's K/V block passes around the CP ring (sent on to the next rank
  // while this one computes on it), each block folded into a running softmax; the output and
  // its log-sum-exp (kAtt, kLse) are kept, with the rank's own K and V, for the backward.
  void cp_ring_forward(const TpContext& tp, const MicroBatch& mb, const Shape& shape,
                       std::vector<Tensor>& t) const {
    using namespace block;
    const int cp = tp.cp_size();
    const int me = tp.cp_rank();
    Communicator& comm = *tp.cp_comm;
    const Index kv_rows = t[kK].rows();
    const Index kv_cols = t[kK].cols();
    const Index half = kv_rows * kv_cols;
    std::vector<float> current = ring_block(t, 0);
    std::vector<float> incoming(current.size());
    Tensor m(shape.batch * shape.heads, shape.seq, Tensor::uninitialized);
    m.m().setConstant(-std::numeric_limits<float>::infinity());
    Tensor l(shape.batch * shape.heads, shape.seq); // zeros
    t[kAtt].m().setZero();
    for (int step = 0; step < cp; ++step) {
      const int src = (me - step + cp) % cp;
      CommRequest sent, received;
      if (step + 1 < cp) {
        sent = comm.isend(current, (me + 1) % cp, 0);
        received = comm.irecv(incoming, (me - 1 + cp) % cp, 0);
      }
      const std::vector<std::int32_t> pos = context_chunk_positions(mb.seq * cp, cp, src);
      const ConstMatRef k{current.data(), kv_rows, kv_cols};
      const ConstMatRef v{current.data() + half, kv_rows, kv_cols};
      ops::attention_block_forward(t[kQ], k, v, shape, pos, m, l, t[kAtt]);
      received.wait();
      sent.wait();
      std::swap(current, incoming);
    }
    t[kLse] = make(shape.batch * shape.heads, shape.seq);
    ops::attention_block_finish(m, l, shape, t[kAtt], t[kLse]);
  }
  // Its backward: the blocks come around again with their gradient accumulators, and after the
  // last step each block's gradients take one more hop home.
  void cp_ring_backward(const TpContext& tp, const MicroBatch& mb, const Shape& shape,
                        std::vector<Tensor>& t, const Tensor& datt, Tensor& dq, Tensor& dk,
                        Tensor& dv) const {
    using namespace block;
    const int cp = tp.cp_size();
    const int me = tp.cp_rank();
    Communicator& comm = *tp.cp_comm;
    const Index kv_rows = t[kK].rows();
    const Index kv_cols = t[kK].cols();
    const Index part = kv_rows * kv_cols;
    std::vector<float> current = ring_block(t, 2); // K, V, dK, dV
    std::vector<float> incoming(current.size());
    Tensor delta(shape.batch * shape.heads, shape.seq, Tensor::uninitialized);
    ops::attention_delta(datt, t[kAtt], shape, delta);
    dq.m().setZero();
    for (int step = 0; step < cp; ++step) {
      const int src = (me - step + cp) % cp;
      const std::vector<std::int32_t> pos = context_chunk_positions(mb.seq * cp, cp, src);
      float* base = current.data();
      ops::attention_block_backward(
          t[kQ], ConstMatRef{base, kv_rows, kv_cols}, ConstMatRef{base + part, kv_rows, kv_cols},
          datt, t[kLse], delta, shape, pos, dq, MatRef{base + 2 * part, kv_rows, kv_cols},
          MatRef{base + 3 * part, kv_rows, kv_cols});
      if (step + 1 < cp) {
        CommRequest sent = comm.isend(current, (me + 1) % cp, 1);
        CommRequest received = comm.irecv(incoming, (me - 1 + cp) % cp, 1);
        received.wait();
        sent.wait();
        std::swap(current, incoming);
      }
    }
    // The block held now is the next rank's, its gradients complete; ours come from the last.
    std::vector<float> mine(static_cast<std::size_t>(2 * part));
    if (cp > 1) {
      CommRequest sent =
          comm.isend(std::span<const float>(current).subspan(static_cast<std::size_t>(2 * part)),
                     (me + 1) % cp, 2);
      CommRequest received = comm.irecv(mine, (me - 1 + cp) % cp, 2);
      received.wait();
      sent.wait();
    } else {
      std::copy(current.begin() + 2 * part, current.end(), mine.begin());
    }
    std::copy_n(mine.data(), part, dk.data());
    std::copy_n(mine.data() + part, part, dv.data());
    t[kAtt].release();
    t[kLse].release();
  }

  // f(row in the rank-major blocks, row in the whole sequences, width) for every row.
  template <class F> static void for_cp_rows(const MicroBatch& mb, int cp, Index w, F&& f) {
    const Index full_seq = mb.seq * cp;
    for (int r = 0; r < cp; ++r) {
      const std::vector<std::int32_t> pos = context_chunk_positions(full_seq, cp, r);
      for (Index b = 0; b < mb.batch; ++b) {
        for (Index i = 0; i < mb.seq; ++i) {
          f((r * mb.batch + b) * mb.seq + i, b * full_seq + pos[static_cast<std::size_t>(i)], w);
        }
      }
    }
  }

  // Attention keeps its probabilities (kProbs) unless told otherwise.
  void attention_forward(const Shape& shape, KeepMode keep, std::vector<Tensor>& t) const {
    using namespace block;
    t[kProbs] = make(shape.batch * shape.heads, shape.seq * shape.keys());
    ops::attention_forward(t[kQ], t[kK], t[kV], shape, t[kProbs], t[kAtt]);
    if (keep != KeepMode::all)
      t[kProbs].release();
  }
  void attention_backward(const Shape& shape, std::vector<Tensor>& t, const Tensor& datt,
                          Tensor& dq, Tensor& dk, Tensor& dv) const {
    using namespace block;
    t[kAtt].release();
    if (t[kProbs].empty()) {
      // Selective recomputation: the probabilities come back from q and k.
      t[kProbs] = make(shape.batch * shape.heads, shape.seq * shape.keys());
      ops::attention_probs(t[kQ], t[kK], shape, t[kProbs]);
    }
    ops::attention_backward(t[kQ], t[kK], t[kV], t[kProbs], datt, shape, dq, dk, dv);
    t[kProbs].release();
  }
};
static_assert(block::BlockOps<CpuOps> && block::RoutedExpertOps<CpuOps> &&
              block::ContextParallelOps<CpuOps>);

constexpr CpuOps kCpu{};

} // namespace

Tensor layer_forward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                     const MicroBatch& mb, const Tensor& x, KeepMode keep, BlockCache& cache) {
  return block::layer_forward(kCpu, m, b, tp, mb, x, keep, cache);
}

void layer_recompute(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                     const MicroBatch& mb, BlockCache& cache) {
  block::layer_recompute(kCpu, m, b, tp, mb, cache);
}

Tensor layer_backward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                      const MicroBatch& mb, const Tensor& dy, BlockCache& cache) {
  return block::layer_backward(kCpu, m, b, tp, mb, dy, cache);
}

Tensor embedding_forward(const ExecModel& m, const BlockBuffers& emb, const BlockBuffers* positions,
                         const TpContext& tp, const MicroBatch& mb) {
  const ParamInfo& wte = emb.layout->param("wte");
  Tensor e(mb.batch * mb.seq, m.config.hidden_size, Tensor::uninitialized);
  ops::embedding_forward(mb.inputs, emb.p("wte"), wte.row0, e);
  e = block::tp_reduce(kCpu, tp, std::move(e));
  if (positions != nullptr) {
    const auto wpe = positions->p("wpe").m();
    auto em = e.m();
    for (Index r = 0; r < e.rows(); ++r)
      em.row(r) += wpe.row(mb.positions[static_cast<std::size_t>(r)]);
  }
  return e;
}

void embedding_backward(const ExecModel& /*m*/, const BlockBuffers& emb,
                        const BlockBuffers* positions, const TpContext& tp, const MicroBatch& mb,
                        const Tensor& dx) {
  if (positions != nullptr) {
    auto dwpe = positions->g("wpe").m();
    const auto dm = dx.m();
    for (Index r = 0; r < dx.rows(); ++r)
      dwpe.row(mb.positions[static_cast<std::size_t>(r)]) += dm.row(r);
  }
  Tensor dfull_storage;
  const ConstMatRef dfull = block::full_rows(kCpu, tp, dx, dfull_storage);
  ops::embedding_backward(mb.inputs, dfull, emb.layout->param("wte").row0, emb.g("wte"));
}

namespace {
enum HeadSlot : std::size_t { kHX, kHMean, kHRstd, kHFull, kHLogits, kHMax, kHSum, kHNumSlots };
// Logit of a padded vocabulary entry: exp(kMaskedLogit − max) is 0 for any real max.
constexpr float kMaskedLogit = -1e30f;
} // namespace

double head_forward(const ExecModel& m, const BlockBuffers& norm, const BlockBuffers& head,
                    const TpContext& tp, const MicroBatch& mb, const Tensor& x, BlockCache& cache) {
  std::vector<Tensor> t(kHNumSlots);
  block::NormOut<Tensor> o = kCpu.norm_forward(m, norm, "norm", x);
  t[kHMean] = std::move(o.mean);
  t[kHRstd] = std::move(o.rstd);
  t[kHFull] = block::tp_gather(kCpu, tp, std::move(o.y));
  const Index n = t[kHFull].rows();
  const bool tied = m.config.tied_embeddings;
  const ConstMatRef w = head.p(tied ? "wte" : "w");
  t[kHLogits] = Tensor(n, tied ? w.rows : w.cols, Tensor::uninitialized);
  if (tied) {
    t[kHLogits].m().noalias() = t[kHFull].m() * w.m().transpose();
  } else {
    ops::linear_forward(t[kHFull], w, ConstMatRef{}, t[kHLogits]);
  }
  const ParamInfo& vocab = head.layout->param(tied ? "wte" : "w");
  const std::int64_t vocab_begin = tied ? vocab.row0 : vocab.col0;
  // A padded vocabulary's extra logits take no part in the softmax (and get no gradient).
  const std::int64_t valid = tied ? vocab.valid_rows() : vocab.valid_cols();
  if (valid < t[kHLogits].cols()) {
    t[kHLogits].m().rightCols(t[kHLogits].cols() - valid).setConstant(kMaskedLogit);
  }
  t[kHMax] = Tensor(n, 1);
  t[kHSum] = Tensor(n, 1);
  Tensor target(n, 1);
  ops::row_max(t[kHLogits], t[kHMax]);
  if (tp.size() > 1)
    tp.comm->all_reduce_max(t[kHMax].span());
  ops::row_sum_exp(t[kHLogits], t[kHMax], t[kHSum]);
  ops::target_logits(t[kHLogits], mb.targets, vocab_begin, target);
  if (tp.size() > 1) {
    // One all-reduce for both sums.
    Tensor both(2, n);
    std::copy(t[kHSum].span().begin(), t[kHSum].span().end(), both.data());
    std::copy(target.span().begin(), target.span().end(), both.data() + n);
    tp.comm->all_reduce_sum(both.span());
    std::copy(both.data(), both.data() + n, t[kHSum].data());
    std::copy(both.data() + n, both.data() + 2 * n, target.data());
  }
  double loss = 0;
  for (Index r = 0; r < n; ++r) {
    loss +=
        std::log(static_cast<double>(t[kHSum].data()[r])) + t[kHMax].data()[r] - target.data()[r];
  }
  t[kHX] = kCpu.copy(x);
  cache.t = std::move(t);
  return loss;
}

Tensor head_backward(const ExecModel& m, const BlockBuffers& norm, const BlockBuffers& head,
                     const TpContext& tp, const MicroBatch& mb, float loss_scale,
                     BlockCache& cache) {
  std::vector<Tensor>& t = cache.t;
  PARALLAX_CHECK(t.size() == kHNumSlots, "head backward without its forward");
  const bool tied = m.config.tied_embeddings;
  const std::int64_t vocab_begin =
      tied ? head.layout->param("wte").row0 : head.layout->param("w").col0;
  Tensor dlogits(t[kHLogits].rows(), t[kHLogits].cols(), Tensor::uninitialized);
  ops::cross_entropy_backward(t[kHLogits], t[kHMax], t[kHSum], mb.targets, vocab_begin, loss_scale,
                              dlogits);
  t[kHLogits].release();
  Tensor dfull(t[kHFull].rows(), t[kHFull].cols(), Tensor::uninitialized);
  if (tied) {
    const ConstMatRef w = head.p("wte");
    dfull.m().noalias() = dlogits.m() * w.m();
    head.g("wte").m().noalias() += dlogits.m().transpose() * t[kHFull].m();
  } else {
    ops::linear_backward(t[kHFull], head.p("w"), dlogits, dfull, head.g("w"), MatRef{});
  }
  dlogits.release();
  const Tensor dnorm = block::tp_reduce(kCpu, tp, std::move(dfull));
  Tensor dx;
  kCpu.norm_backward(m, norm, "norm", t[kHX], t[kHMean], t[kHRstd], dnorm, dx, false);
  cache.t.clear();
  return dx;
}

} // namespace parallax
