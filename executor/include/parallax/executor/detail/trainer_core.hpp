// The trainer's backend-independent core: it runs the rank's step program (core/
// step_program: the one statement of the step's op order, shared with the simulator) op by op —
// pipeline messages, ZeRO 0–3 gathers and reductions, tied embeddings, sequence-parallel
// gradient sums, gradient clipping, AdamW — plus the learning-rate schedule, checkpoints and
// the measured timeline, written once over a backend B that owns the memory and the
// arithmetic. The CPU backend (Eigen, host memory, MPI) is in executor/src/trainer.cpp; the
// CUDA backend (device memory, cuBLASLt and own kernels, NCCL) in
// executor/cuda/src/trainer_cuda.cpp. Both instantiate TrainerCore<B> behind the Trainer
// facade, so every schedule and ZeRO test of the CPU trainer exercises this code.
//
// The parts: this file (the class, construction, events), trainer_core_ops.hpp (the ops and
// the step), trainer_core_update.hpp (gradient sums, norm, AdamW, publish) and
// trainer_core_checkpoint.hpp (checkpoints and the gathered timeline).
//
// What the executor decides beside the program: ZeRO-3 frees a block's gathered parameters
// after each compute op; ZeRO-2/3 keep at most kReduceScatterWindow full gradient buffers in
// flight; a reduction's measured event spans its launch to the wait that finished it.
//
// What a backend provides is the TrainerBackend concept below; every pointer in it points
// into the backend's memory (host or device).
#pragma once

#include "parallax/core/error.hpp"
#include "parallax/core/layer_graph.hpp"
#include "parallax/core/pipeline_schedule.hpp"
#include "parallax/core/step_program.hpp"
#include "parallax/core/timeline_json.hpp"
#include "parallax/executor/adamw.hpp"
#include "parallax/executor/async_ps.hpp"
#include "parallax/executor/detail/trainer_backend.hpp"
#include "parallax/executor/grad_compression.hpp"
#include "parallax/executor/trainer.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <concepts>
#include <deque>
#include <map>
#include <memory>
#include <numbers>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace parallax::detail {

