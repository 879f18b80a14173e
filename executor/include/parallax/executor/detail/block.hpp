// The transformer layer written once: its forward, full recomputation and backward, and the
// tensor-parallel regions around them, as templates over a backend's op set (BlockOps).
// executor/src/model.cpp instantiates them with the Eigen kernels of ops.hpp, and
// executor/cuda/src/trainer_cuda.cpp with the CUDA kernels, so both backends run the same
// sequence of kernels, collectives and cache slots; what only a GPU can check is the kernels.
//
// An op set is a small value type (the CUDA one holds the stream, allocator and cuBLAS handle)
// naming its tensor, its input / output views, its micro-batch and attention-shape types, and
// providing the kernels below. Tensors convert implicitly to both views.
#pragma once

#include "parallax/core/error.hpp"
#include "parallax/executor/model.hpp"

#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace parallax::block {

using Index = std::int64_t;

// Cache slots of a transformer layer. kProbs: the attention probabilities, for kernels that
// keep them (selective recomputation drops them); kLse: their log-sum-exp, for flash kernels.
enum Slot : std::size_t {
  kX,
  kLn1Mean,
  kLn1Rstd,
  kLn1Full,
  kQ,
  kK,
  kV,
  kProbs,
  kLse,
  kAtt,
  kX1,
  kLn2Mean,
  kLn2Rstd,
  kLn2Full,
  kU,
  kUp,
  kAct,
  kNumSlots
};

template <class T> struct NormOut {
  T y, mean, rstd; // mean stays empty for RMSNorm
};

// The backend op set the layer is written against.
template <class O>
concept BlockOps = requires(const O& o, typename O::Tensor& t, const typename O::Tensor& ct,
                            std::vector<typename O::Tensor>& slots, typename O::In in,
                            typename O::Out out, const typename O::Batch& mb,
                            const typename O::Shape& shape, const ExecModel& m,
                            const BlockBuffers& b, const std::string& name, Index n, bool flag) {
  // Tensors: allocation, copies, element spans for collectives, views.
  { o.make(n, n) } -> std::same_as<typename O::Tensor>;
  { o.copy(ct) } -> std::same_as<typename O::Tensor>;
  { o.floats(t) } -> std::same_as<std::span<float>>;
  { o.floats(ct) } -> std::same_as<std::span<const float>>;
  { o.view(ct) } -> std::same_as<typename O::In>;
  // A GEMM-only activation as the backend keeps it (a bf16 copy under mixed precision).
  { o.gemm_input(std::move(t)) } -> std::same_as<typename O::Tensor>;
  { o.host(mb) } -> std::same_as<const MicroBatch&>;
  { o.param(b, name) } -> std::same_as<typename O::In>;
  { o.grad(b, name) } -> std::same_as<typename O::Out>;
  { t.rows() } -> std::convertible_to<Index>;
  { t.cols() } -> std::convertible_to<Index>;
  { t.size() } -> std::convertible_to<Index>;
  { t.empty() } -> std::same_as<bool>;
  t.release();
  o.synchronize(); // all queued work done (before a timed collective)
  // Kernels. linear_grad accumulates dw (and db) and, when `flag`, dx.
  o.linear(in, in, in, out);
  o.linear_grad(in, in, in, out, out, out, flag);
  { o.norm_forward(m, b, name, ct) } -> std::same_as<NormOut<typename O::Tensor>>;
  o.norm_backward(m, b, name, ct, ct, ct, ct, t, flag); // dx (+)= ∂/∂x
  o.add(in, in, out);
  o.add_bias(out, in);
  o.bias_grad(in, out); // db += column sums of dy
  o.gelu_forward(in, out);
  o.gelu_backward(in, in, out);
  o.swiglu_forward(in, in, out);
  o.swiglu_backward(in, in, in, out, out);
  o.rope(t, t, int{}, mb, float{}, flag); // q and k rotated; `flag`: the backward's rotation
  // Attention reads slots kQ, kK, kV and fills kAtt (allocated), and kProbs or kLse; kProbs is
  // dropped unless KeepMode::all. The backward recomputes what is missing and releases kAtt,
  // kProbs and kLse.
  o.attention_forward(shape, KeepMode{}, slots);
  o.attention_backward(shape, slots, ct, t, t, t);
};

