#include "parallax/executor/trainer.hpp"

#include "parallax/core/error.hpp"
#include "parallax/core/memory_policy.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/executor/detail/trainer_core.hpp"
#include "parallax/executor/ops.hpp"
#include "parallax/models/transformer_builder.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace parallax {
namespace {

// The CPU backend of TrainerCore: host buffers tracked by MemoryTracker, Eigen ops, MPI.
struct CpuBackend {
  using Flat = Buffer;
  using Act = Tensor;
  using Cache = BlockCache;
  using Batch = MicroBatch;

  static float* data(const Flat& f) { return const_cast<float*>(f.data()); }
  static std::int64_t size(const Flat& f) { return static_cast<std::int64_t>(f.size()); }
  static std::int64_t act_size(const Act& x) { return x.size(); }

  Flat zeros(std::int64_t n) { return Flat(static_cast<std::size_t>(n), 0.0f); }
  Flat upload(std::span<const float> host) { return Flat(host.begin(), host.end()); }
  void download(const float* src, std::int64_t n, float* host) { std::copy(src, src + n, host); }
  void set_zero(Flat& f) { std::fill(f.begin(), f.end(), 0.0f); }
  void add(float* dst, const float* src, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i)
      dst[i] += src[i];
  }
  void copy(float* dst, const float* src, std::int64_t n) { std::copy(src, src + n, dst); }
  double sum_squares(const detail::Ranges& ranges) {
    double sq = 0;
    for (auto [g, n] : ranges) {
      for (std::int64_t i = 0; i < n; ++i)
        sq += static_cast<double>(g[i]) * g[i];
    }
    return sq;
  }
  void adamw(float* p, const float* g, float* m1, float* m2, std::int64_t n,
             const ops::AdamwHyper& h) {
    ops::adamw_update(p, g, m1, m2, n, ops::adamw_step(h));
  }

  std::unique_ptr<Communicator> group(const std::vector<int>& ranks, const std::string& name,
                                      std::chrono::duration<double> timeout) {
    return mpi_group(ranks, name, timeout);
  }
  Act recv_act(Communicator& world, int src, int tag, Eigen::Index rows, Eigen::Index cols) {
    Tensor x(rows, cols);
    world.recv(x.span(), src, tag);
    return x;
  }
  void send_act(Communicator& world, Act x, int dst, int tag) {
    stash.push_back(std::make_unique<Tensor>(std::move(x)));
    sends.push_back(world.isend(stash.back()->span(), dst, tag));
  }
  void finish_sends() {
    for (CommRequest& r : sends)
      r.wait();
    sends.clear();
    stash.clear();
  }

  Batch batch(MicroBatch mb) { return mb; }
  Act embedding_forward(const ExecModel& m, const BlockBuffers& emb, const BlockBuffers* pos,
                        const TpContext& tp, const Batch& mb) {
    return parallax::embedding_forward(m, emb, pos, tp, mb);
  }
  void embedding_backward(const ExecModel& m, const BlockBuffers& emb, const BlockBuffers* pos,
                          const TpContext& tp, const Batch& mb, const Act& dx) {
    parallax::embedding_backward(m, emb, pos, tp, mb, dx);
  }
  Act layer_forward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp, const Batch& mb,
                    const Act& x, KeepMode keep, Cache& cache) {
    return parallax::layer_forward(m, b, tp, mb, x, keep, cache);
  }
  void layer_recompute(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                       const Batch& mb, Cache& cache) {
    parallax::layer_recompute(m, b, tp, mb, cache);
  }
  Act layer_backward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                     const Batch& mb, const Act& dy, Cache& cache) {
    return parallax::layer_backward(m, b, tp, mb, dy, cache);
  }
  double head_forward(const ExecModel& m, const BlockBuffers& norm, const BlockBuffers& head,
                      const TpContext& tp, const Batch& mb, const Act& x, Cache& cache) {
    return parallax::head_forward(m, norm, head, tp, mb, x, cache);
  }
  Act head_backward(const ExecModel& m, const BlockBuffers& norm, const BlockBuffers& head,
                    const TpContext& tp, const Batch& mb, float loss_scale, Cache& cache) {
    return parallax::head_backward(m, norm, head, tp, mb, loss_scale, cache);
  }

  using Mark = double;
  void synchronize() {}
  void begin_recording(double /*t0*/) {}
  Mark mark() { return steady_seconds(); }
  double seconds(Mark m) { return m; }
  void reset_peak() { MemoryTracker::reset_peak(); }
  std::int64_t peak_bytes() { return MemoryTracker::peak(); }

  // Outputs kept alive while their sends are in flight.
  std::vector<std::unique_ptr<Tensor>> stash;
  std::vector<CommRequest> sends;
};
static_assert(detail::TrainerBackend<CpuBackend>);

} // namespace

void trainer_check_plan(const ExecModel& model, const Plan& plan, int world_size,
                        const std::string& plan_source) {
  if (plan.process_count() != world_size) {
    if (plan.parameter_servers > 0) {
      throw InputError(
          plan_source, "/parameter_servers",
          fmt::format("dp·cp·tp·pp plus parameter_servers equal to the number of processes ({})",
                      world_size),
          fmt::format("{}·{}·{}·{} + {} = {}", plan.dp, plan.cp, plan.tp, plan.pp,
                      plan.parameter_servers, plan.process_count()),
          fmt::format("launch with mpirun -np {}", plan.process_count()));
    }
    throw InputError(
        plan_source, "/dp",
        fmt::format("dp·cp·tp·pp equal to the number of processes ({})", world_size),
        fmt::format("{}·{}·{}·{} = {}", plan.dp, plan.cp, plan.tp, plan.pp, plan.world_size()),
        fmt::format("launch with mpirun -np {}", plan.world_size()));
  }
  // The rest is the one feasibility rule every part of Parallax applies.
  plan_validate(plan, transformer_build_graph(model.config), plan.world_size(), plan_source);
  if (plan.expert_tp() != plan.tp) {
    throw InputError(plan_source, "/etp",
                     fmt::format("0 or tp = {}: the executor splits every expert over the "
                                 "tensor-parallel ranks (etp 1 is planned and simulated)",
                                 plan.tp),
                     std::to_string(plan.etp), "plan with --etp 0 to train");
  }
  if (plan.cp > 1 && model.config.moe.enabled()) {
    throw InputError(plan_source, "/cp",
                     "1 for a mixture of experts (its sequence-wise load-balancing loss needs "
                     "whole sequences on a rank; context parallelism trains dense models)",
                     std::to_string(plan.cp), "plan with --cp 1 to train");
  }
}

Trainer::Trainer(const ExecModel& model, const Plan& plan, const TrainOptions& options,
                 const std::string& plan_source) {
  // Activations are allocated and freed every micro-batch.
  keep_freed_memory();
  impl_ = std::make_unique<detail::TrainerCore<CpuBackend>>(CpuBackend{}, model, plan, options,
                                                            plan_source);
}

Trainer::Trainer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Trainer::~Trainer() = default;

StepStats Trainer::step(bool record) {
  return impl_->step(record);
}

std::int64_t Trainer::steps_done() const {
  return impl_->steps_done();
}

Checkpoint Trainer::checkpoint() {
  return impl_->checkpoint();
}

void Trainer::restore(const Checkpoint& ckpt, const std::string& source) {
  impl_->restore(ckpt, source);
}

Timeline Trainer::timeline() {
  return impl_->timeline();
}

std::vector<StepStats> Trainer::finished_steps() {
  return impl_->finished_steps();
}

void Trainer::drain() {
  impl_->drain();
}

} // namespace parallax
