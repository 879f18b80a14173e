// The trainer's backend-independent core: pipeline schedule, data-parallel gradient buckets
// overlapped with backward, ZeRO 0–3, tied embeddings, sequence-parallel gradient sums, gradient
// clipping, AdamW, the learning-rate schedule, checkpoints and the measured timeline — written
// once over a backend B that owns the memory and the arithmetic. The CPU backend (Eigen,
// host memory, MPI) is in executor/src/trainer.cpp; the CUDA backend (device memory, cuBLASLt
// and own kernels, NCCL) in executor/cuda/src/trainer_cuda.cpp. Both instantiate TrainerCore<B>
// behind the Trainer facade, so every schedule and ZeRO test of the CPU trainer exercises this
// code.
//
// What a backend B provides (all pointers below point into B's memory: host or device):
//   types     Flat (a flat fp32 buffer), Act (an activation matrix), Cache (what a block keeps
//             from its forward for its backward), Batch (a micro-batch as the model functions
//             read it)
//   memory    static float* data(const Flat&); static std::int64_t size(const Flat&);
//             static std::int64_t act_size(const Act&);
//             Flat zeros(n); Flat upload(span<const float> host);
//             void download(const float* src, n, float* host); void set_zero(Flat&)
//   math      add(dst, src, n) (dst += src); copy(dst, src, n);
//             double sum_squares(ranges) (Σ x² over the ranges, in order, in double);
//             adamw(p, g, m1, m2, n, ops::AdamwHyper)
//   comm      std::unique_ptr<Communicator> group(ranks, name, timeout) (collectives over B's
//             memory); Act recv_act(world, src, tag, rows, cols); void send_act(world, Act, dst,
//             tag) (non-blocking, the backend keeps the data alive); void finish_sends()
//   model     Batch batch(MicroBatch); embedding/layer/head forward and backward, as in
//             parallax/executor/model.hpp with Act, Cache and Batch in place of Tensor,
//             BlockCache and MicroBatch
//   time      void synchronize() (all enqueued work done; no-op on the CPU);
//             Mark (a point in the recorded step: a steady-clock time, or a device event);
//             begin_recording(t0) (the step starts at steady time t0, nothing in flight);
//             Mark mark(); double seconds(Mark) (steady-clock seconds of a mark, valid once the
//             step's work is done);
//             void reset_peak(); std::int64_t peak_bytes() (the backend's own accounting)
#pragma once

#include "parallax/core/error.hpp"
#include "parallax/core/pipeline_schedule.hpp"
#include "parallax/core/timeline_json.hpp"
#include "parallax/executor/adamw.hpp"
#include "parallax/executor/trainer.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <numbers>
#include <span>
#include <utility>
#include <vector>