template <BlockOps O>
typename O::In opt_param(const O& o, const ExecModel& m, const BlockBuffers& b,
                         const std::string& s) {
  return m.config.bias ? o.param(b, s) : typename O::In{};
}
template <BlockOps O>
typename O::Out opt_grad(const O& o, const ExecModel& m, const BlockBuffers& b,
                         const std::string& s) {
  return m.config.bias ? o.grad(b, s) : typename O::Out{};
}

// Context parallelism: the backend gathers every CP rank's K / V block into whole sequences
// and sums their gradients back (the all-gather exchange; a ring with overlap is what the
// planner can also cost), and its attention takes keys of the whole sequence against queries at
// given positions (AttentionShape::kv_seq, q_positions). A backend without them (CUDA, for
// now) refuses cp > 1 plans.
template <class O>
concept ContextParallelOps = requires(const O& o, const TpContext& tp, const MicroBatch& mb,
                                      const typename O::Tensor& ct, typename O::Tensor& t,
                                      std::vector<typename O::Tensor>& slots,
                                      typename O::Shape& shape) {
  { o.cp_gather(tp, mb, ct) } -> std::same_as<typename O::Tensor>;
  { o.cp_reduce_scatter(tp, mb, ct) } -> std::same_as<typename O::Tensor>;
  o.cp_ring_forward(tp, mb, shape, slots);
  o.cp_ring_backward(tp, mb, shape, slots, ct, t, t, t);
  shape.kv_seq;
  shape.q_positions;
};

template <BlockOps O>
typename O::Shape attention_shape(const ExecModel& m, const TpContext& tp, const MicroBatch& mb) {
  typename O::Shape s{.batch = mb.batch,
                      .seq = mb.seq,
                      .heads = m.config.num_attention_heads / tp.size(),
                      .kv_heads = m.config.num_kv_heads / tp.size(),
                      .head_dim = static_cast<int>(m.config.head_dim())};
  if constexpr (ContextParallelOps<O>) {
    if (tp.cp_size() > 1) {
      s.kv_seq = mb.seq * tp.cp_size();
      s.q_positions = mb.seq_positions;
    }
  }
  return s;
}

// ---- Megatron's conjugate pair around a tensor-parallel region ----
// gather: before a column-parallel GEMM (all-gather of sequence shards with SP, identity
// without); its backward is reduce. reduce: after a row-parallel GEMM (reduce-scatter to
// sequence shards with SP, all-reduce without); its backward is gather. Each collective is
// reported to tp.on_comm (with the queued work synchronised around it) when that is set.

template <BlockOps O> double comm_start(const O& o, const TpContext& tp) {
  if (tp.on_comm)
    o.synchronize();
  return steady_seconds();
}

template <BlockOps O>
void comm_done(const O& o, const TpContext& tp, const char* what, double start, Index elems) {
  if (tp.on_comm) {
    o.synchronize();
    tp.on_comm(what, start, steady_seconds(), static_cast<double>(elems) * sizeof(float));
  }
}

// x over the full sequence: x itself, or (sequence parallelism) its all-gather into `storage`.
// The backward's gradients are gathered this way, without copying them first.
template <BlockOps O>
typename O::In full_rows(const O& o, const TpContext& tp, const typename O::Tensor& x,
                         typename O::Tensor& storage) {
  if (tp.size() == 1 || !tp.sequence_parallel)
    return o.view(x);
  const double start = comm_start(o, tp);
  storage = o.make(x.rows() * tp.size(), x.cols());
  tp.comm->all_gather(o.floats(x), o.floats(storage));
  comm_done(o, tp, "tp all-gather", start, storage.size());
  return o.view(storage);
}

