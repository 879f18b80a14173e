// The CUDA backend of TrainerCore (parallax/executor/detail/trainer_core.hpp): device flat
// buffers from the caching allocator, the transformer's forward and backward passes on device
// tensors (the twins of executor/src/model.cpp, same block layouts and tensor-parallel
// collectives), NCCL groups, host-staged pipeline messages.
#include "parallax/executor/cuda/trainer.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/cuda/adamw.hpp"
#include "parallax/executor/cuda/attention_gemm.hpp"
#include "parallax/executor/cuda/check.hpp"
#include "parallax/executor/cuda/device.hpp"
#include "parallax/executor/cuda/device_allocator.hpp"
#include "parallax/executor/cuda/nccl_communicator.hpp"
#include "parallax/executor/cuda/ops.hpp"
#include "parallax/executor/cuda/stream.hpp"
#include "parallax/executor/detail/trainer_core.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

namespace parallax::cuda {
namespace {

using Index = std::int64_t;

// ---- device memory helpers ----

std::span<float> span_of(const DeviceTensor& t) {
  return {static_cast<float*>(t.data()), static_cast<std::size_t>(t.size())};
}

// A device int32 array uploaded on a stream from host memory that outlives the copy.
class DeviceInts {
public:
  DeviceInts() = default;
  DeviceInts(DeviceAllocator& allocator, std::span<const std::int32_t> host, cudaStream_t stream)
      : allocator_(&allocator) {
    data_ = static_cast<std::int32_t*>(allocator.allocate(host.size_bytes()));
    if (!host.empty()) {
      PARALLAX_CUDA_CHECK(
          cudaMemcpyAsync(data_, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, stream));
    }
  }
  ~DeviceInts() {
    if (allocator_ != nullptr)
      allocator_->deallocate(data_);
  }
  DeviceInts(DeviceInts&& o) noexcept
      : allocator_(std::exchange(o.allocator_, nullptr)), data_(std::exchange(o.data_, nullptr)) {}
  DeviceInts& operator=(DeviceInts&& o) noexcept {
    std::swap(allocator_, o.allocator_);
    std::swap(data_, o.data_);
    return *this;
  }
  DeviceInts(const DeviceInts&) = delete;
  DeviceInts& operator=(const DeviceInts&) = delete;
  const std::int32_t* get() const { return data_; }

private:
  DeviceAllocator* allocator_ = nullptr;
  std::int32_t* data_ = nullptr;
};

// Rows grouped by token (TokenGroups) on the host and the device, for the embedding backward.
struct DeviceGroups {
  TokenGroups host;
  DeviceInts order, starts, tokens;
  DeviceGroups() = default;
  DeviceGroups(DeviceAllocator& alloc, std::span<const std::int32_t> row_tokens,
               cudaStream_t stream)
      : host(TokenGroups::of(row_tokens)), order(alloc, host.order, stream),
        starts(alloc, host.starts, stream), tokens(alloc, host.tokens, stream) {}
};

// A micro-batch on the device. The host vectors stay here (their buffers do not move when the
// batch does) until the step ends, so the asynchronous uploads always read live memory.
struct DeviceBatch {
  MicroBatch host;
  std::vector<std::int32_t> full_positions_host; // position of every row before any SP split
  DeviceInts inputs, targets, positions, full_positions;
  DeviceGroups input_groups, position_groups;
};

struct DeviceCache {
  std::vector<DeviceTensor> t;
};

// What the model functions need of the device.
struct Ctx {
  DeviceAllocator& alloc;
  Blas& blas;
  cudaStream_t stream;
  GemmPrecision precision;
  AttentionKernel attention;

  DeviceTensor make(Index rows, Index cols) const { return DeviceTensor(alloc, rows, cols); }
  DeviceTensor copy(const DeviceTensor& x) const {
    DeviceTensor y = make(x.rows(), x.cols());
    if (x.size() > 0) {
      PARALLAX_CUDA_CHECK(cudaMemcpyAsync(y.data(), x.data(),
                                          static_cast<std::size_t>(x.size()) * sizeof(float),
                                          cudaMemcpyDeviceToDevice, stream));
    }
    return y;
  }
  void copy_floats(float* dst, const float* src, Index n) const {
    if (n > 0) {
      PARALLAX_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(float),
                                          cudaMemcpyDeviceToDevice, stream));
    }
  }
  void sync() const { PARALLAX_CUDA_CHECK(cudaStreamSynchronize(stream)); }

  // x as a GEMM input of this precision: itself (fp32, tf32, or already bf16), or a bf16 copy
  // (mixed precision: fp32 master weights and activations, bf16 GEMM inputs, fp32 results).
  struct Operand {
    DeviceTensor copy; // the bf16 copy when one was made
    DeviceView view;
  };
  Operand operand(DeviceView x) const {
    const DType want = gemm_input_dtype(precision);
    if (x.dtype == want || !x)
      return {DeviceTensor(), x};
    Operand o{DeviceTensor(alloc, x.rows, x.cols, want), {}};
    convert_f32_to_bf16(x, o.copy, stream);
    o.view = o.copy.view();
    return o;
  }
  // A GEMM-only activation kept for the backward: replaced by its bf16 copy under bf16.
  DeviceTensor gemm_input(DeviceTensor x) const {
    if (x.dtype() == gemm_input_dtype(precision))
      return x;
    Operand o = operand(x);
    return std::move(o.copy);
  }

