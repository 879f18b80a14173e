// The CUDA backend of TrainerCore (parallax/executor/detail/trainer_core.hpp): device flat
// buffers from the caching allocator, the transformer layer through the device op set
// (block_ops.hpp, the same template as the CPU's), the embedding and the vocabulary-parallel
// head on device tensors, NCCL groups, host-staged pipeline messages.
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

#include "block_ops.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

namespace parallax::cuda {
namespace {

// ---- embedding and head ----

DeviceTensor embed_forward(const Ctx& c, const ExecModel& m, const BlockBuffers& emb,
                           const BlockBuffers* positions, const TpContext& tp,
                           const DeviceBatch& mb) {
  DeviceTensor e = c.make(mb.host.batch * mb.host.seq, m.config.hidden_size);
  cuda::embedding_forward(mb.inputs.get(), c.param(emb, "wte"), emb.layout->param("wte").row0, e,
                          false, c.stream);
  e = block::tp_reduce(c, tp, std::move(e));
  if (positions != nullptr)
    cuda::embedding_forward(mb.positions.get(), c.param(*positions, "wpe"), 0, e, true, c.stream);
  return e;
}

void embed_backward(const Ctx& c, const BlockBuffers& emb, const BlockBuffers* positions,
                    const TpContext& tp, const DeviceBatch& mb, const DeviceTensor& dx) {
  if (positions != nullptr) {
    const DeviceGroups& g = mb.position_groups;
    cuda::embedding_backward(g.order.get(), g.starts.get(), g.tokens.get(), g.host.groups(), dx, 0,
                             c.grad(*positions, "wpe"), c.stream);
  }
  DeviceTensor dfull_storage;
  const DeviceView dfull = block::full_rows(c, tp, dx, dfull_storage);
  const DeviceGroups& g = mb.input_groups;
  cuda::embedding_backward(g.order.get(), g.starts.get(), g.tokens.get(), g.host.groups(), dfull,
                           emb.layout->param("wte").row0, c.grad(emb, "wte"), c.stream);
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
  block::NormOut<DeviceTensor> o = c.norm_forward(m, norm, "norm", x);
  t[kHMean] = std::move(o.mean);
  t[kHRstd] = std::move(o.rstd);
  t[kHFull] = c.gemm_input(block::tp_gather(c, tp, std::move(o.y)));
  const Index n = t[kHFull].rows();
  const bool tied = m.config.tied_embeddings;
  const DeviceView w = c.param(head, tied ? "wte" : "w");
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
  c.synchronize();
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
    const DeviceView w = c.param(head, "wte");
    const Ctx::Operand dl = c.operand(dlogits); // one bf16 copy for both GEMMs
    c.gemm(dl.view, false, w, false, dfull, 0.0f);
    c.gemm(dl.view, true, t[kHFull], false, c.grad(head, "wte"), 1.0f);
  } else {
    c.linear_grad(t[kHFull], c.param(head, "w"), dlogits, dfull, c.grad(head, "w"), {}, false);
  }
  dlogits.release();
  const DeviceTensor dnorm = block::tp_reduce(c, tp, std::move(dfull));
  DeviceTensor dx;
  c.norm_backward(m, norm, "norm", t[kHX], t[kHMean], t[kHRstd], dnorm, dx, false);
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
    return block::layer_forward(ctx(), m, b, tp, mb, x, keep, cache);
  }
  void layer_recompute(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                       const Batch& mb, Cache& cache) {
    block::layer_recompute(ctx(), m, b, tp, mb, cache);
  }
  Act layer_backward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                     const Batch& mb, const Act& dy, Cache& cache) {
    return block::layer_backward(ctx(), m, b, tp, mb, dy, cache);
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
static_assert(detail::TrainerBackend<CudaBackend>);

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
  if (model.config.moe.enabled()) {
    throw InputError(plan_source, "/moe", "a dense model for the CUDA trainer",
                     "a mixture of experts (routed experts train on the CPU backend so far)");
  }
  if (plan.cp > 1) {
    throw InputError(plan_source, "/cp", "1 for the CUDA trainer",
                     std::to_string(plan.cp) +
                         " (context parallelism trains on the CPU backend so far)");
  }
  if (plan.grad_sync == GradSync::parameter_server_async) {
    throw InputError(plan_source, "/grad_sync", "a synchronous reduction for the CUDA trainer",
                     "\"parameter_server_async\" (the asynchronous server trains on the CPU "
                     "backend so far)");
  }
  if (plan.parameter_servers > 0) {
    throw InputError(plan_source, "/parameter_servers", "0 for the CUDA trainer",
                     std::to_string(plan.parameter_servers) +
                         " (dedicated server processes train on the CPU backend so far)");
  }
  if (plan.grad_compression.enabled()) {
    throw InputError(plan_source, "/grad_compression", "\"none\" for the CUDA trainer",
                     "\"" + grad_compression_name(plan.grad_compression) +
                         "\" (gradient compression trains on the CPU backend so far)");
  }
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
