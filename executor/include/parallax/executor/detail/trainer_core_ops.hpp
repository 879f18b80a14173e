// The trainer's step-program ops: ZeRO parameter gathers and gradient reductions, pipeline
// messages, the forward / recompute / backward of a unit's blocks, and the step that runs the
// rank's program. Part of TrainerCore (trainer_core.hpp).
#pragma once

#include "parallax/executor/detail/trainer_core.hpp"

namespace parallax::detail {

// ---- parameters and ZeRO ----

template <TrainerBackend B> void TrainerCore<B>::gather_params(Block& blk, const StepOp* op) {
  if (plan_.zero_stage != 3)
    return;
  Block& b = storage(blk);
  if (B::size(b.params) > 0)
    return; // gathered by the op's gather
  const Mark s = mark();
  b.params = be_.zeros(b.layout.padded);
  if (b.comm->size() == 1) {
    be_.copy(B::data(b.params), B::data(b.param_shard), B::size(b.param_shard));
  } else {
    b.comm->all_gather(span_of(b.param_shard), span_of(b.params));
  }
  if (op) {
    record(Stream::dp_comm, Category::dp_comm, op->name(), op->unit, op->micro_batch, s, mark(), 0,
           static_cast<double>(b.layout.padded) * sizeof(float));
  }
}

// A block's reduction in flight: wait for it (ZeRO-2/3: add the reduced slice to the owned
// gradients and free the full buffer). Its event spans launch to completion.
template <TrainerBackend B> void TrainerCore<B>::finish_reduction(Block& b) {
  if (b.rs_pending) {
    scattering_.erase(std::find(scattering_.begin(), scattering_.end(), &b));
    b.pending.wait();
    if (plan_.zero_stage >= 2) {
      // The micro-batch's reduced shard adds to the owned gradients; the full buffer goes.
      be_.add(B::data(b.grad_shard), B::data(b.rs_out), B::size(b.grad_shard));
      b.grads = Flat();
    } else {
      // ZeRO-1: the step's reduced shard replaces the owned slice of the full gradients.
      be_.copy(b.owned_grads(plan_.zero_stage), B::data(b.rs_out), b.own_size);
    }
    b.rs_out = Flat();
    b.rs_pending = false;
  } else if (b.pending.pending()) {
    b.pending.wait();
  } else {
    return;
  }
  const StepOp& op = program_.ops[static_cast<std::size_t>(b.reduce_op)];
  record(Stream::dp_comm, Category::dp_comm, op.name(), op.unit, op.micro_batch, b.reduce_start,
         mark(), 0, static_cast<double>(b.layout.padded) * sizeof(float));
  b.reduce_op = -1;
}

// Before a block's backward: make sure its gradient buffer exists and is free.
template <TrainerBackend B> void TrainerCore<B>::prepare_grads(Block& blk) {
  if (plan_.zero_stage < 2)
    return;
  Block& b = storage(blk);
  finish_reduction(b);
  b.grads = be_.zeros(b.layout.padded);
}

// The embedding shares its gradient buffer with a tied head on this rank: the head's backward,
// earlier in the same micro-batch, already prepared it.
template <TrainerBackend B> bool TrainerCore<B>::shared_with_head(const Block& emb) const {
  for (const Chunk& c : chunks_) {
    for (const Block& b : c.blocks) {
      if (b.alias == &emb)
        return true;
    }
  }
  return false;
}

// ZeRO-2/3 without data parallelism: the micro-batch's gradients go straight to the owned ones.
template <TrainerBackend B> void TrainerCore<B>::accumulate_local(Block& b) {
  if (plan_.zero_stage < 2 || plan_.dp_cp() > 1 || b.alias)
    return;
  be_.add(B::data(b.grad_shard), B::data(b.grads), B::size(b.grad_shard));
  b.grads = Flat();
}

// The program's reduce op `op` for one block, launched as soon as its gradients are ready.
template <TrainerBackend B>
void TrainerCore<B>::launch_reduction(Block& b, std::int64_t /*k*/, int op) {
  b.reduce_op = op;
  b.reduce_start = mark();
  launched_[static_cast<std::size_t>(op)].push_back(&b);
  switch (program_.ops[static_cast<std::size_t>(op)].collective) {
  case StepCollective::reduce_scatter:
    b.rs_out = be_.zeros(b.own_size);
    b.pending = b.comm->ireduce_scatter_sum(span_of(b.grads), span_of(b.rs_out));
    b.rs_pending = true;
    scattering_.push_back(&b);
    while (plan_.zero_stage >= 2 && scattering_.size() > kReduceScatterWindow) {
      finish_reduction(*scattering_.front()); // ZeRO-2/3: bounded full-size buffers
    }
    break;
  case StepCollective::reduce_to_root: // a parameter server: data-parallel rank 0 updates
    b.pending = b.comm->ireduce_sum(span_of(b.grads), 0);
    break;
  case StepCollective::all_reduce:
    if (b.compressor && step_count_ >= plan_.compression_warmup_steps) {
      // Compressed: its collectives run to completion here (the next op waits anyway).
      const double bytes = b.compressor->all_reduce(*b.comm, span_of(b.grads));
      const StepOp& o = program_.ops[static_cast<std::size_t>(op)];
      record(Stream::dp_comm, Category::dp_comm, o.name(), o.unit, o.micro_batch, b.reduce_start,
             mark(), 0, bytes);
      b.reduce_op = -1;
      break;
    }
    b.pending = b.comm->iall_reduce_sum(span_of(b.grads));
    break;
  default:
    PARALLAX_CHECK(false, "a gradient reduction with no reducing collective");
  }
}

// ---- pipeline ----

template <TrainerBackend B>
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
  return be_.recv_act(*world_, src, t, rows, model_.config.hidden_size);
}