  // y = x·W (+ b) and its backward with every GEMM input converted as needed.
  void linear(DeviceView x, DeviceView w, DeviceView b, DeviceView y) const {
    const Operand xo = operand(x), wo = operand(w);
    linear_forward(blas, xo.view, wo.view, b, y, precision, stream);
  }
  // The bias gradient sums the fp32 dy (as the CPU op does), not its bf16 copy.
  void linear_grad(DeviceView x, DeviceView w, DeviceView dy, DeviceView dx, DeviceView dw,
                   DeviceView db, bool accumulate_dx = false) const {
    if (db)
      accumulate_column_sums(dy, db, stream);
    const Operand xo = operand(x), wo = operand(w), dyo = operand(dy);
    linear_backward(blas, xo.view, wo.view, dyo.view, dx, dw, {}, precision, stream, accumulate_dx);
  }
  // c = alpha·op(a)·op(b) + beta·c.
  void gemm(DeviceView a, bool ta, DeviceView b, bool tb, DeviceView out, float beta) const {
    const Operand ao = operand(a), bo = operand(b);
    matmul(blas, precision, ao.view, ta, bo.view, tb, out, 1.0f, beta, {}, stream);
  }
};

DeviceView param(const BlockBuffers& b, std::string_view suffix) {
  const ParamInfo& i = b.layout->param(suffix);
  return {const_cast<float*>(b.params) + i.offset, i.local_rows, i.local_cols, DType::f32};
}
DeviceView grad(const BlockBuffers& b, std::string_view suffix) {
  const ParamInfo& i = b.layout->param(suffix);
  return {b.grads + i.offset, i.local_rows, i.local_cols, DType::f32};
}
DeviceView opt_param(const ExecModel& m, const BlockBuffers& b, std::string_view s) {
  return m.config.bias ? param(b, s) : DeviceView{};
}
DeviceView opt_grad(const ExecModel& m, const BlockBuffers& b, std::string_view s) {
  return m.config.bias ? grad(b, s) : DeviceView{};
}

// ---- tensor-parallel regions (Megatron's conjugate pair; see model.cpp) ----

void report(const Ctx& c, const TpContext& tp, const char* what, double start,
            const DeviceTensor& t) {
  if (tp.on_comm) {
    c.sync();
    tp.on_comm(what, start, steady_seconds(), static_cast<double>(t.size()) * sizeof(float));
  }
}

double start_time(const Ctx& c, const TpContext& tp) {
  if (tp.on_comm)
    c.sync();
  return steady_seconds();
}

// x over the full sequence: x itself, or (sequence parallelism) its all-gather into `storage`.
// The backward's gradients are gathered this way, without copying them first.
DeviceView full_rows(const Ctx& c, const TpContext& tp, const DeviceTensor& x,
                     DeviceTensor& storage) {
  if (tp.size() == 1 || !tp.sequence_parallel)
    return x.view();
  const double start = start_time(c, tp);
  storage = c.make(x.rows() * tp.size(), x.cols());
  tp.comm->all_gather(span_of(x), span_of(storage));
  report(c, tp, "tp all-gather", start, storage);
  return storage.view();
}

DeviceTensor tp_gather(const Ctx& c, const TpContext& tp, DeviceTensor x) {
  DeviceTensor full;
  full_rows(c, tp, x, full);
  return full.empty() ? std::move(x) : std::move(full);
}

DeviceTensor tp_reduce(const Ctx& c, const TpContext& tp, DeviceTensor x) {
  if (tp.size() == 1)
    return x;
  const double start = start_time(c, tp);
  if (!tp.sequence_parallel) {
    tp.comm->all_reduce_sum(span_of(x));
    report(c, tp, "tp all-reduce", start, x);
    return x;
  }
  PARALLAX_CHECK(x.rows() % tp.size() == 0, "sequence parallel needs rows divisible by tp");
  DeviceTensor part = c.make(x.rows() / tp.size(), x.cols());
  tp.comm->reduce_scatter_sum(span_of(x), span_of(part));
  report(c, tp, "tp reduce-scatter", start, x);
  return part;
}

// ---- norms ----

struct NormOut {
  DeviceTensor y, mean, rstd;
};

NormOut norm_forward(const Ctx& c, const ExecModel& m, const BlockBuffers& b,
                     const std::string& prefix, const DeviceTensor& x) {
  NormOut o{c.make(x.rows(), x.cols()), DeviceTensor(), c.make(x.rows(), 1)};
  if (m.rmsnorm()) {
    rmsnorm_forward(x, {}, {}, param(b, prefix + ".gamma"), o.y, o.rstd, m.norm_eps, c.stream);
  } else {
    o.mean = c.make(x.rows(), 1);
    layernorm_forward(x, {}, {}, param(b, prefix + ".gamma"), param(b, prefix + ".beta"), o.y,
                      o.mean, o.rstd, m.norm_eps, c.stream);
  }
  return o;
}