namespace parallax::detail {

using Ranges = std::vector<std::pair<const float*, std::int64_t>>;

template <class B> class TrainerCore final : public Trainer::Impl {
public:
  using Flat = typename B::Flat;
  using Act = typename B::Act;
  using Cache = typename B::Cache;
  using Batch = typename B::Batch;
  using Mark = typename B::Mark;

  TrainerCore(B backend, const ExecModel& model, const Plan& plan, const TrainOptions& options,
              const std::string& plan_source);

  StepStats step(bool record) override;
  std::int64_t steps_done() const override { return step_count_; }
  Checkpoint checkpoint() override;
  void restore(const Checkpoint& ckpt, const std::string& source) override;
  Timeline timeline() override;

private:
  // One parameter block on this rank: its flat buffers and optimizer state.
  struct Block {
    BlockLayout layout;
    std::int64_t own_begin = 0; // the slice of the flat buffer this data-parallel rank updates
    std::int64_t own_size = 0;
    Flat params;      // full local parameters (ZeRO-3: only while gathered)
    Flat param_shard; // ZeRO-3: the owned slice, always resident
    Flat grads;       // full local gradients (ZeRO-2/3: only during a backward)
    Flat grad_shard;  // ZeRO-2/3: reduced gradients of the owned slice, accumulated
    Flat exp_avg;     // AdamW moments of the owned slice
    Flat exp_avg_sq;
    CommRequest pending; // in-flight gradient all-reduce or reduce-scatter
    Flat rs_out;         // reduce-scatter destination while pending
    bool rs_pending = false;
    // The LM head's tied embedding when the embedding lives on the same rank: no storage of
    // its own, it reads and writes the embedding block's buffers.
    Block* alias = nullptr;

    BlockBuffers buffers() const {
      const Block& s = alias ? *alias : *this;
      return {.layout = &layout, .params = B::data(s.params), .grads = B::data(s.grads)};
    }
    // Reduced gradients of the owned slice (valid after the step's reduction).
    float* owned_grads(int zero) const {
      return zero >= 2 ? B::data(grad_shard) : B::data(grads) + own_begin;
    }
    float* owned_params(int zero) const {
      return zero == 3 ? B::data(param_shard) : B::data(params) + own_begin;
    }
  };

  struct Chunk {
    int index = 0; // global chunk index
    StageRange units;
    std::vector<Block> blocks;
    bool first() const { return units.first == 0; }
  };

  static std::span<float> span_of(const Flat& f) {
    return {B::data(f), static_cast<std::size_t>(B::size(f))};
  }
  static Block& storage(Block& b) { return b.alias ? *b.alias : b; }

  // A point in the recorded step's time (nothing while not recording): the steady clock on
  // the CPU, an event on the compute stream on a device; resolved to seconds when the step
  // has finished, so recording does not stall a device.
  Mark mark() { return recording_ ? be_.mark() : Mark{}; }

  TpContext tp();
  void record(Stream stream, Category cat, std::string name, int layer, int mb, Mark s, Mark e,
              double flops = 0, double bytes = 0);
  // An event timed on the host's steady clock (the tensor-parallel collectives report so).
  void record_host(Stream stream, Category cat, std::string name, int layer, int mb, double s,
                   double e, double bytes);
  void resolve_marks();
  int chunk_rank(int chunk) const {
    return rank_of(plan_, {.dp = me_.dp, .pp = chunk_pp_rank(plan_, chunk), .tp = me_.tp});
  }
  int tag(int chunk, std::int64_t mb, int dir) const {
    return static_cast<int>((static_cast<std::int64_t>(chunk) * m_ + mb) * 2 + dir);
  }
  MicroBatch micro_batch(std::int64_t k) const;

  void gather_params(Block& blk);
  void release_params(Block& b) {
    if (plan_.zero_stage == 3)
      storage(b).params = Flat();
  }
  void finish_reduce_scatter(Block& b);
  void prepare_grads(Block& blk);
  bool shared_with_head(const Block& emb) const;
  void after_backward(Block& b, std::int64_t k);
  void launch_deferred();
  void launch_reduction(Block& b, std::int64_t k);

  Act receive(int chunk_from, std::int64_t k, int dir, Eigen::Index rows);
  void send(Act x, int chunk_to, int chunk_from, std::int64_t k, int dir);
  Eigen::Index local_rows() const {
    const Eigen::Index n = plan_.micro_batch_size * model_.config.seq_length;
    return plan_.sequence_parallel ? n / plan_.tp : n;
  }
  KeepMode keep_mode() const;
  void forward(int lc, std::int64_t k, const Batch& mb);
  void backward(int lc, std::int64_t k, const Batch& mb, float loss_scale);

  double learning_rate(std::int64_t step) const;
  template <class F> static void for_owned(const Block& b, F&& f);
  Block* find_block(BlockKind kind);
  void reduce_gradients();
  double gradient_norm();
  bool parameter_server() const { return plan_.grad_sync == GradSync::parameter_server; }
  void adamw(double lr, double clip_coef);
  void publish_params();
  // The full local flat buffer of an owned slice, assembled over data parallelism, on the host.
  Buffer assemble(const Block& b, const float* owned);

  B be_;
  ExecModel model_;
  Plan plan_;
  TrainOptions opt_;
  std::unique_ptr<TokenSource> data_;

  std::unique_ptr<Communicator> world_; // MPI: host values, pipeline messages, checkpoints
  std::unique_ptr<Communicator> tp_comm_;
  std::unique_ptr<Communicator> dp_comm_;
  std::unique_ptr<Communicator> embed_comm_; // first and last pipeline rank (tied embeddings)
  RankCoords me_;
  int rank_ = 0;
  std::int64_t m_ = 1;        // micro-batches per replica
  std::vector<Chunk> chunks_; // local chunks, by local index
  std::int64_t step_count_ = 0;
  std::int64_t samples_consumed_ = 0; // global samples of the steps done (the data position)
  double flops_per_sequence_ = 0;

  // Measured events of the recorded step; those timed by marks until the step ends.
  bool recording_ = false;
  double t0_ = 0;
  std::vector<Event> events_;
  struct Marked {
    Event event;
    Mark start, end;
  };
  std::vector<Marked> marked_;

  // Per micro-batch caches: [local chunk][micro-batch][block].
  std::vector<std::vector<std::vector<Cache>>> caches_;
  std::map<int, Act> mailbox_; // same-rank "sends" (pp = 1 with several chunks)
  // ZeRO-2/3: blocks whose gradient reduce-scatter is in flight, oldest first. At most
  // kReduceScatterWindow full-size gradient buffers are alive at once.
  static constexpr std::size_t kReduceScatterWindow = 2;
  std::deque<Block*> scattering_;
  // Plans whose stack does not overlap gradient reduction: blocks whose reduction is due,
  // launched after the backward pass (ZeRO-2/3: after each micro-batch's, else after the step's).
  std::vector<std::pair<Block*, std::int64_t>> deferred_;
  double loss_sum_ = 0;
};

// ---- construction ----

template <class B>
TrainerCore<B>::TrainerCore(B backend, const ExecModel& model, const Plan& plan,
                            const TrainOptions& options, const std::string& plan_source)
    : be_(std::move(backend)), model_(model), plan_(plan), opt_(options) {
  world_ = mpi_world(options.comm_timeout);
  rank_ = world_->rank();
  trainer_check_plan(model, plan, world_->size(), plan_source);
  PARALLAX_CHECK(static_cast<int>(plan.stages.size()) == plan.pp * plan.virtual_stages,
                 "the trainer needs the plan's stage ranges");
  const ModelConfig& c = model.config;
  me_ = rank_coords(plan, rank_);
  m_ = plan.num_microbatches();
  // Pipeline messages go point to point over the world communicator (any two chunks' ranks).
  tp_comm_ = be_.group(tp_group(plan, rank_), "tp", options.comm_timeout);
  dp_comm_ = be_.group(dp_group(plan, rank_), "dp", options.comm_timeout);
  if (c.tied_embeddings && plan.pp > 1 && (me_.pp == 0 || me_.pp == plan.pp - 1)) {
    embed_comm_ = be_.group({rank_of(plan, {.dp = me_.dp, .pp = 0, .tp = me_.tp}),
                             rank_of(plan, {.dp = me_.dp, .pp = plan.pp - 1, .tp = me_.tp})},
                            "embedding", options.comm_timeout);
  }
  data_ = options.data_path.empty()
              ? make_synthetic_source(c.vocab_size, options.seed)
              : open_token_file(options.data_path, c.vocab_size, c.seq_length);
  flops_per_sequence_ = model_flops_per_sequence(model);

  const int z = plan.zero_stage;
  for (int lc = 0; lc < plan.virtual_stages; ++lc) {
    Chunk ch;
    ch.index = lc * plan.pp + me_.pp;
    ch.units = plan.stages[static_cast<std::size_t>(ch.index)];
    for (BlockLayout& layout : chunk_layout(model, ch.units, plan.tp, me_.tp, plan.dp)) {
      Block b;
      b.layout = std::move(layout);
      const std::int64_t padded = b.layout.padded;
      b.own_size = z == 0 ? padded : padded / plan.dp;
      b.own_begin = z == 0 ? 0 : b.own_size * me_.dp;
      Buffer full(static_cast<std::size_t>(padded), 0.0f);
      init_block(b.layout, options.seed, {full.data(), full.size()});
      if (z == 3) {
        b.param_shard = be_.upload(std::span<const float>(full).subspan(
            static_cast<std::size_t>(b.own_begin), static_cast<std::size_t>(b.own_size)));
      } else {
        b.params = be_.upload(full);
      }
      if (z < 2)
        b.grads = be_.zeros(padded);
      if (z >= 2)
        b.grad_shard = be_.zeros(b.own_size);
      b.exp_avg = be_.zeros(b.own_size);
      b.exp_avg_sq = be_.zeros(b.own_size);
      ch.blocks.push_back(std::move(b));
    }
    chunks_.push_back(std::move(ch));
  }
  if (c.tied_embeddings) {
    Block* emb = find_block(BlockKind::embedding);
    Block* head = find_block(BlockKind::head);
    if (emb && head) {
      head->alias = emb;
      for (Flat* buf : {&head->params, &head->param_shard, &head->grads, &head->grad_shard,
                        &head->exp_avg, &head->exp_avg_sq}) {
        *buf = Flat();
      }
    }
  }
}

// ---- small pieces ----

template <class B> TpContext TrainerCore<B>::tp() {
  TpContext t{.comm = tp_comm_.get(), .sequence_parallel = plan_.sequence_parallel};
  if (recording_) {
    t.on_comm = [this](const char* what, double s, double e, double bytes) {
      record_host(Stream::tp_comm, Category::tp_comm, what, -1, -1, s, e, bytes);
    };
  }
  return t;
}

template <class B>
void TrainerCore<B>::record(Stream stream, Category cat, std::string name, int layer, int mb,
                            Mark s, Mark e, double flops, double bytes) {
  if (!recording_)
    return;
  marked_.push_back({.event = {.rank = rank_,
                               .stream = stream,
                               .category = cat,
                               .name = std::move(name),
                               .layer = layer,
                               .micro_batch = mb,
                               .flops = flops,
                               .bytes = bytes},
                     .start = s,
                     .end = e});
}

template <class B>
void TrainerCore<B>::record_host(Stream stream, Category cat, std::string name, int layer, int mb,
                                 double s, double e, double bytes) {
  if (!recording_)
    return;
  events_.push_back({.rank = rank_,
                     .stream = stream,
                     .category = cat,
                     .name = std::move(name),
                     .layer = layer,
                     .micro_batch = mb,
                     .start_s = s - t0_,
                     .end_s = e - t0_,
                     .bytes = bytes});
}

// After the step's work is done: every marked event gets its times.
template <class B> void TrainerCore<B>::resolve_marks() {
  for (Marked& m : marked_) {
    m.event.start_s = be_.seconds(m.start) - t0_;
    m.event.end_s = be_.seconds(m.end) - t0_;
    events_.push_back(std::move(m.event));
  }
  marked_.clear();
}

template <class B> MicroBatch TrainerCore<B>::micro_batch(std::int64_t k) const {
  const ModelConfig& c = model_.config;
  MicroBatch mb;
  mb.batch = plan_.micro_batch_size;
  mb.seq = c.seq_length;
  const std::int64_t base =
      samples_consumed_ + me_.dp * (m_ * plan_.micro_batch_size) + k * plan_.micro_batch_size;
  std::vector<std::int32_t> sample(static_cast<std::size_t>(mb.seq + 1));
  for (Eigen::Index b = 0; b < mb.batch; ++b) {
    data_->sample(base + b, sample);
    mb.inputs.insert(mb.inputs.end(), sample.begin(), sample.end() - 1);
    mb.targets.insert(mb.targets.end(), sample.begin() + 1, sample.end());
  }
  const Eigen::Index n = mb.batch * mb.seq;
  const int t = plan_.sequence_parallel ? plan_.tp : 1;
  const Eigen::Index local = n / t;
  const Eigen::Index first = plan_.sequence_parallel ? local * me_.tp : 0;
  for (Eigen::Index r = 0; r < local; ++r) {
    mb.positions.push_back(static_cast<std::int32_t>((first + r) % mb.seq));
  }
  return mb;
}

template <class B> KeepMode TrainerCore<B>::keep_mode() const {
  switch (plan_.recompute) {
  case Recompute::none:
    return KeepMode::all;
  case Recompute::selective:
    return KeepMode::no_attention_probs;
  case Recompute::full:
    return KeepMode::input_only;
  }
  return KeepMode::all;
}

// ---- parameters and ZeRO ----

template <class B> void TrainerCore<B>::gather_params(Block& blk) {
  if (plan_.zero_stage != 3)
    return;
  Block& b = storage(blk);
  const Mark s = mark();
  b.params = be_.zeros(b.layout.padded);
  if (dp_comm_->size() == 1) {
    be_.copy(B::data(b.params), B::data(b.param_shard), B::size(b.param_shard));
  } else {
    dp_comm_->all_gather(span_of(b.param_shard), span_of(b.params));
  }
  record(Stream::dp_comm, Category::dp_comm, "zero3 gather " + b.layout.name, b.layout.unit, -1, s,
         mark(), 0, static_cast<double>(b.layout.padded) * sizeof(float));
}

template <class B> void TrainerCore<B>::finish_reduce_scatter(Block& b) {
  if (!b.rs_pending)
    return;
  scattering_.erase(std::find(scattering_.begin(), scattering_.end(), &b));
  const Mark s = mark();
  b.pending.wait();
  record(Stream::dp_comm, Category::dp_comm, "reduce-scatter wait " + b.layout.name, b.layout.unit,
         -1, s, mark());
  be_.add(B::data(b.grad_shard), B::data(b.rs_out), B::size(b.grad_shard));
  b.rs_out = Flat();
  b.grads = Flat();
  b.rs_pending = false;
}

// Before a block's backward: make sure its gradient buffer exists and is free.
template <class B> void TrainerCore<B>::prepare_grads(Block& blk) {
  if (plan_.zero_stage < 2)
    return;
  Block& b = storage(blk);
  finish_reduce_scatter(b);
  b.grads = be_.zeros(b.layout.padded);
}

// The embedding shares its gradient buffer with a tied head on this rank: the head's backward,
// earlier in the same micro-batch, already prepared it.
template <class B> bool TrainerCore<B>::shared_with_head(const Block& emb) const {
  for (const Chunk& c : chunks_) {
    for (const Block& b : c.blocks) {
      if (b.alias == &emb)
        return true;
    }
  }
  return false;
}

// After a block's backward of micro-batch `k`: launch its data-parallel reduction when due.
template <class B> void TrainerCore<B>::after_backward(Block& b, std::int64_t k) {
  if (b.alias)
    return; // reduced with the embedding, whose backward comes later
  if (!plan_.overlap_grad_reduce && plan_.dp > 1 && (plan_.zero_stage >= 2 || k == m_ - 1)) {
    deferred_.emplace_back(&b, k);
    return;
  }
  launch_reduction(b, k);
}

// The deferred reductions of a stack without overlap; ZeRO-2/3 also wait for theirs here.
template <class B> void TrainerCore<B>::launch_deferred() {
  for (auto [b, k] : deferred_)
    launch_reduction(*b, k);
  deferred_.clear();
  if (plan_.zero_stage >= 2) {
    while (!scattering_.empty())
      finish_reduce_scatter(*scattering_.front());
  }
}

template <class B> void TrainerCore<B>::launch_reduction(Block& b, std::int64_t k) {
  const int dp = plan_.dp;
  if (plan_.zero_stage >= 2) {
    if (dp == 1) {
      be_.add(B::data(b.grad_shard), B::data(b.grads), B::size(b.grad_shard));
      b.grads = Flat();
      return;
    }
    b.rs_out = be_.zeros(b.own_size);
    b.pending = dp_comm_->ireduce_scatter_sum(span_of(b.grads), span_of(b.rs_out));
    b.rs_pending = true;
    scattering_.push_back(&b);
    while (scattering_.size() > kReduceScatterWindow) {
      finish_reduce_scatter(*scattering_.front());
    }
  } else if (dp > 1 && k == m_ - 1) {
    // The bucket is launched as soon as it is ready; a parameter server (data-parallel rank 0)
    // receives the sum and alone runs the optimizer.
    b.pending = parameter_server() ? dp_comm_->ireduce_sum(span_of(b.grads), 0)
                                   : dp_comm_->iall_reduce_sum(span_of(b.grads));
  }
}

// ---- pipeline ----

template <class B>
typename B::Act TrainerCore<B>::receive(int chunk_from, std::int64_t k, int dir,
                                        Eigen::Index rows) {
  const int t = tag(chunk_from, k, dir);
  const int src = chunk_rank(chunk_from);
  if (src == rank_) {
    auto it = mailbox_.find(t);
    PARALLAX_CHECK(it != mailbox_.end(), "pipeline message to self missing");
    Act x = std::move(it->second);
    mailbox_.erase(it);
    return x;
  }
  const Mark s = mark();
  Act x = be_.recv_act(*world_, src, t, rows, model_.config.hidden_size);
  record(Stream::pp_comm, Category::pp_comm, dir == 0 ? "recv activation" : "recv gradient", -1,
         static_cast<int>(k), s, mark(), 0, static_cast<double>(B::act_size(x)) * sizeof(float));
  return x;
}

template <class B>
void TrainerCore<B>::send(Act x, int chunk_to, int chunk_from, std::int64_t k, int dir) {
  const int t = tag(chunk_from, k, dir);
  const int dst = chunk_rank(chunk_to);
  if (dst == rank_) {
    mailbox_.emplace(t, std::move(x));
    return;
  }
  be_.send_act(*world_, std::move(x), dst, t);
}

template <class B> void TrainerCore<B>::forward(int lc, std::int64_t k, const Batch& mb) {
  Chunk& ch = chunks_[static_cast<std::size_t>(lc)];
  auto& cache = caches_[static_cast<std::size_t>(lc)][static_cast<std::size_t>(k)];
  cache.clear(); // caches hold move-only device tensors: no assign(n, value)
  cache.resize(ch.blocks.size());
  const TpContext tpc = tp();
  const int last_chunk = plan_.pp * plan_.virtual_stages - 1;
  Act x;
  std::size_t i = 0;
  if (ch.first()) {
    Block& emb = ch.blocks[0];
    Block* pos = ch.blocks.size() > 1 && ch.blocks[1].layout.kind == BlockKind::positions
                     ? &ch.blocks[1]
                     : nullptr;
    gather_params(emb);
    if (pos)
      gather_params(*pos);
    const Mark s = mark();
    const BlockBuffers eb = emb.buffers();
    const BlockBuffers pb = pos ? pos->buffers() : BlockBuffers{};
    x = be_.embedding_forward(model_, eb, pos ? &pb : nullptr, tpc, mb);
    record(Stream::compute, Category::forward, "embedding", 0, static_cast<int>(k), s, mark());
    release_params(emb);
    if (pos)
      release_params(*pos);
    i = pos ? 2 : 1;
  } else {
    x = receive(ch.index - 1, k, 0, local_rows());
  }
  for (; i < ch.blocks.size(); ++i) {
    Block& b = ch.blocks[i];
    if (b.layout.kind != BlockKind::layer)
      break;
    gather_params(b);
    const Mark s = mark();
    x = be_.layer_forward(model_, b.buffers(), tpc, mb, x, keep_mode(), cache[i]);
    record(Stream::compute, Category::forward, b.layout.name, b.layout.unit, static_cast<int>(k), s,
           mark());
    release_params(b);
  }
  if (ch.index == last_chunk) {
    Block& norm = ch.blocks[i];
    Block& head = ch.blocks[i + 1];
    gather_params(norm);
    gather_params(head);
    const Mark s = mark();
    const double loss =
        be_.head_forward(model_, norm.buffers(), head.buffers(), tpc, mb, x, cache[i]);
    record(Stream::compute, Category::forward, "head", norm.layout.unit, static_cast<int>(k), s,
           mark());
    release_params(norm);
    release_params(head);
    if (me_.tp == 0)
      loss_sum_ += loss;
  } else {
    send(std::move(x), ch.index + 1, ch.index, k, 0);
  }
}

template <class B>
void TrainerCore<B>::backward(int lc, std::int64_t k, const Batch& mb, float loss_scale) {
  Chunk& ch = chunks_[static_cast<std::size_t>(lc)];
  auto& cache = caches_[static_cast<std::size_t>(lc)][static_cast<std::size_t>(k)];
  const TpContext tpc = tp();
  const int last_chunk = plan_.pp * plan_.virtual_stages - 1;
  std::size_t end = ch.blocks.size();
  Act dy;
  if (ch.index == last_chunk) {
    Block& norm = ch.blocks[end - 2];
    Block& head = ch.blocks[end - 1];
    gather_params(norm);
    gather_params(head);
    prepare_grads(norm);
    prepare_grads(head);
    const Mark s = mark();
    dy = be_.head_backward(model_, norm.buffers(), head.buffers(), tpc, mb, loss_scale,
                           cache[end - 2]);
    record(Stream::compute, Category::backward, "head", norm.layout.unit, static_cast<int>(k), s,
           mark());
    release_params(norm);
    release_params(head);
    after_backward(head, k);
    after_backward(norm, k);
    end -= 2;
  } else {
    dy = receive(ch.index + 1, k, 1, local_rows());
  }
  const std::size_t first_layer = ch.first() ? (model_.rope() ? 1 : 2) : 0;
  for (std::size_t i = end; i-- > first_layer;) {
    Block& b = ch.blocks[i];
    gather_params(b);
    prepare_grads(b);
    const Mark s = mark();
    const bool full = plan_.recompute == Recompute::full;
    dy = be_.layer_backward(model_, b.buffers(), tpc, mb, dy, cache[i]);
    record(Stream::compute, full ? Category::recompute : Category::backward, b.layout.name,
           b.layout.unit, static_cast<int>(k), s, mark());
    release_params(b);
    after_backward(b, k);
  }
  if (ch.first()) {
    Block& emb = ch.blocks[0];
    Block* pos = first_layer == 2 ? &ch.blocks[1] : nullptr;
    gather_params(emb);
    if (!shared_with_head(emb))
      prepare_grads(emb);
    if (pos) {
      gather_params(*pos);
      prepare_grads(*pos);
    }
    const Mark s = mark();
    const BlockBuffers eb = emb.buffers();
    const BlockBuffers pb = pos ? pos->buffers() : BlockBuffers{};
    be_.embedding_backward(model_, eb, pos ? &pb : nullptr, tpc, mb, dy);
    record(Stream::compute, Category::backward, "embedding", 0, static_cast<int>(k), s, mark());
    release_params(emb);
    if (pos) {
      release_params(*pos);
      after_backward(*pos, k);
    }
    after_backward(emb, k);
  } else {
    send(std::move(dy), ch.index - 1, ch.index, k, 1);
  }
  cache.clear();
  if (plan_.zero_stage >= 2) {
    launch_deferred();
  }
}

// ---- optimizer ----

template <class B> double TrainerCore<B>::learning_rate(std::int64_t step) const {
  const std::int64_t warmup = opt_.warmup_steps >= 0 ? opt_.warmup_steps : opt_.steps / 10;
  const std::int64_t horizon =
      std::max<std::int64_t>(opt_.decay_steps >= 0 ? opt_.decay_steps : opt_.steps, 1);
  if (step < warmup)
    return opt_.lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double progress =
      std::clamp(static_cast<double>(step - warmup) /
                     static_cast<double>(std::max<std::int64_t>(horizon - warmup, 1)),
                 0.0, 1.0);
  const double min_lr = opt_.lr * opt_.min_lr_ratio;
  return min_lr + 0.5 * (opt_.lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

// Calls f(param, begin, end) for the part [begin, end) of each parameter (flat offsets) that
// lies in the block's owned slice.
template <class B> template <class F> void TrainerCore<B>::for_owned(const Block& b, F&& f) {
  const std::int64_t lo = b.own_begin;
  const std::int64_t hi = b.own_begin + b.own_size;
  for (const ParamInfo& p : b.layout.params) {
    const std::int64_t s = std::max(lo, p.offset);
    const std::int64_t e = std::min(hi, p.offset + p.local_size());
    if (s < e)
      f(p, s, e);
  }
}

template <class B> typename TrainerCore<B>::Block* TrainerCore<B>::find_block(BlockKind kind) {
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.layout.kind == kind)
        return &b;
    }
  }
  return nullptr;
}