template <BlockOps O>
typename O::Tensor tp_gather(const O& o, const TpContext& tp, typename O::Tensor x) {
  typename O::Tensor full;
  full_rows(o, tp, x, full);
  return full.empty() ? std::move(x) : std::move(full);
}

template <BlockOps O>
typename O::Tensor tp_reduce(const O& o, const TpContext& tp, typename O::Tensor x) {
  if (tp.size() == 1)
    return x;
  const double start = comm_start(o, tp);
  if (!tp.sequence_parallel) {
    tp.comm->all_reduce_sum(o.floats(x));
    comm_done(o, tp, "tp all-reduce", start, x.size());
    return x;
  }
  PARALLAX_CHECK(x.rows() % tp.size() == 0, "sequence parallel needs rows divisible by tp");
  typename O::Tensor part = o.make(x.rows() / tp.size(), x.cols());
  tp.comm->reduce_scatter_sum(o.floats(static_cast<const typename O::Tensor&>(x)), o.floats(part));
  comm_done(o, tp, "tp reduce-scatter", start, x.size());
  return part;
}

// ---- context parallelism ----

// Whether the layer's attention runs around the CP ring (a backend with the ring ops, cp > 1,
// the plan's p2p exchange); the ring's blocks each hold one rank's keys (no kv_seq).
template <BlockOps O> bool cp_ring(const TpContext& tp) {
  if constexpr (ContextParallelOps<O>) {
    return tp.cp_size() > 1 && tp.cp_ring;
  } else {
    PARALLAX_CHECK(tp.cp_size() == 1, "this backend has no context-parallel ops");
    return false;
  }
}
template <class S> S ring_shape(S s) {
  s.kv_seq = 0;
  return s;
}

// K or V of this rank's tokens → of the whole sequences (a no-op without context parallelism).
template <BlockOps O>
typename O::Tensor cp_gather_kv(const O& o, const TpContext& tp, const MicroBatch& mb,
                                typename O::Tensor x) {
  if (tp.cp_size() == 1)
    return x;
  if constexpr (ContextParallelOps<O>) {
    const double start = comm_start(o, tp);
    typename O::Tensor full = o.cp_gather(tp, mb, x);
    comm_done(o, tp, "cp all-gather", start, full.size());
    return full;
  } else {
    PARALLAX_CHECK(false, "this backend has no context-parallel ops");
    return x;
  }
}
template <BlockOps O>
typename O::Tensor cp_scatter_grad(const O& o, const TpContext& tp, const MicroBatch& mb,
                                   typename O::Tensor dx) {
  if (tp.cp_size() == 1)
    return dx;
  if constexpr (ContextParallelOps<O>) {
    const double start = comm_start(o, tp);
    typename O::Tensor local = o.cp_reduce_scatter(tp, mb, dx);
    comm_done(o, tp, "cp reduce-scatter", start, dx.size());
    return local;
  } else {
    PARALLAX_CHECK(false, "this backend has no context-parallel ops");
    return dx;
  }
}

// ---- the MLP sub-layer ----

// A routed-expert (mixture-of-experts) layer needs the backend's expert ops; a backend without
// them (CUDA, for now) refuses such models when it loads them.
template <class O>
concept RoutedExpertOps = requires(const O& o, const ExecModel& m, const BlockBuffers& b,
                                   const TpContext& tp, const typename O::Batch& mb,
                                   std::vector<typename O::Tensor>& t, typename O::Tensor& out,
                                   typename O::In in) {
  o.moe_forward(m, b, tp, mb, t, out);
  o.moe_backward(m, b, tp, mb, t, in, out);
};