// dx = ∂loss/∂u, plus dx's previous value when `accumulate` (the residual stream's gradient).
void norm_backward(const Ctx& c, const ExecModel& m, const BlockBuffers& b,
                   const std::string& prefix, const DeviceTensor& u, const DeviceTensor& mean,
                   const DeviceTensor& rstd, const DeviceTensor& dy, DeviceTensor& dx,
                   bool accumulate) {
  if (!accumulate)
    dx = c.make(u.rows(), u.cols());
  const DeviceView residual = accumulate ? dx.view() : DeviceView{};
  if (m.rmsnorm()) {
    rmsnorm_backward(u, param(b, prefix + ".gamma"), rstd, dy, residual, dx,
                     grad(b, prefix + ".gamma"), c.stream);
  } else {
    layernorm_backward(u, param(b, prefix + ".gamma"), mean, rstd, dy, residual, dx,
                       grad(b, prefix + ".gamma"), grad(b, prefix + ".beta"), c.stream);
  }
}

// ---- transformer layer ----

// Cache slots of a transformer layer. The GEMM attention keeps the probabilities (selective
// recomputation drops them), the flash attention only their log-sum-exp.
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

AttentionShape attention_shape(const ExecModel& m, const TpContext& tp, const MicroBatch& mb) {
  return {.batch = mb.batch,
          .seq = mb.seq,
          .heads = m.config.num_attention_heads / tp.size(),
          .kv_heads = m.config.num_kv_heads / tp.size(),
          .head_dim = static_cast<int>(m.config.head_dim())};
}

DeviceTensor layer_forward(const Ctx& c, const ExecModel& m, const BlockBuffers& b,
                           const TpContext& tp, const DeviceBatch& mb, const DeviceTensor& x,
                           KeepMode keep, DeviceCache& cache) {
  const Index n = mb.host.batch * mb.host.seq;
  const AttentionShape shape = attention_shape(m, tp, mb.host);
  const Index d = shape.head_dim;
  const Index h = m.config.hidden_size;
  std::vector<DeviceTensor> t(kNumSlots);

  // Attention sub-layer.
  NormOut ln1 = norm_forward(c, m, b, "ln1", x);
  t[kLn1Mean] = std::move(ln1.mean);
  t[kLn1Rstd] = std::move(ln1.rstd);
  t[kLn1Full] = c.gemm_input(tp_gather(c, tp, std::move(ln1.y)));
  t[kQ] = c.make(n, shape.heads * d);
  t[kK] = c.make(n, shape.kv_heads * d);
  t[kV] = c.make(n, shape.kv_heads * d);
  c.linear(t[kLn1Full], param(b, "attn.wq"), opt_param(m, b, "attn.bq"), t[kQ]);
  c.linear(t[kLn1Full], param(b, "attn.wk"), opt_param(m, b, "attn.bk"), t[kK]);
  c.linear(t[kLn1Full], param(b, "attn.wv"), opt_param(m, b, "attn.bv"), t[kV]);
  if (m.rope()) {
    rope(t[kQ], static_cast<int>(d), mb.full_positions.get(), m.rope_theta, 1.0f, c.stream);
    rope(t[kK], static_cast<int>(d), mb.full_positions.get(), m.rope_theta, 1.0f, c.stream);
  }
  t[kAtt] = c.make(n, shape.heads * d);
  if (c.attention == AttentionKernel::gemm) {
    t[kProbs] = c.make(shape.batch * shape.heads, shape.seq * shape.seq);
    attention_gemm_forward(c.blas, c.precision, c.alloc, t[kQ], t[kK], t[kV], shape, t[kProbs],
                           t[kAtt], c.stream);
    if (keep != KeepMode::all)
      t[kProbs].release();
  } else {
    t[kLse] = c.make(shape.batch * shape.heads, shape.seq);
    attention_forward(t[kQ], t[kK], t[kV], shape, t[kAtt], t[kLse], c.stream);
  }
  DeviceTensor o = c.make(n, h);
  c.linear(t[kAtt], param(b, "attn.wo"), {}, o);
  o = tp_reduce(c, tp, std::move(o));
  if (m.config.bias)
    add_bias(o, param(b, "attn.bo"), c.stream);
  t[kX1] = c.make(x.rows(), x.cols());
  add(x, o, t[kX1], c.stream);
  o.release();

  // MLP sub-layer.
  NormOut ln2 = norm_forward(c, m, b, "ln2", t[kX1]);
  t[kLn2Mean] = std::move(ln2.mean);
  t[kLn2Rstd] = std::move(ln2.rstd);
  t[kLn2Full] = c.gemm_input(tp_gather(c, tp, std::move(ln2.y)));
  const Index f = m.config.ffn_hidden_size / tp.size();
  t[kU] = c.make(n, f);
  t[kAct] = c.make(n, f);
  if (m.llama()) {
    t[kUp] = c.make(n, f);
    c.linear(t[kLn2Full], param(b, "mlp.wg"), {}, t[kU]);
    c.linear(t[kLn2Full], param(b, "mlp.wu"), {}, t[kUp]);
    swiglu_forward(t[kU], t[kUp], t[kAct], c.stream);
  } else {
    c.linear(t[kLn2Full], param(b, "mlp.w1"), opt_param(m, b, "mlp.b1"), t[kU]);
    gelu_forward(t[kU], t[kAct], c.stream);
  }
  DeviceTensor dn = c.make(n, h);
  t[kAct] = c.gemm_input(std::move(t[kAct])); // only the w2 GEMM and its backward read it
  c.linear(t[kAct], param(b, "mlp.w2"), {}, dn);
  dn = tp_reduce(c, tp, std::move(dn));
  if (m.config.bias)
    add_bias(dn, param(b, "mlp.b2"), c.stream);
  DeviceTensor y = c.make(x.rows(), x.cols());
  add(t[kX1], dn, y, c.stream);

  if (keep == KeepMode::input_only) {
    cache.t.clear();
    cache.t.resize(kNumSlots);
    cache.t[kX] = c.copy(x);
  } else {
    t[kX] = c.copy(x);
    cache.t = std::move(t);
  }
  return y;
}

