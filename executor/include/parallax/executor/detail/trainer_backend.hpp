// The backend contract of TrainerCore (trainer_core.hpp): what a backend (CPU: Eigen on host
// memory and MPI; CUDA: device buffers, cuBLASLt and NCCL) provides.
#pragma once

#include "parallax/core/step_program.hpp"
#include "parallax/executor/adamw.hpp"
#include "parallax/executor/trainer.hpp"

#include <chrono>
#include <concepts>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace parallax::detail {

using Ranges = std::vector<std::pair<const float*, std::int64_t>>;

// The backend contract.
//   types   Flat (a flat fp32 buffer), Act (an activation matrix), Cache (what a block keeps
//           from its forward for its backward), Batch (a micro-batch as the model functions
//           read it), Mark (a point in the recorded step: a steady-clock time or a device event)
//   memory  zeros, upload, download (host copy), set_zero; data / size of a Flat, act_size
//   math    add (dst += src), copy, sum_squares (Σ x² over the ranges, in order, in double),
//           adamw
//   comm    group (collectives over the backend's memory); recv_act; send_act (non-blocking,
//           the backend keeps the data alive until finish_sends)
//   model   batch (upload a MicroBatch); the passes of parallax/executor/model.hpp with Act,
//           Cache and Batch in place of Tensor, BlockCache and MicroBatch
//   time    synchronize (all enqueued work done; no-op on the CPU); begin_recording(t0) (the
//           step starts at steady time t0, nothing in flight); mark; seconds(mark) (valid once
//           the step's work is done); reset_peak / peak_bytes (the backend's own accounting)
template <class B>
concept TrainerBackend = requires(B b, typename B::Flat& flat, const typename B::Flat& cflat,
                                  typename B::Act act, const typename B::Act& cact,
                                  typename B::Cache& cache, const typename B::Batch& batch,
                                  typename B::Mark mark, float* p, const float* cp, std::int64_t n,
                                  std::span<const float> host, const Ranges& ranges,
                                  const ops::AdamwHyper& hyper, Communicator& world,
                                  const std::vector<int>& ranks, const std::string& name,
                                  std::chrono::duration<double> timeout, const ExecModel& m,
                                  const BlockBuffers& bb, const TpContext& tp, MicroBatch mb,
                                  KeepMode keep, float scale, double t0) {
  { B::data(cflat) } -> std::same_as<float*>;
  { B::size(cflat) } -> std::convertible_to<std::int64_t>;
  { B::act_size(cact) } -> std::convertible_to<std::int64_t>;
  { b.zeros(n) } -> std::same_as<typename B::Flat>;
  { b.upload(host) } -> std::same_as<typename B::Flat>;
  b.download(cp, n, p);
  b.set_zero(flat);
  b.add(p, cp, n);
  b.copy(p, cp, n);
  { b.sum_squares(ranges) } -> std::same_as<double>;
  b.adamw(p, cp, p, p, n, hyper);
  { b.group(ranks, name, timeout) } -> std::same_as<std::unique_ptr<Communicator>>;
  { b.recv_act(world, 0, 0, n, n) } -> std::same_as<typename B::Act>;
  b.send_act(world, std::move(act), 0, 0);
  b.finish_sends();
  { b.batch(std::move(mb)) } -> std::same_as<typename B::Batch>;
  { b.embedding_forward(m, bb, &bb, tp, batch) } -> std::same_as<typename B::Act>;
  b.embedding_backward(m, bb, &bb, tp, batch, cact);
  { b.layer_forward(m, bb, tp, batch, cact, keep, cache) } -> std::same_as<typename B::Act>;
  b.layer_recompute(m, bb, tp, batch, cache);
  { b.layer_backward(m, bb, tp, batch, cact, cache) } -> std::same_as<typename B::Act>;
  { b.head_forward(m, bb, bb, tp, batch, cact, cache) } -> std::same_as<double>;
  { b.head_backward(m, bb, bb, tp, batch, scale, cache) } -> std::same_as<typename B::Act>;
  b.synchronize();
  b.begin_recording(t0);
  { b.mark() } -> std::same_as<typename B::Mark>;
  { b.seconds(mark) } -> std::same_as<double>;
  b.reset_peak();
  { b.peak_bytes() } -> std::convertible_to<std::int64_t>;
};

} // namespace parallax::detail
