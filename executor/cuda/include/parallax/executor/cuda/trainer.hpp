// The trainer on GPUs: the same TrainerCore as the CPU trainer (pipeline schedules, ZeRO 0–3,
// gradient buckets, checkpoints, timeline) over device memory, cuBLASLt GEMMs, the executor's
// kernels and NCCL communicators (tensor-, data-parallel and tied-embedding groups). One
// process per GPU: the rank binds the device of its node-local rank.
//
// Differences from the CPU backend, all by design of this first device version:
//   * precision: every tensor the optimizer, the norms, the softmax and the communication see
//     is fp32 (master weights, moments, gradients, activations); only GEMM inputs change with
//     the precision: fp32, tf32 (fp32 tensors, tensor-core rounding) or bf16 (mixed precision:
//     bf16 copies of the weights and of the activations a GEMM reads, made at each use; the
//     activations kept only for a GEMM's backward are kept as their bf16 copies; fp32
//     accumulation and fp32 results, so gradients accumulate in fp32). Weights are converted
//     per GEMM rather than kept as a persistent bf16 copy: simpler with ZeRO, one extra pass
//     over the weights per use;
//   * pipeline activations travel through host memory over MPI (device → host copy, MPI
//     send/recv with tags, host → device copy), so any schedule's message order works;
//   * the loss of each micro-batch is read back to the host (a small synchronisation per
//     micro-batch on the last stage);
//   * a recorded step times its events with CUDA events on the compute stream (resolved when
//     the step ends, so recording does not stall the device); tensor-parallel collectives,
//     which the host waits for anyway, are timed on the host clock around a synchronisation.
// Checkpoints are the backend-independent Checkpoint of the CPU trainer: a run saved on one
// backend resumes on the other.
#pragma once

#include "parallax/executor/cuda/gemm.hpp"
#include "parallax/executor/trainer.hpp"

#include <cstdint>
#include <memory>
#include <string>

namespace parallax::cuda {

// Which attention kernels the layers run: batched GEMMs on tensor cores around a causal
// softmax, keeping the seq × seq probabilities (attention_gemm.hpp; selective recomputation
// drops them), or the flash-style kernels that keep only the log-sum-exp but run on CUDA cores.
// `automatic` takes the GEMMs when the probabilities this rank keeps at once fit in a quarter
// of the device's memory (attention_probability_bytes), else the flash kernels.
enum class AttentionKernel : std::uint8_t { automatic, gemm, flash };

struct DeviceTrainOptions {
  GemmPrecision precision = GemmPrecision::bf16;
  AttentionKernel attention = AttentionKernel::automatic;
};

// Bytes of fp32 attention probabilities world rank `rank` keeps at once under the GEMM
// attention: every layer of its chunks for each micro-batch in flight without recomputation,
// else about three layers' worth (one layer's probabilities, their gradient and a bf16 copy,
// during that layer's backward). Pure arithmetic (testable without a device).
double attention_probability_bytes(const ExecModel& model, const Plan& plan, int rank);
// What `automatic` resolves to on a device of `device_bytes` (other choices pass through).
AttentionKernel choose_attention(AttentionKernel asked, const ExecModel& model, const Plan& plan,
                                 int rank, double device_bytes);

// Collective over MPI_COMM_WORLD (MpiRuntime::init first). Throws std::runtime_error naming the
// cause when this process sees no CUDA device.
std::unique_ptr<Trainer> make_trainer(const ExecModel& model, const Plan& plan,
                                      const TrainOptions& options, const std::string& plan_source,
                                      const DeviceTrainOptions& device = {});

} // namespace parallax::cuda