// Full recomputation: rerun the forward from the saved input (TP collectives included) when
// the cache holds only that.
void layer_recompute(const Ctx& c, const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                     const DeviceBatch& mb, DeviceCache& cache) {
  std::vector<DeviceTensor>& t = cache.t;
  PARALLAX_CHECK(t.size() == kNumSlots && !t[kX].empty(), "layer backward without its forward");
  if (!t[kX1].empty())
    return;
  DeviceCache again;
  const DeviceTensor x = std::move(t[kX]);
  layer_forward(c, m, b, tp, mb, x, KeepMode::all, again);
  cache = std::move(again);
}

DeviceTensor layer_backward(const Ctx& c, const ExecModel& m, const BlockBuffers& b,
                            const TpContext& tp, const DeviceBatch& mb, const DeviceTensor& dy,
                            DeviceCache& cache) {
  layer_recompute(c, m, b, tp, mb, cache);
  std::vector<DeviceTensor>& t = cache.t;
  const AttentionShape shape = attention_shape(m, tp, mb.host);
  const Index n = mb.host.batch * mb.host.seq;
  const Index h = m.config.hidden_size;

  // MLP sub-layer.
  if (m.config.bias)
    accumulate_column_sums(dy, grad(b, "mlp.b2"), c.stream);
  DeviceTensor dd_storage;
  const DeviceView dd_full = full_rows(c, tp, dy, dd_storage);
  DeviceTensor dact = c.make(n, t[kAct].cols());
  c.linear_grad(t[kAct], param(b, "mlp.w2"), dd_full, dact, grad(b, "mlp.w2"), {});
  t[kAct].release();
  DeviceTensor dln2_full = c.make(n, h);
  if (m.llama()) {
    DeviceTensor dgate = c.make(n, t[kU].cols());
    DeviceTensor dup = c.make(n, t[kU].cols());
    swiglu_backward(t[kU], t[kUp], dact, dgate, dup, c.stream);
    c.linear_grad(t[kLn2Full], param(b, "mlp.wg"), dgate, dln2_full, grad(b, "mlp.wg"), {});
    c.linear_grad(t[kLn2Full], param(b, "mlp.wu"), dup, dln2_full, grad(b, "mlp.wu"), {}, true);
  } else {
    DeviceTensor du = c.make(n, t[kU].cols());
    gelu_backward(t[kU], dact, du, c.stream);
    c.linear_grad(t[kLn2Full], param(b, "mlp.w1"), du, dln2_full, grad(b, "mlp.w1"),
                  opt_grad(m, b, "mlp.b1"));
  }
  t[kU].release();
  t[kUp].release();
  t[kLn2Full].release();
  const DeviceTensor dln2 = tp_reduce(c, tp, std::move(dln2_full));
  DeviceTensor dx1 = c.copy(dy);
  norm_backward(c, m, b, "ln2", t[kX1], t[kLn2Mean], t[kLn2Rstd], dln2, dx1, true);
  t[kX1].release();

  // Attention sub-layer.
  if (m.config.bias)
    accumulate_column_sums(dx1, grad(b, "attn.bo"), c.stream);
  DeviceTensor do_storage;
  const DeviceView do_full = full_rows(c, tp, dx1, do_storage);
  DeviceTensor datt = c.make(n, t[kAtt].cols());
  c.linear_grad(t[kAtt], param(b, "attn.wo"), do_full, datt, grad(b, "attn.wo"), {});
  DeviceTensor dq = c.make(n, t[kQ].cols());
  DeviceTensor dk = c.make(n, t[kK].cols());
  DeviceTensor dv = c.make(n, t[kV].cols());
  if (c.attention == AttentionKernel::gemm) {
    t[kAtt].release();
    if (t[kProbs].empty()) {
      // Selective recomputation: the probabilities come back from q and k.
      t[kProbs] = c.make(shape.batch * shape.heads, shape.seq * shape.seq);
      attention_gemm_probs(c.blas, c.precision, c.alloc, t[kQ], t[kK], shape, t[kProbs], c.stream);
    }
    attention_gemm_backward(c.blas, c.precision, c.alloc, t[kQ], t[kK], t[kV], t[kProbs], datt,
                            shape, dq, dk, dv, c.stream);
    t[kProbs].release();
  } else {
    DeviceTensor delta = c.make(t[kLse].rows(), t[kLse].cols());
    attention_backward(t[kQ], t[kK], t[kV], t[kAtt], datt, t[kLse], shape, delta, dq, dk, dv,
                       c.stream);
    t[kAtt].release();
    t[kLse].release();
  }
  if (m.rope()) {
    rope(dq, shape.head_dim, mb.full_positions.get(), m.rope_theta, -1.0f, c.stream);
    rope(dk, shape.head_dim, mb.full_positions.get(), m.rope_theta, -1.0f, c.stream);
  }
  DeviceTensor dln1_full = c.make(n, h);
  c.linear_grad(t[kLn1Full], param(b, "attn.wq"), dq, dln1_full, grad(b, "attn.wq"),
                opt_grad(m, b, "attn.bq"));
  c.linear_grad(t[kLn1Full], param(b, "attn.wk"), dk, dln1_full, grad(b, "attn.wk"),
                opt_grad(m, b, "attn.bk"), true);
  c.linear_grad(t[kLn1Full], param(b, "attn.wv"), dv, dln1_full, grad(b, "attn.wv"),
                opt_grad(m, b, "attn.bv"), true);
  const DeviceTensor dln1 = tp_reduce(c, tp, std::move(dln1_full));
  norm_backward(c, m, b, "ln1", t[kX], t[kLn1Mean], t[kLn1Rstd], dln1, dx1, true);
  cache.t.clear();
  return dx1;
}

