// Compute time of GEMMs and memory-bound kernels on one device.
//
// A GEMM of F FLOPs takes max(F / (peak · η(F)), bytes / bandwidth): η is the device's GEMM
// efficiency curve (small GEMMs run far below peak), the second term the memory roofline that
// catches thin GEMMs. Element-wise, norm and softmax kernels are memory-bound: bytes moved over
// the attained memory bandwidth. Every kernel pays a launch overhead.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/layer_graph.hpp"

#include <utility>

namespace parallax {

// The curve used when a profile gives none: cuBLAS-class GEMMs on data-centre GPUs sustain ~78%
// of dense peak on large problems under training load and fall off below ~1 GFLOP per call.
const std::vector<GemmEfficiencyPoint>& gemm_efficiency_default();
// η(F): log-linear interpolation of the device's curve (or the default), clamped at its ends.
double gemm_efficiency(const Device& device, double flops);

// Attained fraction of memory bandwidth for element-wise kernels.
double elementwise_efficiency(const Device& device);

// Per-kernel launch and scheduling overhead on the device.
double kernel_overhead_s(const Device& device);
// Whether data-parallel communication runs beside compute. GPUs copy with DMA engines and NCCL
// kernels on their own streams; CPU ranks move data with the same cores that compute, and
// OpenMPI advances non-blocking collectives only inside MPI calls, so on CPU devices gradient
// reduction and ZeRO gathers add to the step instead of hiding behind the backward.
bool device_overlaps_communication(const Device& device);

// Time of one GEMM in `precision`. `fused` GEMMs (flash attention) never write their m×n output
// to memory, so only their compute term counts, at the fused-kernel efficiency. An FP8 GEMM sits
// on the efficiency curve (defined for 16-bit GEMMs) where a 16-bit GEMM of the same duration
// would: launch, prologue and the last partial wave cost time, not FLOPs.
// `flash2` marks a fused GEMM of a FlashAttention-2-class kernel: it runs no faster than the
// device's flash2_attention_efficiency of peak where the profile gives one.
// `grouped` marks a grouped GEMM (mixture-of-experts: one problem per expert, batch = experts):
// each problem runs at the efficiency of its own size, not of the batch's FLOPs, so small
// experts' GEMMs sit low on the curve (and their weights' traffic bounds them from below).
double gemm_time_s(const Cluster& cluster, Precision precision, const Gemm& gemm, bool fused,
                   bool flash2 = false, bool grouped = false);

// The precision a layer's GEMMs run in under a training `precision`. FP8 training (Transformer
// Engine's recipe, as Megatron-LM and NeMo use it) runs only the linear layers of transformer
// blocks in FP8; the attention core, the output (logit) layer and everything outside the blocks
// stay in BF16.
Precision gemm_precision(const Layer& layer, Precision precision);

// Bytes an FP8 GEMM moves per micro-batch to quantize its operands, (forward, backward): the
// forward casts its 16-bit activation (m×k) and writes the transposed FP8 copy the weight
// gradient needs (read 2, write 1 + 1 bytes per element); the backward casts and transposes the
// output gradient (m×n) the same way. Weights are cast once per step, after the optimizer
// (kFp8WeightCastBytes per parameter).
std::pair<double, double> fp8_cast_bytes(const Gemm& gemm);
inline constexpr double kFp8WeightCastBytes = 4.0;

// Time to move `bytes` through device memory at the attained element-wise bandwidth.
double memory_time_s(const Cluster& cluster, double bytes);

} // namespace parallax