// Dense MLP of the rows in slot kLn2Full (a mixture's shared experts: the same weights),
// output partial over tensor-parallel ranks, in `down`.
template <BlockOps O>
void dense_mlp_forward(const O& o, const ExecModel& m, const BlockBuffers& b,
                       std::vector<typename O::Tensor>& t, Index n, typename O::Tensor& down) {
  const Index f = o.param(b, m.llama() ? "mlp.wg" : "mlp.w1").cols;
  t[kU] = o.make(n, f);
  t[kAct] = o.make(n, f);
  if (m.llama()) {
    t[kUp] = o.make(n, f);
    o.linear(t[kLn2Full], o.param(b, "mlp.wg"), typename O::In{}, t[kU]);
    o.linear(t[kLn2Full], o.param(b, "mlp.wu"), typename O::In{}, t[kUp]);
    o.swiglu_forward(t[kU], t[kUp], t[kAct]);
  } else {
    o.linear(t[kLn2Full], o.param(b, "mlp.w1"), opt_param(o, m, b, "mlp.b1"), t[kU]);
    o.gelu_forward(t[kU], t[kAct]);
  }
  t[kAct] = o.gemm_input(std::move(t[kAct])); // only the w2 GEMM and its backward read it
  o.linear(t[kAct], o.param(b, "mlp.w2"), typename O::In{}, down);
}

// Its backward: dln2_full = the input gradient (allocated here, once the activation's gradient
// is done with the activation), weight gradients added.
template <BlockOps O>
void dense_mlp_backward(const O& o, const ExecModel& m, const BlockBuffers& b,
                        std::vector<typename O::Tensor>& t, Index n, typename O::In dd_full,
                        typename O::Tensor& dln2_full) {
  using T = typename O::Tensor;
  using Out = typename O::Out;
  T dact = o.make(n, t[kAct].cols());
  o.linear_grad(t[kAct], o.param(b, "mlp.w2"), dd_full, dact, o.grad(b, "mlp.w2"), Out{}, false);
  t[kAct].release();
  dln2_full = o.make(n, m.config.hidden_size);
  if (m.llama()) {
    T dgate = o.make(n, t[kU].cols());
    T dup = o.make(n, t[kU].cols());
    o.swiglu_backward(t[kU], t[kUp], dact, dgate, dup);
    o.linear_grad(t[kLn2Full], o.param(b, "mlp.wg"), dgate, dln2_full, o.grad(b, "mlp.wg"), Out{},
                  false);
    o.linear_grad(t[kLn2Full], o.param(b, "mlp.wu"), dup, dln2_full, o.grad(b, "mlp.wu"), Out{},
                  true);
  } else {
    T du = o.make(n, t[kU].cols());
    o.gelu_backward(t[kU], dact, du);
    o.linear_grad(t[kLn2Full], o.param(b, "mlp.w1"), du, dln2_full, o.grad(b, "mlp.w1"),
                  opt_grad(o, m, b, "mlp.b1"), false);
  }
  t[kU].release();
  t[kUp].release();
}

// A mixture of experts in this layer, and whether it also has a dense MLP (shared experts).
inline bool moe_layer(const ExecModel& m, const BlockBuffers& b) {
  return m.config.moe.is_moe_layer(b.layout->unit);
}
inline bool dense_mlp(const ExecModel& m, const BlockBuffers& b) {
  return !moe_layer(m, b) || m.config.moe.shared_experts > 0;
}

// ---- the transformer layer ----