// ---- embedding and head ----

DeviceTensor embed_forward(const Ctx& c, const ExecModel& m, const BlockBuffers& emb,
                           const BlockBuffers* positions, const TpContext& tp,
                           const DeviceBatch& mb) {
  DeviceTensor e = c.make(mb.host.batch * mb.host.seq, m.config.hidden_size);
  cuda::embedding_forward(mb.inputs.get(), param(emb, "wte"), emb.layout->param("wte").row0, e,
                          false, c.stream);
  e = tp_reduce(c, tp, std::move(e));
  if (positions != nullptr)
    cuda::embedding_forward(mb.positions.get(), param(*positions, "wpe"), 0, e, true, c.stream);
  return e;
}

void embed_backward(const Ctx& c, const BlockBuffers& emb, const BlockBuffers* positions,
                    const TpContext& tp, const DeviceBatch& mb, const DeviceTensor& dx) {
  if (positions != nullptr) {
    const DeviceGroups& g = mb.position_groups;
    cuda::embedding_backward(g.order.get(), g.starts.get(), g.tokens.get(), g.host.groups(), dx, 0,
                             grad(*positions, "wpe"), c.stream);
  }
  DeviceTensor dfull_storage;
  const DeviceView dfull = full_rows(c, tp, dx, dfull_storage);
  const DeviceGroups& g = mb.input_groups;
  cuda::embedding_backward(g.order.get(), g.starts.get(), g.tokens.get(), g.host.groups(), dfull,
                           emb.layout->param("wte").row0, grad(emb, "wte"), c.stream);
}

enum HeadSlot : std::size_t { kHX, kHMean, kHRstd, kHFull, kHLogits, kHMax, kHSum, kHNumSlots };

std::int64_t vocab_begin(const ExecModel& m, const BlockBuffers& head) {
  return m.config.tied_embeddings ? head.layout->param("wte").row0 : head.layout->param("w").col0;
}

// A padded vocabulary's extra logits (the last columns of each row) take no part in the
// softmax: every byte 0xF1 makes an fp32 (or bf16) value near −2.4e30, whose exp is 0.
void mask_vocab_padding(const Ctx& c, const ExecModel& m, const BlockBuffers& head,
                        DeviceTensor& logits) {
  const ParamInfo& vocab = head.layout->param(m.config.tied_embeddings ? "wte" : "w");
  const std::int64_t valid = m.config.tied_embeddings ? vocab.valid_rows() : vocab.valid_cols();
  const std::int64_t cols = logits.cols();
  if (valid >= cols)
    return;
  const auto eb = static_cast<std::size_t>(dtype_bytes(logits.dtype()));
  PARALLAX_CUDA_CHECK(cudaMemset2DAsync(static_cast<char*>(logits.data()) + valid * eb,
                                        static_cast<std::size_t>(cols) * eb, 0xF1,
                                        static_cast<std::size_t>(cols - valid) * eb,
                                        static_cast<std::size_t>(logits.rows()), c.stream));
}