template <class B> void TrainerCore<B>::reduce_gradients() {
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      if (plan_.zero_stage >= 2) {
        finish_reduce_scatter(b);
      } else if (b.pending.pending()) {
        const Mark s = mark();
        b.pending.wait();
        record(Stream::dp_comm, Category::dp_comm, "all-reduce wait " + b.layout.name,
               b.layout.unit, -1, s, mark(), 0,
               static_cast<double>(B::size(b.grads)) * sizeof(float));
      }
    }
  }
  // Tied embeddings: the embedding and the head's copy share one gradient.
  if (model_.config.tied_embeddings) {
    Block* emb = find_block(BlockKind::embedding);
    Block* head = find_block(BlockKind::head);
    const int z = plan_.zero_stage;
    if (head && head->alias) {
      // One buffer on this rank: the gradients already met.
    } else if (emb && head) {
      float* a = emb->owned_grads(z);
      float* h = head->owned_grads(z);
      be_.add(a, h, emb->own_size);
      be_.copy(h, a, emb->own_size);
    } else if (emb || head) {
      Block* b = emb ? emb : head;
      embed_comm_->all_reduce_sum(
          std::span<float>(b->owned_grads(z), static_cast<std::size_t>(b->own_size)));
    }
  }
  // Sequence parallelism: replicated parameters saw only this rank's part of the sequence.
  if (plan_.sequence_parallel && plan_.tp > 1) {
    std::vector<std::pair<float*, std::int64_t>> parts;
    std::int64_t total = 0;
    for (Chunk& c : chunks_) {
      for (Block& b : c.blocks) {
        if (b.alias)
          continue;
        float* g = b.owned_grads(plan_.zero_stage) - b.own_begin;
        for_owned(b, [&](const ParamInfo& p, std::int64_t s, std::int64_t e) {
          if (p.sp_partial) {
            parts.emplace_back(g + s, e - s);
            total += e - s;
          }
        });
      }
    }
    Flat packed = be_.zeros(total);
    std::int64_t at = 0;
    for (auto [g, n] : parts) {
      be_.copy(B::data(packed) + at, g, n);
      at += n;
    }
    tp_comm_->all_reduce_sum(span_of(packed));
    at = 0;
    for (auto [g, n] : parts) {
      be_.copy(g, B::data(packed) + at, n);
      at += n;
    }
  }
}