// x [rows_local, h] → y. `keep` decides what the cache holds: everything, everything but the
// attention probabilities (selective recomputation), or only the input (full recomputation).
template <BlockOps O, class Cache>
typename O::Tensor layer_forward(const O& o, const ExecModel& m, const BlockBuffers& b,
                                 const TpContext& tp, const typename O::Batch& mb,
                                 const typename O::Tensor& x, KeepMode keep, Cache& cache) {
  using T = typename O::Tensor;
  const MicroBatch& host = o.host(mb);
  const Index n = host.batch * host.seq;
  const typename O::Shape shape = attention_shape<O>(m, tp, host);
  const Index d = shape.head_dim;
  const Index h = m.config.hidden_size;
  std::vector<T> t(kNumSlots);

  // Attention sub-layer.
  NormOut<T> ln1 = o.norm_forward(m, b, "ln1", x);
  t[kLn1Mean] = std::move(ln1.mean);
  t[kLn1Rstd] = std::move(ln1.rstd);
  t[kLn1Full] = o.gemm_input(tp_gather(o, tp, std::move(ln1.y)));
  t[kQ] = o.make(n, shape.heads * d);
  t[kK] = o.make(n, shape.kv_heads * d);
  t[kV] = o.make(n, shape.kv_heads * d);
  o.linear(t[kLn1Full], o.param(b, "attn.wq"), opt_param(o, m, b, "attn.bq"), t[kQ]);
  o.linear(t[kLn1Full], o.param(b, "attn.wk"), opt_param(o, m, b, "attn.bk"), t[kK]);
  o.linear(t[kLn1Full], o.param(b, "attn.wv"), opt_param(o, m, b, "attn.bv"), t[kV]);
  if (m.rope())
    o.rope(t[kQ], t[kK], static_cast<int>(d), mb, m.rope_theta, false);
  t[kAtt] = o.make(n, shape.heads * d);
  if (cp_ring<O>(tp)) {
    // Context parallelism over the ring: the rank's queries against each rank's block in turn.
    if constexpr (ContextParallelOps<O>)
      o.cp_ring_forward(tp, host, ring_shape(shape), t);
  } else {
    // All-gathered: this rank's queries against the keys and values of whole sequences (kept
    // so for the backward).
    t[kK] = cp_gather_kv(o, tp, host, std::move(t[kK]));
    t[kV] = cp_gather_kv(o, tp, host, std::move(t[kV]));
    o.attention_forward(shape, keep, t);
  }
  T out = o.make(n, h);
  o.linear(t[kAtt], o.param(b, "attn.wo"), typename O::In{}, out);
  out = tp_reduce(o, tp, std::move(out));
  if (m.config.bias)
    o.add_bias(out, o.param(b, "attn.bo"));
  t[kX1] = o.make(x.rows(), x.cols());
  o.add(x, out, t[kX1]);
  out.release();

  // MLP sub-layer: a dense MLP, or a mixture of experts (its shared experts as the dense MLP).
  NormOut<T> ln2 = o.norm_forward(m, b, "ln2", t[kX1]);
  t[kLn2Mean] = std::move(ln2.mean);
  t[kLn2Rstd] = std::move(ln2.rstd);
  t[kLn2Full] = o.gemm_input(tp_gather(o, tp, std::move(ln2.y)));
  T down = o.make(n, h);
  if (dense_mlp(m, b))
    dense_mlp_forward(o, m, b, t, n, down);
  if (moe_layer(m, b)) {
    if constexpr (RoutedExpertOps<O>) {
      if (!dense_mlp(m, b))
        o.set_zero(down);
      o.moe_forward(m, b, tp, mb, t, down); // adds the routed experts' outputs
    } else {
      PARALLAX_CHECK(false, "this backend has no routed-expert ops");
    }
  }
  down = tp_reduce(o, tp, std::move(down));
  if (m.config.bias)
    o.add_bias(down, o.param(b, "mlp.b2"));
  T y = o.make(x.rows(), x.cols());
  o.add(t[kX1], down, y);

  if (keep == KeepMode::input_only) {
    cache.t.clear();
    cache.t.resize(kNumSlots);
    cache.t[kX] = o.copy(x);
  } else {
    t[kX] = o.copy(x);
    cache.t = std::move(t);
  }
  return y;
}

// Full recomputation: when the cache holds only the input, reruns the forward (tensor-parallel
// collectives included) so it holds what the backward reads; otherwise nothing.
template <BlockOps O, class Cache>
void layer_recompute(const O& o, const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                     const typename O::Batch& mb, Cache& cache) {
  PARALLAX_CHECK(cache.t.size() >= kNumSlots && !cache.t[kX].empty(),
                 "layer backward without its forward");
  if (!cache.t[kX1].empty())
    return;
  Cache again;
  const typename O::Tensor x = std::move(cache.t[kX]);
  layer_forward(o, m, b, tp, mb, x, KeepMode::all, again);
  cache = std::move(again);
}

