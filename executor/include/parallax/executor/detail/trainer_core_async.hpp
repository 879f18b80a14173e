// The trainer under the asynchronous parameter server (grad_sync "parameter_server_async"):
// a step pulls an allowed parameter version, runs the program's compute, and pushes its
// gradients; this rank's server shard applies AdamW to its slice of every block as clocks
// complete (executor/async_ps.hpp). Part of TrainerCore (trainer_core.hpp); CPU only.
#pragma once

#include "parallax/executor/detail/trainer_core.hpp"

namespace parallax::detail {

template <TrainerBackend B>
void TrainerCore<B>::ps_update(std::int64_t clock, std::span<const std::span<float>> grad_sum,
                               std::span<const std::span<float>> master, double grad_norm) {
  const double lr = learning_rate(clock);
  const double clip = opt_.clip_grad_norm > 0 && grad_norm > opt_.clip_grad_norm
                          ? opt_.clip_grad_norm / (grad_norm + 1e-6)
                          : 1.0;
  std::size_t i = 0;
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      // The shard's slices, addressed by flat offset like the block's own buffers.
      adamw_block(b, master[i].data() - b.own_begin, grad_sum[i].data() - b.own_begin, lr, clip,
                  clock + 1);
      ++i;
    }
  }
}

template <TrainerBackend B> StepStats TrainerCore<B>::async_step(bool record_step) {
  recording_ = record_step;
  events_.clear();
  marked_.clear();
  be_.reset_peak();
  if (!ps_) {
    std::vector<PsBlock> blocks;
    for (Chunk& c : chunks_) {
      for (Block& b : c.blocks) {
        if (!b.alias)
          blocks.push_back(
              {.params = B::data(b.params), .grads = B::data(b.grads), .padded = b.layout.padded});
      }
    }
    // Dedicated servers: the workers and servers are the world; the synchronous server runs as
    // the k = 0 case (exactly its result).
    const bool dedicated = plan_.parameter_servers > 0;
    const bool async = plan_.grad_sync == GradSync::parameter_server_async;
    ps_ = std::make_unique<AsyncParameterServer>(
        dedicated ? *world_ : *dp_comm_, std::move(blocks),
        AsyncParameterServer::Options{.max_staleness = async ? plan_.max_staleness : 0,
                                      .deterministic = async ? plan_.ps_deterministic : true,
                                      .start_step = step_count_,
                                      .timeout = opt_.comm_timeout,
                                      .workers = plan_.world_size()},
        [this](std::int64_t clock, std::span<const std::span<float>> g,
               std::span<const std::span<float>> m, double norm) { ps_update(clock, g, m, norm); });
  }
  const double start = steady_seconds();
  t0_ = start;
  if (recording_)
    be_.begin_recording(t0_);
  const std::int64_t t = step_count_;
  if (dedicated_server_) {
    // A dedicated server's step: serve until this clock is applied.
    const Mark served_from = mark();
    ps_->serve_until(t + 1);
    record(Stream::dp_comm, Category::dp_comm, "serve shard", -1, -1, served_from, mark());
    resolve_marks();
    step_count_ += 1;
    samples_consumed_ += plan_.global_batch_size;
    recording_ = false;
    StepStats st;
    st.step = step_count_;
    st.lr = learning_rate(t);
    st.step_time_s = steady_seconds() - start;
    st.peak_memory_bytes = be_.peak_bytes();
    return st;
  }
  const Mark pulled_from = mark();
  const std::int64_t version = ps_->pull(t);
  record(Stream::dp_comm, Category::dp_comm, "pull params", -1, -1, pulled_from, mark());
  begin_step_buffers();
  const double global_tokens =
      static_cast<double>(plan_.global_batch_size * model_.config.seq_length);
  std::map<std::int64_t, Batch> batches;
  for (int i = 0; i < static_cast<int>(program_.ops.size()); ++i)
    run_op(i, batches, static_cast<float>(1.0 / global_tokens));
  op_ = -1;
  const Mark pushed_from = mark();
  const double seconds = steady_seconds() - start;
  ps_->push(
      {.loss_sum = loss_sum_, .step_time_s = seconds, .staleness = static_cast<int>(t - version)});
  record(Stream::dp_comm, Category::dp_comm, "push grads", -1, -1, pushed_from, mark());
  resolve_marks();
  step_count_ += 1;
  samples_consumed_ += plan_.global_batch_size;
  // This worker's own figures; every worker's come with finished_steps().
  StepStats st;
  st.step = step_count_;
  st.loss = loss_sum_ / (global_tokens / plan_.dp);
  st.lr = learning_rate(t);
  st.step_time_s = seconds;
  st.tokens_per_s = global_tokens / plan_.dp / seconds;
  st.peak_memory_bytes = be_.peak_bytes();
  st.staleness = static_cast<int>(t - version);
  recording_ = false;
  return st;
}

template <TrainerBackend B> StepStats TrainerCore<B>::stats_of(const PsClockReport& r) {
  const double global_tokens =
      static_cast<double>(plan_.global_batch_size * model_.config.seq_length);
  StepStats st;
  st.step = r.clock + 1;
  st.loss = r.loss_sum / global_tokens;
  st.grad_norm = r.grad_norm;
  st.lr = learning_rate(r.clock);
  // The slowest worker's step: what the clock took.
  st.step_time_s = r.max_step_time_s;
  st.tokens_per_s = r.max_step_time_s > 0 ? global_tokens / r.max_step_time_s : 0.0;
  st.mfu =
      model_flops_utilization(flops_per_sequence_, static_cast<double>(plan_.global_batch_size),
                              r.max_step_time_s, plan_.world_size(), opt_.peak_flops_per_rank);
  st.peak_memory_bytes = be_.peak_bytes();
  st.staleness = r.max_staleness;
  return st;
}

template <TrainerBackend B> std::vector<StepStats> TrainerCore<B>::finished_steps() {
  if (ps_ && rank_ == 0) {
    for (const PsClockReport& r : ps_->take_completed())
      finished_.push_back(stats_of(r));
  }
  std::vector<StepStats> out;
  out.swap(finished_);
  return out;
}

template <TrainerBackend B> void TrainerCore<B>::drain() {
  if (ps_)
    ps_->drain(step_count_);
}

} // namespace parallax::detail