template <class B> double TrainerCore<B>::gradient_norm() {
  Ranges ranges;
  const bool count_dp = plan_.zero_stage > 0 || me_.dp == 0;
  if (count_dp) {
    for (Chunk& c : chunks_) {
      for (Block& b : c.blocks) {
        if (b.alias)
          continue;
        const float* g = b.owned_grads(plan_.zero_stage) - b.own_begin;
        for_owned(b, [&](const ParamInfo& p, std::int64_t s, std::int64_t e) {
          if (p.tied_copy || (p.split == ShardDim::none && me_.tp != 0))
            return;
          ranges.emplace_back(g + s, e - s);
        });
      }
    }
  }
  double v[1] = {be_.sum_squares(ranges)};
  world_->all_reduce_sum(std::span<double>(v));
  return std::sqrt(v[0]);
}

template <class B> void TrainerCore<B>::adamw(double lr, double clip_coef) {
  if (parameter_server() && me_.dp != 0)
    return; // the server updates, the others receive
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      float* g = b.owned_grads(plan_.zero_stage) - b.own_begin;
      float* p = b.owned_params(plan_.zero_stage) - b.own_begin;
      float* m1 = B::data(b.exp_avg) - b.own_begin;
      float* m2 = B::data(b.exp_avg_sq) - b.own_begin;
      for_owned(b, [&](const ParamInfo& info, std::int64_t s, std::int64_t e) {
        be_.adamw(p + s, g + s, m1 + s, m2 + s, e - s,
                  ops::AdamwHyper{.lr = lr,
                                  .beta1 = opt_.beta1,
                                  .beta2 = opt_.beta2,
                                  .eps = opt_.adam_eps,
                                  .weight_decay = opt_.weight_decay,
                                  .step = step_count_ + 1,
                                  .clip_coef = clip_coef,
                                  .decay = info.decay});
      });
    }
  }
}