double head_forward(const Ctx& c, const ExecModel& m, const BlockBuffers& norm,
                    const BlockBuffers& head, const TpContext& tp, const DeviceBatch& mb,
                    const DeviceTensor& x, DeviceCache& cache) {
  std::vector<DeviceTensor> t(kHNumSlots);
  NormOut o = norm_forward(c, m, norm, "norm", x);
  t[kHMean] = std::move(o.mean);
  t[kHRstd] = std::move(o.rstd);
  t[kHFull] = c.gemm_input(tp_gather(c, tp, std::move(o.y)));
  const Index n = t[kHFull].rows();
  const bool tied = m.config.tied_embeddings;
  const DeviceView w = param(head, tied ? "wte" : "w");
  t[kHLogits] = c.make(n, tied ? w.rows : w.cols);
  if (tied) {
    c.gemm(t[kHFull], false, w, true, t[kHLogits], 0.0f);
  } else {
    c.linear(t[kHFull], w, {}, t[kHLogits]);
  }
  mask_vocab_padding(c, m, head, t[kHLogits]);
  t[kHMax] = c.make(n, 1);
  t[kHSum] = c.make(n, 1);
  DeviceTensor target = c.make(n, 1);
  row_max(t[kHLogits], t[kHMax], c.stream);
  if (tp.size() > 1)
    tp.comm->all_reduce_max(span_of(t[kHMax]));
  row_sum_exp(t[kHLogits], t[kHMax], t[kHSum], c.stream);
  target_logits(t[kHLogits], mb.targets.get(), vocab_begin(m, head), target, c.stream);
  if (tp.size() > 1) {
    // One all-reduce for both sums.
    DeviceTensor both = c.make(2, n);
    c.copy_floats(static_cast<float*>(both.data()), static_cast<float*>(t[kHSum].data()), n);
    c.copy_floats(static_cast<float*>(both.data()) + n, static_cast<float*>(target.data()), n);
    tp.comm->all_reduce_sum(span_of(both));
    c.copy_floats(static_cast<float*>(t[kHSum].data()), static_cast<float*>(both.data()), n);
    c.copy_floats(static_cast<float*>(target.data()), static_cast<float*>(both.data()) + n, n);
  }
  // The loss in double on the host, term for term as the CPU head computes it.
  c.sync();
  const std::vector<float> sum = t[kHSum].to_host();
  const std::vector<float> max = t[kHMax].to_host();
  const std::vector<float> tgt = target.to_host();
  double loss = 0;
  for (std::size_t r = 0; r < sum.size(); ++r)
    loss += std::log(static_cast<double>(sum[r])) + max[r] - tgt[r];
  t[kHX] = c.copy(x);
  cache.t = std::move(t);
  return loss;
}

DeviceTensor head_backward(const Ctx& c, const ExecModel& m, const BlockBuffers& norm,
                           const BlockBuffers& head, const TpContext& tp, const DeviceBatch& mb,
                           float loss_scale, DeviceCache& cache) {
  std::vector<DeviceTensor>& t = cache.t;
  PARALLAX_CHECK(t.size() == kHNumSlots, "head backward without its forward");
  const bool tied = m.config.tied_embeddings;
  // The logits' gradient overwrites the logits (the largest activation of the model).
  DeviceTensor& dlogits = t[kHLogits];
  cross_entropy_backward(t[kHLogits], t[kHMax], t[kHSum], mb.targets.get(), vocab_begin(m, head),
                         loss_scale, dlogits, c.stream);
  DeviceTensor dfull = c.make(t[kHFull].rows(), t[kHFull].cols());
  if (tied) {
    const DeviceView w = param(head, "wte");
    const Ctx::Operand dl = c.operand(dlogits); // one bf16 copy for both GEMMs
    c.gemm(dl.view, false, w, false, dfull, 0.0f);
    c.gemm(dl.view, true, t[kHFull], false, grad(head, "wte"), 1.0f);
  } else {
    c.linear_grad(t[kHFull], param(head, "w"), dlogits, dfull, grad(head, "w"), {});
  }
  dlogits.release();
  const DeviceTensor dnorm = tp_reduce(c, tp, std::move(dfull));
  DeviceTensor dx;
  norm_backward(c, m, norm, "norm", t[kHX], t[kHMean], t[kHRstd], dnorm, dx, false);
  cache.t.clear();
  return dx;
}

// ---- the backend ----

