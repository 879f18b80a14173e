// The trainer on GPUs: the same TrainerCore as the CPU trainer (pipeline schedules, ZeRO 0–3,
// gradient buckets, checkpoints, timeline) over device memory, cuBLASLt GEMMs, the executor's
// kernels and NCCL communicators (tensor-, data-parallel and tied-embedding groups). One
// process per GPU: the rank binds the device of its node-local rank.
//
// Differences from the CPU backend, all by design of this first device version:
//   * GEMMs run in fp32 or tf32 on fp32 tensors (bf16 mixed precision with fp32 master
//     weights is not wired into the trainer yet: cuda::GemmPrecision::bf16 is rejected);
//   * pipeline activations travel through host memory over MPI (device → host copy, MPI
//     send/recv with tags, host → device copy), so any schedule's message order works;
//   * the loss of each micro-batch is read back to the host (a small synchronisation per
//     micro-batch on the last stage);
//   * a recorded step synchronises the device around every event (steady-clock timestamps
//     of completed work), so its timeline is exact but the step itself runs slower.
// Checkpoints are the backend-independent Checkpoint of the CPU trainer: a run saved on one
// backend resumes on the other.
#pragma once

#include "parallax/executor/cuda/gemm.hpp"
#include "parallax/executor/trainer.hpp"

#include <memory>
#include <string>

namespace parallax::cuda {

// Collective over MPI_COMM_WORLD (MpiRuntime::init first). Throws std::runtime_error naming the
// cause when this process sees no CUDA device, and InputError for a precision the trainer does
// not support (bf16).
std::unique_ptr<Trainer> make_trainer(const ExecModel& model, const Plan& plan,
                                      const TrainOptions& options, const std::string& plan_source,
                                      GemmPrecision precision = GemmPrecision::tf32);

} // namespace parallax::cuda