template <class B> void TrainerCore<B>::publish_params() {
  if (parameter_server() && plan_.dp > 1) {
    for (Chunk& c : chunks_) {
      for (Block& b : c.blocks) {
        if (b.alias)
          continue;
        const Mark s = mark();
        dp_comm_->broadcast(span_of(b.params), 0);
        record(Stream::dp_comm, Category::dp_comm, "parameter broadcast " + b.layout.name,
               b.layout.unit, -1, s, mark(), 0,
               static_cast<double>(B::size(b.params)) * sizeof(float));
      }
    }
    return;
  }
  if (plan_.zero_stage == 0 || plan_.zero_stage == 3 || plan_.dp == 1)
    return;
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      const Mark s = mark();
      const std::span<float> all = span_of(b.params);
      dp_comm_->all_gather(
          all.subspan(static_cast<std::size_t>(b.own_begin), static_cast<std::size_t>(b.own_size)),
          all);
      record(Stream::dp_comm, Category::dp_comm, "param all-gather " + b.layout.name, b.layout.unit,
             -1, s, mark(), 0, static_cast<double>(B::size(b.params)) * sizeof(float));
    }
  }
}

// ---- step ----

template <class B> StepStats TrainerCore<B>::step(bool record_step) {
  recording_ = record_step;
  events_.clear();
  marked_.clear();
  be_.synchronize();
  be_.reset_peak();
  world_->barrier();
  const double start = steady_seconds();
  t0_ = start;
  if (recording_)
    be_.begin_recording(t0_);

  const int z = plan_.zero_stage;
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      be_.set_zero(z < 2 ? b.grads : b.grad_shard);
    }
  }
  loss_sum_ = 0;
  caches_.clear();
  caches_.resize(chunks_.size());
  for (auto& per_chunk : caches_)
    per_chunk.resize(static_cast<std::size_t>(m_));
  const double global_tokens =
      static_cast<double>(plan_.global_batch_size * model_.config.seq_length);
  const float loss_scale = static_cast<float>(1.0 / global_tokens);

  std::map<std::int64_t, Batch> batches;
  for (const PipelineOp& op : pipeline_schedule(plan_, me_.pp)) {
    const int lc = op.chunk / plan_.pp;
    auto it = batches.find(op.micro_batch);
    if (it == batches.end())
      it = batches.emplace(op.micro_batch, be_.batch(micro_batch(op.micro_batch))).first;
    if (op.forward) {
      forward(lc, op.micro_batch, it->second);
    } else {
      backward(lc, op.micro_batch, it->second, loss_scale);
    }
  }
  be_.finish_sends();
  PARALLAX_CHECK(mailbox_.empty(), "pipeline messages left undelivered");

  launch_deferred();
  reduce_gradients();
  const double norm = gradient_norm();
  const double lr = learning_rate(step_count_);
  const double clip = opt_.clip_grad_norm > 0 && norm > opt_.clip_grad_norm
                          ? opt_.clip_grad_norm / (norm + 1e-6)
                          : 1.0;
  const Mark opt_start = mark();
  adamw(lr, clip);
  record(Stream::compute, Category::optimizer, "optimizer", -1, -1, opt_start, mark());
  publish_params();
  be_.synchronize();
  resolve_marks();
  step_count_ += 1;
  samples_consumed_ += plan_.global_batch_size;

  double sums[1] = {loss_sum_};
  world_->all_reduce_sum(std::span<double>(sums));
  double maxes[2] = {steady_seconds() - start, static_cast<double>(be_.peak_bytes())};
  world_->all_reduce_max(std::span<double>(maxes));

  StepStats st;
  st.step = step_count_;
  st.loss = sums[0] / global_tokens;
  st.grad_norm = norm;
  st.lr = lr;
  st.step_time_s = maxes[0];
  st.tokens_per_s = global_tokens / maxes[0];
  const double flops = flops_per_sequence_ * static_cast<double>(plan_.global_batch_size);
  st.mfu = opt_.peak_flops_per_rank > 0
               ? flops / maxes[0] / (opt_.peak_flops_per_rank * plan_.world_size())
               : 0.0;
  st.peak_memory_bytes = static_cast<std::int64_t>(maxes[1]);
  recording_ = false;
  return st;
}