template <TrainerBackend B> class TrainerCore final : public Trainer::Impl {
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
  std::vector<StepStats> finished_steps() override;
  void drain() override;

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
    int reduce_op = -1; // the program's reduce op in flight, and when it was launched
    Mark reduce_start{};
    // The LM head's tied embedding when the embedding lives on the same rank: no storage of
    // its own, it reads and writes the embedding block's buffers.
    Block* alias = nullptr;
    // The ranks holding the same parameters, over which gradients reduce and ZeRO shards: the
    // dp·cp ranks, or for an experts block the dp·cp / ep ranks holding its experts.
    Communicator* comm = nullptr;
    // The plan's gradient compression of this block's all-reduce, with its state (CPU only).
    std::unique_ptr<GradCompressor> compressor;

    BlockBuffers buffers() const {
      const Block& s = alias ? *alias : *this;
      return {.layout = &layout, .params = B::data(s.params), .grads = B::data(s.grads)};
    }
    // A layer's buffers with its experts block (the next block, when it is one).
    BlockBuffers buffers(const Block* experts) const {
      BlockBuffers b = buffers();
      if (experts != nullptr) {
        b.experts_layout = &experts->layout;
        b.experts_params = B::data(experts->params);
        b.experts_grads = B::data(experts->grads);
      }
      return b;
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
    return rank_of(plan_,
                   {.dp = me_.dp, .pp = chunk_pp_rank(plan_, chunk), .tp = me_.tp, .cp = me_.cp});
  }
  int tag(int chunk, std::int64_t mb, int dir) const {
    return static_cast<int>((static_cast<std::int64_t>(chunk) * m_ + mb) * 2 + dir);
  }
  MicroBatch micro_batch(std::int64_t k) const;

  // ZeRO-3: the block's full parameters, all-gathered (a local copy when dp = 1) unless
  // present; `op` names the event when a gather op asked for it.
  void gather_params(Block& blk, const StepOp* op = nullptr);
  void release_params(Block& b) {
    if (plan_.zero_stage == 3)
      storage(b).params = Flat();
  }
  void finish_reduction(Block& b);
  void prepare_grads(Block& blk);
  bool shared_with_head(const Block& emb) const;
  void launch_reduction(Block& b, std::int64_t k, int op);
  void accumulate_local(Block& b);

  Act receive(int chunk_from, std::int64_t k, int dir, Eigen::Index rows);
  void send(Act x, int chunk_to, int chunk_from, std::int64_t k, int dir);
  Eigen::Index local_rows() const {
    const Eigen::Index n = plan_.micro_batch_size * model_.config.seq_length / plan_.cp;
    return plan_.sequence_parallel ? n / plan_.tp : n;
  }
  KeepMode keep_mode() const;
  // The local indices of the blocks of `unit` in local chunk `lc`, in model order.
  const std::vector<std::size_t>& unit_blocks(int lc, int unit) const;

  // The step program's ops.
  void run_op(int i, std::map<std::int64_t, Batch>& batches, float loss_scale);
  void wait_for(const StepOp& op);
  void forward_unit(const StepOp& op, const Batch& mb);
  void recompute_unit(const StepOp& op, const Batch& mb);
  void backward_unit(const StepOp& op, const Batch& mb, float loss_scale);
  void optimizer_op(const StepOp& op);

  double learning_rate(std::int64_t step) const;
  template <class F> static void for_owned(const Block& b, F&& f);
  Block* find_block(BlockKind kind);
  // The experts block of the layer at ch.blocks[i] (the block after it), or null.
  static Block* experts_of(Chunk& ch, std::size_t i) {
    return i + 1 < ch.blocks.size() && ch.blocks[i + 1].layout.kind == BlockKind::experts
               ? &ch.blocks[i + 1]
               : nullptr;
  }
  void embedding_sync();
  void sp_sync();
  double gradient_norm();
  bool parameter_server() const { return plan_.grad_sync == GradSync::parameter_server; }
  // The asynchronous parameter server (trainer_core_async.hpp); it also runs the synchronous
  // server with dedicated server processes, as its k = 0 case.
  bool async_server() const { return plan_.async_ps() || plan_.parameter_servers > 0; }
  // The multiple every block is padded to: the data-parallel shards and any server shards.
  int layout_shards() const {
    return plan_.parameter_servers > 0 ? std::lcm(plan_.dp_cp(), plan_.parameter_servers)
                                       : plan_.dp_cp();
  }
  StepStats async_step(bool record);
  void ps_update(std::int64_t clock, std::span<const std::span<float>> grad_sum,
                 std::span<const std::span<float>> master, double grad_norm);
  StepStats stats_of(const PsClockReport& r);
  void adamw(double lr, double clip_coef);
  void adamw_block(const Block& b, float* p, float* g, double lr, double clip_coef,
                   std::int64_t step);
  void begin_step_buffers();
  void publish_params(StepCollective how);
  // The full local flat buffer of an owned slice, assembled over data parallelism, on the host.
  Buffer assemble(const Block& b, const float* owned);

  B be_;
  ExecModel model_;
  Plan plan_;
  TrainOptions opt_;
  std::unique_ptr<TokenSource> data_;

  std::unique_ptr<Communicator> world_; // MPI: host values, pipeline messages, checkpoints
  std::unique_ptr<Communicator> tp_comm_;
  // The dp·cp ranks holding the same parameters: gradient reductions, ZeRO shards, publishes.
  std::unique_ptr<Communicator> dp_comm_;
  std::unique_ptr<Communicator> cp_comm_;    // context parallelism (null when cp = 1)
  std::unique_ptr<Communicator> ep_comm_;    // expert parallelism (null when ep = 1)
  std::unique_ptr<Communicator> edp_comm_;   // the ranks holding my experts (null when ep = 1)
  std::unique_ptr<Communicator> embed_comm_; // first and last pipeline rank (tied embeddings)
  RankCoords me_;
  int rank_ = 0;
  // A dedicated parameter-server process (rank >= plan.world_size()): it holds the model's
  // layout like data-parallel rank 0, serves its shard and computes nothing.
  bool dedicated_server_ = false;
  // This rank's index among the dp·cp ranks holding its parameters (its ZeRO shard).
  int replica_ = 0;
  std::int64_t m_ = 1;        // micro-batches per replica
  std::vector<Chunk> chunks_; // local chunks, by local index
  // [local chunk][unit − chunk's first unit]: the unit's block indices.
  std::vector<std::vector<std::vector<std::size_t>>> unit_blocks_;
  StepProgram program_;
  std::int64_t step_count_ = 0;
  std::unique_ptr<AsyncParameterServer> ps_; // built at the first step (after any restore)
  std::vector<StepStats> finished_;          // for finished_steps()
  std::int64_t samples_consumed_ = 0;        // global samples of the steps done (the data position)
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
  // The activation (forward) or its gradient (backward) between the unit ops of one chunk
  // and micro-batch, by (global chunk, micro-batch).
  std::map<std::pair<int, std::int64_t>, Act> flowing_;
  std::vector<std::vector<Block*>> launched_; // per program op: blocks whose reduction it began
  int op_ = -1;                               // the op running (it names the TP events)
  // ZeRO-2/3: blocks whose gradient reduce-scatter is in flight, oldest first. At most
  // kReduceScatterWindow full-size gradient buffers are alive at once.
  static constexpr std::size_t kReduceScatterWindow = 2;
  std::deque<Block*> scattering_;
  double loss_sum_ = 0;
  double grad_norm_ = 0; // of the step's optimizer op
  double lr_ = 0;
};