// dy → dx; accumulates the layer's parameter gradients and empties the cache.
template <BlockOps O, class Cache>
typename O::Tensor layer_backward(const O& o, const ExecModel& m, const BlockBuffers& b,
                                  const TpContext& tp, const typename O::Batch& mb,
                                  const typename O::Tensor& dy, Cache& cache) {
  using T = typename O::Tensor;
  using Out = typename O::Out;
  layer_recompute(o, m, b, tp, mb, cache);
  std::vector<T>& t = cache.t;
  const typename O::Shape shape = attention_shape<O>(m, tp, o.host(mb));
  const Index n = o.host(mb).batch * o.host(mb).seq;
  const Index h = m.config.hidden_size;

  // MLP sub-layer.
  if (m.config.bias)
    o.bias_grad(dy, o.grad(b, "mlp.b2"));
  T dd_storage;
  const typename O::In dd_full = full_rows(o, tp, dy, dd_storage);
  T dln2_full;
  if (dense_mlp(m, b))
    dense_mlp_backward(o, m, b, t, n, dd_full, dln2_full);
  if (moe_layer(m, b)) {
    if constexpr (RoutedExpertOps<O>) {
      if (!dense_mlp(m, b)) {
        dln2_full = o.make(n, h);
        o.set_zero(dln2_full);
      }
      o.moe_backward(m, b, tp, mb, t, dd_full, dln2_full); // adds the routed part
    } else {
      PARALLAX_CHECK(false, "this backend has no routed-expert ops");
    }
  }
  t[kLn2Full].release();
  const T dln2 = tp_reduce(o, tp, std::move(dln2_full));
  T dx1 = o.copy(dy);
  o.norm_backward(m, b, "ln2", t[kX1], t[kLn2Mean], t[kLn2Rstd], dln2, dx1, true);
  t[kX1].release();

  // Attention sub-layer.
  if (m.config.bias)
    o.bias_grad(dx1, o.grad(b, "attn.bo"));
  T do_storage;
  const typename O::In do_full = full_rows(o, tp, dx1, do_storage);
  T datt = o.make(n, t[kAtt].cols());
  o.linear_grad(t[kAtt], o.param(b, "attn.wo"), do_full, datt, o.grad(b, "attn.wo"), Out{}, false);
  T dq = o.make(n, t[kQ].cols());
  T dk = o.make(t[kK].rows(), t[kK].cols()); // whole sequences when CP all-gathers
  T dv = o.make(t[kV].rows(), t[kV].cols());
  if (cp_ring<O>(tp)) {
    if constexpr (ContextParallelOps<O>)
      o.cp_ring_backward(tp, o.host(mb), ring_shape(shape), t, datt, dq, dk, dv);
  } else {
    o.attention_backward(shape, t, datt, dq, dk, dv);
    dk = cp_scatter_grad(o, tp, o.host(mb), std::move(dk));
    dv = cp_scatter_grad(o, tp, o.host(mb), std::move(dv));
  }
  if (m.rope())
    o.rope(dq, dk, shape.head_dim, mb, m.rope_theta, true);
  T dln1_full = o.make(n, h);
  o.linear_grad(t[kLn1Full], o.param(b, "attn.wq"), dq, dln1_full, o.grad(b, "attn.wq"),
                opt_grad(o, m, b, "attn.bq"), false);
  o.linear_grad(t[kLn1Full], o.param(b, "attn.wk"), dk, dln1_full, o.grad(b, "attn.wk"),
                opt_grad(o, m, b, "attn.bk"), true);
  o.linear_grad(t[kLn1Full], o.param(b, "attn.wv"), dv, dln1_full, o.grad(b, "attn.wv"),
                opt_grad(o, m, b, "attn.bv"), true);
  const T dln1 = tp_reduce(o, tp, std::move(dln1_full));
  o.norm_backward(m, b, "ln1", t[kX], t[kLn1Mean], t[kLn1Rstd], dln1, dx1, true);
  cache.t.clear();
  return dx1;
}

} // namespace parallax::block