template <class B> Timeline TrainerCore<B>::timeline() {
  Timeline mine;
  mine.events = events_;
  mine.peak_memory_bytes.assign(static_cast<std::size_t>(plan_.world_size()), 0);
  mine.peak_memory_bytes[static_cast<std::size_t>(rank_)] = be_.peak_bytes();
  const std::vector<std::string> parts =
      world_->gather_strings(timeline_to_chrome_trace(mine).dump(), 0);
  Timeline all;
  all.peak_memory_bytes.assign(static_cast<std::size_t>(plan_.world_size()), 0);
  for (std::size_t r = 0; r < parts.size(); ++r) {
    Timeline t = timeline_from_chrome_trace(json_parse_text(parts[r], "rank trace"), "rank trace");
    all.events.insert(all.events.end(), t.events.begin(), t.events.end());
    if (r < t.peak_memory_bytes.size())
      all.peak_memory_bytes[r] = t.peak_memory_bytes[r];
  }
  all.sort();
  return all;
}

// ---- checkpoints ----

template <class B> Buffer TrainerCore<B>::assemble(const Block& b, const float* owned) {
  const std::int64_t padded = b.layout.padded;
  Flat full = be_.zeros(padded);
  be_.copy(B::data(full) + b.own_begin, owned, b.own_size);
  if (plan_.zero_stage > 0 && plan_.dp > 1) {
    const std::span<float> all = span_of(full);
    dp_comm_->all_gather(
        all.subspan(static_cast<std::size_t>(b.own_begin), static_cast<std::size_t>(b.own_size)),
        all);
  }
  Buffer host(static_cast<std::size_t>(padded));
  be_.download(B::data(full), padded, host.data());
  return host;
}