// ---- construction ----

template <TrainerBackend B>
TrainerCore<B>::TrainerCore(B backend, const ExecModel& model, const Plan& plan,
                            const TrainOptions& options, const std::string& plan_source)
    : be_(std::move(backend)), model_(model), plan_(plan), opt_(options) {
  world_ = mpi_world(options.comm_timeout);
  rank_ = world_->rank();
  trainer_check_plan(model, plan, world_->size(), plan_source);
  dedicated_server_ = rank_ >= plan.world_size();
  const int coord_rank = dedicated_server_ ? 0 : rank_;
  PARALLAX_CHECK(static_cast<int>(plan.stages.size()) == plan.pp * plan.virtual_stages,
                 "the trainer needs the plan's stage ranges");
  const ModelConfig& c = model.config;
  me_ = rank_coords(plan, coord_rank);
  m_ = plan.microbatches_of(me_.dp); // this replica's (dp_shares may make them uneven)
  // Pipeline messages go point to point over the world communicator (any two chunks' ranks).
  // A dedicated server joins no worker group (tp = pp = cp = 1 there): groups of itself.
  tp_comm_ = be_.group(dedicated_server_ ? std::vector<int>{rank_} : tp_group(plan, rank_), "tp",
                       options.comm_timeout);
  dp_comm_ = be_.group(dedicated_server_ ? std::vector<int>{rank_} : dp_cp_group(plan, rank_), "dp",
                       options.comm_timeout);
  replica_ = me_.dp * plan.cp + me_.cp;
  if (plan.cp > 1) {
    cp_comm_ = be_.group(cp_group(plan, rank_), "cp", options.comm_timeout);
  }
  if (plan.ep > 1) {
    ep_comm_ = be_.group(ep_group(plan, rank_), "ep", options.comm_timeout);
    edp_comm_ = be_.group(expert_dp_group(plan, rank_), "expert-dp", options.comm_timeout);
  }
  if (c.tied_embeddings && plan.pp > 1 && (me_.pp == 0 || me_.pp == plan.pp - 1)) {
    embed_comm_ =
        be_.group({rank_of(plan, {.dp = me_.dp, .pp = 0, .tp = me_.tp, .cp = me_.cp}),
                   rank_of(plan, {.dp = me_.dp, .pp = plan.pp - 1, .tp = me_.tp, .cp = me_.cp})},
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
    for (BlockLayout& layout : chunk_layout(model, ch.units, plan.tp, me_.tp, layout_shards(),
                                            plan.ep, replica_ % plan.ep)) {
      Block b;
      b.layout = std::move(layout);
      const bool experts = b.layout.kind == BlockKind::experts && plan.ep > 1;
      b.comm = experts ? edp_comm_.get() : dp_comm_.get();
      const std::int64_t padded = b.layout.padded;
      // ZeRO and the asynchronous server's shards: each rank owns 1/dp of every block.
      const bool sharded = z > 0 || async_server();
      b.own_size = sharded ? padded / b.comm->size() : padded;
      b.own_begin = sharded ? b.own_size * b.comm->rank() : 0;
      if (plan.parameter_servers > 0) { // the servers own the state, the workers none of it
        b.own_size = dedicated_server_ ? padded / plan.parameter_servers : 0;
        b.own_begin = dedicated_server_ ? b.own_size * (rank_ - plan.world_size()) : 0;
      }
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
      if (plan.grad_compression.enabled() && b.comm->size() > 1) {
        // The same Q factors on every rank of the block's group: drawn from the block's place.
        const auto place = static_cast<std::uint64_t>(b.layout.unit) * 8 +
                           static_cast<std::uint64_t>(b.layout.kind);
        b.compressor = std::make_unique<GradCompressor>(plan.grad_compression, plan.error_feedback,
                                                        b.layout, options.seed * 1000003 + place);
      }
      ch.blocks.push_back(std::move(b));
    }
    chunks_.push_back(std::move(ch));
  }
  unit_blocks_.resize(chunks_.size());
  for (std::size_t lc = 0; lc < chunks_.size(); ++lc) {
    const Chunk& ch = chunks_[lc];
    unit_blocks_[lc].resize(static_cast<std::size_t>(ch.units.second - ch.units.first));
    for (std::size_t i = 0; i < ch.blocks.size(); ++i) {
      unit_blocks_[lc][static_cast<std::size_t>(ch.blocks[i].layout.unit - ch.units.first)]
          .push_back(i);
    }
  }
  // The executor regathers ZeRO-3 parameters for the backward (it frees them after each op).
  program_ = step_program(
      replica_plan(plan, me_.dp),
      {.units = c.num_layers, .tied_embeddings = c.tied_embeddings, .reshard_after_forward = true},
      coord_rank);
  launched_.resize(program_.ops.size());
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

template <TrainerBackend B> TpContext TrainerCore<B>::tp() {
  TpContext t{.comm = tp_comm_.get(), .sequence_parallel = plan_.sequence_parallel};
  t.cp_comm = cp_comm_.get();
  t.cp_ring = plan_.cp_comm == CpComm::p2p;
  t.ep_comm = ep_comm_.get();
  if (recording_) {
    // Named after the op they run in, as the simulator names an op's TP collective.
    t.on_comm = [this](const char* /*what*/, double s, double e, double bytes) {
      const StepOp& op = program_.ops[static_cast<std::size_t>(op_)];
      record_host(Stream::tp_comm, Category::tp_comm, op.name() + " tp", op.unit, op.micro_batch, s,
                  e, bytes);
    };
  }
  return t;
}

template <TrainerBackend B>
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

template <TrainerBackend B>
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
template <TrainerBackend B> void TrainerCore<B>::resolve_marks() {
  for (Marked& m : marked_) {
    m.event.start_s = be_.seconds(m.start) - t0_;
    m.event.end_s = be_.seconds(m.end) - t0_;
    events_.push_back(std::move(m.event));
  }
  marked_.clear();
}

template <TrainerBackend B>
const std::vector<std::size_t>& TrainerCore<B>::unit_blocks(int lc, int unit) const {
  const Chunk& ch = chunks_[static_cast<std::size_t>(lc)];
  return unit_blocks_[static_cast<std::size_t>(lc)]
                     [static_cast<std::size_t>(unit - ch.units.first)];
}

template <TrainerBackend B> KeepMode TrainerCore<B>::keep_mode() const {
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

} // namespace parallax::detail

#include "parallax/executor/detail/trainer_core_async.hpp"
#include "parallax/executor/detail/trainer_core_checkpoint.hpp"
#include "parallax/executor/detail/trainer_core_data.hpp"
#include "parallax/executor/detail/trainer_core_ops.hpp"
#include "parallax/executor/detail/trainer_core_update.hpp"