template <TrainerBackend B>
void TrainerCore<B>::send(Act x, int chunk_to, int chunk_from, std::int64_t k, int dir) {
  const int t = tag(chunk_from, k, dir);
  const int dst = chunk_rank(chunk_to);
  if (dst == rank_) {
    mailbox_.emplace(t, std::move(x));
    return;
  }
  be_.send_act(*world_, std::move(x), dst, t);
}

// ---- the unit ops ----

// A unit's forward: its blocks in model order (the embedding with the learned positions, the
// layer, the final norm with the LM head and loss).
template <TrainerBackend B> void TrainerCore<B>::forward_unit(const StepOp& op, const Batch& mb) {
  const int lc = op.chunk / plan_.pp;
  Chunk& ch = chunks_[static_cast<std::size_t>(lc)];
  const std::int64_t k = op.micro_batch;
  auto& cache = caches_[static_cast<std::size_t>(lc)][static_cast<std::size_t>(k)];
  if (op.unit == ch.units.first) {
    cache.clear(); // caches hold move-only device tensors: no assign(n, value)
    cache.resize(ch.blocks.size());
  }
  const TpContext tpc = tp();
  Act& x = flowing_[{op.chunk, k}];
  const Mark s = mark();
  for (std::size_t i : unit_blocks(lc, op.unit)) {
    Block& b = ch.blocks[i];
    switch (b.layout.kind) {
    case BlockKind::embedding: {
      Block* pos = i + 1 < ch.blocks.size() && ch.blocks[i + 1].layout.kind == BlockKind::positions
                       ? &ch.blocks[i + 1]
                       : nullptr;
      gather_params(b);
      if (pos)
        gather_params(*pos);
      const BlockBuffers eb = b.buffers();
      const BlockBuffers pb = pos ? pos->buffers() : BlockBuffers{};
      x = be_.embedding_forward(model_, eb, pos ? &pb : nullptr, tpc, mb);
      release_params(b);
      if (pos)
        release_params(*pos);
      break;
    }
    case BlockKind::layer: {
      Block* experts = experts_of(ch, i);
      gather_params(b);
      if (experts)
        gather_params(*experts);
      x = be_.layer_forward(model_, b.buffers(experts), tpc, mb, x, keep_mode(), cache[i]);
      release_params(b);
      if (experts)
        release_params(*experts);
      break;
    }
    case BlockKind::experts:
      break; // run with their layer
    case BlockKind::final_norm: {
      Block& head = ch.blocks[i + 1];
      gather_params(b);
      gather_params(head);
      const double loss =
          be_.head_forward(model_, b.buffers(), head.buffers(), tpc, mb, x, cache[i]);
      release_params(b);
      release_params(head);
      if (me_.tp == 0)
        loss_sum_ += loss;
      flowing_.erase({op.chunk, k});
      break;
    }
    case BlockKind::positions:
    case BlockKind::head:
      break; // run with the embedding / the final norm
    }
  }
  record(Stream::compute, Category::forward, op.name(), op.unit, static_cast<int>(k), s, mark());
}

// Full recomputation: the unit's transformer layer reruns its forward before its backward (the
// embedding, final norm and head keep their activations).
template <TrainerBackend B> void TrainerCore<B>::recompute_unit(const StepOp& op, const Batch& mb) {
  const int lc = op.chunk / plan_.pp;
  Chunk& ch = chunks_[static_cast<std::size_t>(lc)];
  auto& cache = caches_[static_cast<std::size_t>(lc)][static_cast<std::size_t>(op.micro_batch)];
  const TpContext tpc = tp();
  const Mark s = mark();
  for (std::size_t i : unit_blocks(lc, op.unit)) {
    Block& b = ch.blocks[i];
    if (b.layout.kind != BlockKind::layer)
      continue;
    Block* experts = experts_of(ch, i);
    gather_params(b);
    if (experts)
      gather_params(*experts);
    be_.layer_recompute(model_, b.buffers(experts), tpc, mb, cache[i]);
  }
  record(Stream::compute, Category::recompute, op.name(), op.unit, op.micro_batch, s, mark());
}