template <class B> Checkpoint TrainerCore<B>::checkpoint() {
  const int z = plan_.zero_stage;
  // Full local flat vectors (params, moments) of every block, assembled over data parallelism.
  struct HostFlat {
    Buffer p, m1, m2;
  };
  std::vector<std::vector<HostFlat>> flats;
  for (Chunk& c : chunks_) {
    auto& fc = flats.emplace_back();
    for (Block& b : c.blocks) {
      const auto n = static_cast<std::size_t>(b.layout.padded);
      if (b.alias) { // nothing of its own to save (its one tensor is saved with the embedding)
        fc.push_back({Buffer(n, 0.0f), Buffer(n, 0.0f), Buffer(n, 0.0f)});
        continue;
      }
      HostFlat f;
      if (z == 3) {
        f.p = assemble(b, B::data(b.param_shard));
      } else {
        f.p = Buffer(n);
        be_.download(B::data(b.params), b.layout.padded, f.p.data());
      }
      f.m1 = assemble(b, B::data(b.exp_avg));
      f.m2 = assemble(b, B::data(b.exp_avg_sq));
      fc.push_back(std::move(f));
    }
  }
  Checkpoint ck;
  ck.step = step_count_;
  ck.samples = samples_consumed_;
  ck.seed = opt_.seed;
  ck.model = model_.config.name;
  // Rank 0 collects the data-parallel-rank-0 copy of every (pipeline, tensor) shard.
  std::map<std::string, CheckpointTensor> tensors;
  for (const ParamInfo& p : logical_params(model_)) {
    CheckpointTensor t;
    t.name = p.name;
    t.shape = {p.rows, p.cols};
    if (rank_ == 0) {
      const auto n = static_cast<std::size_t>(p.rows * p.cols);
      t.value.assign(n, 0.0f);
      t.exp_avg.assign(n, 0.0f);
      t.exp_avg_sq.assign(n, 0.0f);
    }
    tensors.emplace(p.name, std::move(t));
  }
  const auto place = [&](const BlockLayout& layout, const float* p, const float* m1,
                         const float* m2) {
    for (const ParamInfo& info : layout.params) {
      if (info.tied_copy)
        continue;
      CheckpointTensor& t = tensors.at(info.name);
      for (std::int64_t i = 0; i < info.local_rows; ++i) {
        for (std::int64_t j = 0; j < info.local_cols; ++j) {
          const auto dst = static_cast<std::size_t>((info.row0 + i) * info.cols + info.col0 + j);
          const std::int64_t src = info.offset + i * info.local_cols + j;
          t.value[dst] = p[src];
          t.exp_avg[dst] = m1[src];
          t.exp_avg_sq[dst] = m2[src];
        }
      }
    }
  };
  for (int pr = 0; pr < plan_.pp; ++pr) {
    for (int tr = 0; tr < plan_.tp; ++tr) {
      const int src = rank_of(plan_, {.dp = 0, .pp = pr, .tp = tr});
      for (int lc = 0; lc < plan_.virtual_stages; ++lc) {
        const int chunk = lc * plan_.pp + pr;
        const auto layouts = chunk_layout(model_, plan_.stages[static_cast<std::size_t>(chunk)],
                                          plan_.tp, tr, plan_.dp);
        for (std::size_t bi = 0; bi < layouts.size(); ++bi) {
          if (rank_ == src && src == 0) {
            const HostFlat& f = flats[static_cast<std::size_t>(lc)][bi];
            place(layouts[bi], f.p.data(), f.m1.data(), f.m2.data());
          } else if (rank_ == src) {
            HostFlat& f = flats[static_cast<std::size_t>(lc)][bi];
            world_->send(f.p, 0, 0);
            world_->send(f.m1, 0, 1);
            world_->send(f.m2, 0, 2);
          } else if (rank_ == 0) {
            const auto n = static_cast<std::size_t>(layouts[bi].padded);
            Buffer p(n, 0.0f), m1(n, 0.0f), m2(n, 0.0f);
            world_->recv({p.data(), n}, src, 0);
            world_->recv({m1.data(), n}, src, 1);
            world_->recv({m2.data(), n}, src, 2);
            place(layouts[bi], p.data(), m1.data(), m2.data());
          }
        }
      }
    }
  }
  if (rank_ == 0) {
    for (const ParamInfo& p : logical_params(model_)) {
      ck.tensors.push_back(std::move(tensors.at(p.name)));
    }
  }
  return ck;
}