// Device state shared by the backend's copies (TrainerCore keeps one; it moves in).
struct DeviceState {
  explicit DeviceState(const DeviceTrainOptions& o)
      : precision(o.precision), attention(o.attention) {
    blas = std::make_unique<Blas>(alloc);
    norm_total = DeviceTensor(alloc, 1, 2);                        // one double
    norm_partials = DeviceTensor(alloc, 1, 2 * kSumSquaresBlocks); // kSumSquaresBlocks doubles
  }
  ~DeviceState() {
    // Nothing may still run on the stream when the buffers go back to the allocator.
    cudaStreamSynchronize(stream);
  }
  DeviceAllocator alloc;
  Stream stream;
  std::unique_ptr<Blas> blas;
  GemmPrecision precision;
  AttentionKernel attention;
  DeviceTensor norm_total;
  DeviceTensor norm_partials;
  // The recorded step's marks: events on the compute stream, timed against `reference`,
  // recorded when the step started (host steady time `host_t0`, the stream idle).
  Event reference;
  std::vector<Event> marks;
  std::size_t marks_used = 0;
  double host_t0 = 0;
  // Pipeline sends in flight: their host copies stay alive until the sends complete.
  std::vector<std::unique_ptr<std::vector<float>>> stash;
  std::vector<CommRequest> sends;
};

struct CudaBackend {
  using Flat = DeviceTensor;
  using Act = DeviceTensor;
  using Cache = DeviceCache;
  using Batch = DeviceBatch;

  std::unique_ptr<DeviceState> s;

  Ctx ctx() const { return {s->alloc, *s->blas, s->stream, s->precision, s->attention}; }

  static float* data(const Flat& f) { return static_cast<float*>(f.data()); }
  static std::int64_t size(const Flat& f) { return f.size(); }
  static std::int64_t act_size(const Act& x) { return x.size(); }

  Flat zeros(std::int64_t n) {
    DeviceTensor t(s->alloc, 1, n);
    t.zero(s->stream);
    return t;
  }
  Flat upload(std::span<const float> host) {
    s->stream.synchronize(); // the block may have been freed under work still on the stream
    DeviceTensor t(s->alloc, 1, static_cast<Index>(host.size()));
    t.copy_from_host(host);
    return t;
  }
  void download(const float* src, std::int64_t n, float* host) {
    s->stream.synchronize();
    if (n > 0) {
      PARALLAX_CUDA_CHECK(cudaMemcpy(host, src, static_cast<std::size_t>(n) * sizeof(float),
                                     cudaMemcpyDeviceToHost));
    }
  }
  void set_zero(Flat& f) { f.zero(s->stream); }
  void add(float* dst, const float* src, std::int64_t n) { add_inplace(dst, src, n, s->stream); }
  void copy(float* dst, const float* src, std::int64_t n) { ctx().copy_floats(dst, src, n); }
  double sum_squares(const detail::Ranges& ranges) {
    s->norm_total.zero(s->stream);
    auto* total = static_cast<double*>(s->norm_total.data());
    auto* partials = static_cast<double*>(s->norm_partials.data());
    for (auto [g, n] : ranges)
      accumulate_sum_squares(g, n, total, partials, s->stream);
    double host = 0;
    s->stream.synchronize();
    PARALLAX_CUDA_CHECK(cudaMemcpy(&host, total, sizeof(double), cudaMemcpyDeviceToHost));
    return host;
  }
  void adamw(float* p, const float* g, float* m1, float* m2, std::int64_t n,
             const ops::AdamwHyper& h) {
    const auto view = [n](const float* x) {
      return DeviceView{const_cast<float*>(x), 1, n, DType::f32};
    };
    adamw_update(view(p), view(g), view(m1), view(m2), {}, h, s->stream);
  }

  std::unique_ptr<Communicator> group(const std::vector<int>& ranks, const std::string& name,
                                      std::chrono::duration<double> timeout) {
    std::unique_ptr<NcclCommunicator> comm = nccl_group(ranks, name, timeout);
    comm->set_producer_stream(s->stream);
    return comm;
  }
  Act recv_act(Communicator& world, int src, int tag, Index rows, Index cols) {
    std::vector<float> host(static_cast<std::size_t>(rows * cols));
    world.recv(host, src, tag);
    s->stream.synchronize();
    DeviceTensor x(s->alloc, rows, cols);
    x.copy_from_host(host);
    return x;
  }
  void send_act(Communicator& world, Act x, int dst, int tag) {
    s->stream.synchronize();
    s->stash.push_back(std::make_unique<std::vector<float>>(x.to_host()));
    s->sends.push_back(world.isend(*s->stash.back(), dst, tag));
  }
  void finish_sends() {
    for (CommRequest& r : s->sends)
      r.wait();
    s->sends.clear();
    s->stash.clear();
  }