// A unit's backward: its blocks in reverse model order.
template <TrainerBackend B>
void TrainerCore<B>::backward_unit(const StepOp& op, const Batch& mb, float loss_scale) {
  const int lc = op.chunk / plan_.pp;
  Chunk& ch = chunks_[static_cast<std::size_t>(lc)];
  const std::int64_t k = op.micro_batch;
  auto& cache = caches_[static_cast<std::size_t>(lc)][static_cast<std::size_t>(k)];
  const TpContext tpc = tp();
  Act dy;
  if (auto it = flowing_.find({op.chunk, k}); it != flowing_.end()) {
    dy = std::move(it->second);
    flowing_.erase(it);
  }
  const Mark s = mark();
  const std::vector<std::size_t>& blocks = unit_blocks(lc, op.unit);
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    const std::size_t i = *it;
    Block& b = ch.blocks[i];
    switch (b.layout.kind) {
    case BlockKind::head: {
      Block& norm = ch.blocks[i - 1];
      gather_params(norm);
      gather_params(b);
      prepare_grads(norm);
      prepare_grads(b);
      dy =
          be_.head_backward(model_, norm.buffers(), b.buffers(), tpc, mb, loss_scale, cache[i - 1]);
      release_params(norm);
      release_params(b);
      accumulate_local(b);
      accumulate_local(norm);
      break;
    }
    case BlockKind::layer: {
      Block* experts = experts_of(ch, i);
      gather_params(b);
      prepare_grads(b);
      if (experts) {
        gather_params(*experts);
        prepare_grads(*experts);
      }
      dy = be_.layer_backward(model_, b.buffers(experts), tpc, mb, dy, cache[i]);
      release_params(b);
      accumulate_local(b);
      if (experts) {
        release_params(*experts);
        accumulate_local(*experts);
      }
      break;
    }
    case BlockKind::experts:
      break; // run with their layer
    case BlockKind::embedding: {
      Block* pos = i + 1 < ch.blocks.size() && ch.blocks[i + 1].layout.kind == BlockKind::positions
                       ? &ch.blocks[i + 1]
                       : nullptr;
      gather_params(b);
      if (!shared_with_head(b))
        prepare_grads(b);
      if (pos) {
        gather_params(*pos);
        prepare_grads(*pos);
      }
      const BlockBuffers eb = b.buffers();
      const BlockBuffers pb = pos ? pos->buffers() : BlockBuffers{};
      be_.embedding_backward(model_, eb, pos ? &pb : nullptr, tpc, mb, dy);
      dy = Act();
      release_params(b);
      if (pos) {
        release_params(*pos);
        accumulate_local(*pos);
      }
      accumulate_local(b);
      break;
    }
    case BlockKind::final_norm:
    case BlockKind::positions:
      break; // run with the head / the embedding
    }
  }
  record(Stream::compute, Category::backward, op.name(), op.unit, static_cast<int>(k), s, mark());
  if (op.unit == ch.units.first) {
    cache.clear();
  }
  if (!(ch.first() && op.unit == 0)) {
    flowing_[{op.chunk, k}] = std::move(dy);
  }
}

// ---- the program ----

// Waits for the reductions of the reduce ops `op` depends on (the executor runs every other op
// in program order, so those are done).
template <TrainerBackend B> void TrainerCore<B>::wait_for(const StepOp& op) {
  for (int a : op.after) {
    for (Block* b : launched_[static_cast<std::size_t>(a)])
      finish_reduction(*b);
    launched_[static_cast<std::size_t>(a)].clear();
  }
}