template <class B> void TrainerCore<B>::restore(const Checkpoint& ck, const std::string& source) {
  if (ck.model != model_.config.name) {
    throw InputError(source, "model",
                     fmt::format("a checkpoint of model \"{}\"", model_.config.name),
                     fmt::format("\"{}\"", ck.model));
  }
  std::map<std::string, const CheckpointTensor*> by_name;
  for (const CheckpointTensor& t : ck.tensors)
    by_name[t.name] = &t;
  for (const ParamInfo& p : logical_params(model_)) {
    auto it = by_name.find(p.name);
    if (it == by_name.end()) {
      throw InputError(source, "tensors", fmt::format("a tensor named {}", p.name), "none");
    }
    const std::vector<std::int64_t> shape{p.rows, p.cols};
    if (it->second->shape != shape) {
      throw InputError(source, fmt::format("tensors/{}/shape", p.name),
                       fmt::format("[{}, {}]", p.rows, p.cols),
                       fmt::format("{} dimensions", it->second->shape.size()));
    }
  }
  const int z = plan_.zero_stage;
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      const auto n = static_cast<std::size_t>(b.layout.padded);
      Buffer p(n, 0.0f), m1(n, 0.0f), m2(n, 0.0f);
      for (const ParamInfo& info : b.layout.params) {
        const CheckpointTensor& t = *by_name.at(info.name);
        for (std::int64_t i = 0; i < info.local_rows; ++i) {
          for (std::int64_t j = 0; j < info.local_cols; ++j) {
            const auto src = static_cast<std::size_t>((info.row0 + i) * info.cols + info.col0 + j);
            const auto dst = static_cast<std::size_t>(info.offset + i * info.local_cols + j);
            p[dst] = t.value[src];
            m1[dst] = t.exp_avg[src];
            m2[dst] = t.exp_avg_sq[src];
          }
        }
      }
      const auto own = [&](const Buffer& from) {
        return be_.upload(std::span<const float>(from).subspan(
            static_cast<std::size_t>(b.own_begin), static_cast<std::size_t>(b.own_size)));
      };
      if (z == 3)
        b.param_shard = own(p);
      else
        b.params = be_.upload(p);
      b.exp_avg = own(m1);
      b.exp_avg_sq = own(m2);
    }
  }
  step_count_ = ck.step;
  samples_consumed_ = ck.samples;
}

} // namespace parallax::detail