  Batch batch(MicroBatch mb) {
    DeviceBatch b;
    b.host = std::move(mb);
    const Index n = b.host.batch * b.host.seq;
    b.full_positions_host.resize(static_cast<std::size_t>(n));
    for (Index r = 0; r < n; ++r)
      b.full_positions_host[static_cast<std::size_t>(r)] =
          static_cast<std::int32_t>(r % b.host.seq);
    b.inputs = DeviceInts(s->alloc, b.host.inputs, s->stream);
    b.targets = DeviceInts(s->alloc, b.host.targets, s->stream);
    b.positions = DeviceInts(s->alloc, b.host.positions, s->stream);
    b.full_positions = DeviceInts(s->alloc, b.full_positions_host, s->stream);
    b.input_groups = DeviceGroups(s->alloc, b.host.inputs, s->stream);
    b.position_groups = DeviceGroups(s->alloc, b.host.positions, s->stream);
    return b;
  }
  Act embedding_forward(const ExecModel& m, const BlockBuffers& emb, const BlockBuffers* pos,
                        const TpContext& tp, const Batch& mb) {
    return embed_forward(ctx(), m, emb, pos, tp, mb);
  }
  void embedding_backward(const ExecModel& /*m*/, const BlockBuffers& emb, const BlockBuffers* pos,
                          const TpContext& tp, const Batch& mb, const Act& dx) {
    embed_backward(ctx(), emb, pos, tp, mb, dx);
  }
  Act layer_forward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp, const Batch& mb,
                    const Act& x, KeepMode keep, Cache& cache) {
    return cuda::layer_forward(ctx(), m, b, tp, mb, x, keep, cache);
  }
  void layer_recompute(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                       const Batch& mb, Cache& cache) {
    cuda::layer_recompute(ctx(), m, b, tp, mb, cache);
  }
  Act layer_backward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                     const Batch& mb, const Act& dy, Cache& cache) {
    return cuda::layer_backward(ctx(), m, b, tp, mb, dy, cache);
  }
  double head_forward(const ExecModel& m, const BlockBuffers& norm, const BlockBuffers& head,
                      const TpContext& tp, const Batch& mb, const Act& x, Cache& cache) {
    return cuda::head_forward(ctx(), m, norm, head, tp, mb, x, cache);
  }
  Act head_backward(const ExecModel& m, const BlockBuffers& norm, const BlockBuffers& head,
                    const TpContext& tp, const Batch& mb, float loss_scale, Cache& cache) {
    return cuda::head_backward(ctx(), m, norm, head, tp, mb, loss_scale, cache);
  }

  using Mark = std::int64_t; // index into DeviceState::marks

  void synchronize() { s->stream.synchronize(); }
  void begin_recording(double t0) {
    s->marks_used = 0;
    s->reference.record(s->stream);
    s->host_t0 = t0;
  }
  Mark mark() {
    if (s->marks_used == s->marks.size())
      s->marks.emplace_back();
    s->marks[s->marks_used].record(s->stream);
    return static_cast<Mark>(s->marks_used++);
  }
  double seconds(Mark m) {
    return s->host_t0 +
           1e-3 * Event::elapsed_ms(s->reference, s->marks[static_cast<std::size_t>(m)]);
  }
  void reset_peak() { s->alloc.reset_peak(); }
  std::int64_t peak_bytes() { return s->alloc.peak_bytes_in_use(); }
};

} // namespace

double attention_probability_bytes(const ExecModel& model, const Plan& plan, int rank) {
  const ModelConfig& c = model.config;
  const double per_layer = 4.0 * static_cast<double>(plan.micro_batch_size) *
                           static_cast<double>(c.num_attention_heads / plan.tp) *
                           static_cast<double>(c.seq_length) * static_cast<double>(c.seq_length);
  if (plan.recompute != Recompute::none)
    return 3.0 * per_layer;
  const RankCoords me = rank_coords(plan, rank);
  std::int64_t layers = 0;
  for (int lc = 0; lc < plan.virtual_stages; ++lc) {
    const std::size_t chunk = static_cast<std::size_t>(lc * plan.pp + me.pp);
    if (chunk < plan.stages.size())
      layers += plan.stages[chunk].second - plan.stages[chunk].first;
  }
  // GPipe holds every micro-batch's activations before the first backward; 1F1B at most the
  // pipeline depth (interleaved: the depth times the chunks).
  const std::int64_t m = plan.num_microbatches();
  const std::int64_t in_flight =
      plan.schedule == Schedule::gpipe
          ? m
          : std::min<std::int64_t>(m, std::int64_t{plan.pp} * plan.virtual_stages);
  return per_layer * static_cast<double>(layers) * static_cast<double>(in_flight);
}

AttentionKernel choose_attention(AttentionKernel asked, const ExecModel& model, const Plan& plan,
                                 int rank, double device_bytes) {
  if (asked != AttentionKernel::automatic)
    return asked;
  return attention_probability_bytes(model, plan, rank) <= 0.25 * device_bytes
             ? AttentionKernel::gemm
             : AttentionKernel::flash;
}

std::unique_ptr<Trainer> make_trainer(const ExecModel& model, const Plan& plan,
                                      const TrainOptions& options, const std::string& plan_source,
                                      const DeviceTrainOptions& device) {
  if (!gpu_available()) {
    throw std::runtime_error("the CUDA trainer needs a CUDA device, and this process sees none");
  }
  bind_local_device();
  DeviceTrainOptions resolved = device;
  resolved.attention = choose_attention(device.attention, model, plan, MpiRuntime::world_rank(),
                                        device_memory_bytes());
  CudaBackend backend{std::make_unique<DeviceState>(resolved)};
  return std::make_unique<Trainer>(std::make_unique<detail::TrainerCore<CudaBackend>>(
      std::move(backend), model, plan, options, plan_source));
}

} // namespace parallax::cuda