template <TrainerBackend B>
void TrainerCore<B>::run_op(int i, std::map<std::int64_t, Batch>& batches, float loss_scale) {
  const StepOp& op = program_.ops[static_cast<std::size_t>(i)];
  op_ = i;
  if (ps_) {
    // The asynchronous server: gradients are pushed, and the update and the new parameters
    // come from the servers, after the step's ops; meanwhile this rank's shard is served.
    ps_->progress();
    if (op.kind == StepOpKind::reduce || op.kind == StepOpKind::optimizer ||
        op.kind == StepOpKind::publish)
      return;
  }
  wait_for(op);
  const auto batch = [&]() -> const Batch& {
    auto it = batches.find(op.micro_batch);
    if (it == batches.end())
      it = batches.emplace(op.micro_batch, be_.batch(micro_batch(op.micro_batch))).first;
    return it->second;
  };
  const int lc = op.chunk / plan_.pp;
  switch (op.kind) {
  case StepOpKind::gather:
    for (std::size_t b : unit_blocks(lc, op.unit))
      gather_params(chunks_[static_cast<std::size_t>(lc)].blocks[b], &op);
    break;
  case StepOpKind::forward:
    forward_unit(op, batch());
    break;
  case StepOpKind::recompute:
    recompute_unit(op, batch());
    break;
  case StepOpKind::backward:
    backward_unit(op, batch(), loss_scale);
    break;
  case StepOpKind::send: {
    const Mark s = mark();
    auto it = flowing_.find({op.chunk, op.micro_batch});
    PARALLAX_CHECK(it != flowing_.end(), "a pipeline send with nothing to send");
    const double bytes = static_cast<double>(B::act_size(it->second)) * sizeof(float);
    send(std::move(it->second), op.peer_chunk, op.chunk, op.micro_batch, op.activation() ? 0 : 1);
    flowing_.erase(it);
    record(Stream::pp_comm, Category::pp_comm, op.name(), op.unit, op.micro_batch, s, mark(), 0,
           bytes);
    break;
  }
  case StepOpKind::recv: {
    const Mark s = mark();
    Act x = receive(op.peer_chunk, op.micro_batch, op.activation() ? 0 : 1, local_rows());
    const double bytes = static_cast<double>(B::act_size(x)) * sizeof(float);
    flowing_[{op.chunk, op.micro_batch}] = std::move(x);
    record(Stream::pp_comm, Category::pp_comm, op.name(), op.unit, op.micro_batch, s, mark(), 0,
           bytes);
    break;
  }
  case StepOpKind::reduce:
    for (std::size_t b : unit_blocks(lc, op.unit)) {
      Block& blk = chunks_[static_cast<std::size_t>(lc)].blocks[b];
      if (!blk.alias) // a tied head on this rank is reduced with the embedding
        launch_reduction(blk, op.micro_batch, i);
    }
    break;
  case StepOpKind::optimizer:
    optimizer_op(op);
    break;
  case StepOpKind::embedding_sync:
  case StepOpKind::sp_sync:
  case StepOpKind::publish: {
    const Mark s = mark();
    if (op.kind == StepOpKind::embedding_sync)
      embedding_sync();
    else if (op.kind == StepOpKind::sp_sync)
      sp_sync();
    else
      publish_params(op.collective);
    record(op.stream(), op.category(), op.name(), op.unit, -1, s, mark());
    break;
  }
  }
}

template <TrainerBackend B> void TrainerCore<B>::optimizer_op(const StepOp& op) {
  be_.finish_sends();
  grad_norm_ = gradient_norm();
  lr_ = learning_rate(step_count_);
  const double clip = opt_.clip_grad_norm > 0 && grad_norm_ > opt_.clip_grad_norm
                          ? opt_.clip_grad_norm / (grad_norm_ + 1e-6)
                          : 1.0;
  const Mark s = mark();
  adamw(lr_, clip);
  record(Stream::compute, Category::optimizer, op.name(), -1, -1, s, mark());
}

// ---- step ----

template <TrainerBackend B> StepStats TrainerCore<B>::step(bool record_step) {
  if (async_server())
    return async_step(record_step);
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

  begin_step_buffers();
  const double global_tokens =
      static_cast<double>(plan_.global_batch_size * model_.config.seq_length);
  const float loss_scale = static_cast<float>(1.0 / global_tokens);

  std::map<std::int64_t, Batch> batches;
  for (int i = 0; i < static_cast<int>(program_.ops.size()); ++i) {
    run_op(i, batches, loss_scale);
  }
  op_ = -1;
  be_.finish_sends();
  PARALLAX_CHECK(mailbox_.empty() && flowing_.empty(), "pipeline messages left undelivered");
  PARALLAX_CHECK(scattering_.empty(), "gradient reductions left in flight");
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
  st.grad_norm = grad_norm_;
  st.lr = lr_;
  st.step_time_s = maxes[0];
  st.tokens_per_s = global_tokens / maxes[0];
  st.mfu =
      model_flops_utilization(flops_per_sequence_, static_cast<double>(plan_.global_batch_size),
                              maxes[0], plan_.world_size(), opt_.peak_flops_per_rank);
  st.peak_memory_bytes = static_cast<std::int64_t>(maxes[1]);
  recording_ = false;
  if (rank_ == 0)
    finished_.push_back(st);
  return st;
}

} // namespace parallax::detail
