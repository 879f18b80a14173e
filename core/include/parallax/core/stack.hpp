// Stack: the software that runs a plan on a cluster — what the training framework does on top of
// the hardware. The same plan on the same GPUs runs at different speeds and memory under
// Megatron-Core, PyTorch FSDP or torchtitan because their kernels, communication schedules and
// allocators differ; a Stack holds those differences as documented mechanisms. Every zoo value
// is cited in the file's notes (hardware_profiles/stacks/*.json); see docs/ARCHITECTURE.md.
//
// A default-constructed Stack is the cost model's historical behaviour (fused attention and loss,
// gradients reduced during the backward, 10% compute slowdown under overlapped communication,
// 1 GiB of device memory for the runtime, 8% allocator slack over activations).
#pragma once

#include <array>
#include <span>
#include <string>
#include <string_view>

namespace parallax {

// Attention kernel family: "standard" materialises scores, softmax and dropout (Megatron-LM
// before 2023, eager PyTorch); "flash2" FlashAttention-2-class kernels on Ampere instructions
// (PyTorch SDPA, Triton); "flash" the device's native fused kernel (FlashAttention-3, cuDNN,
// Transformer Engine).
enum class AttentionKernel { standard, flash2, flash };
inline constexpr std::array<std::string_view, 3> kAttentionKernelNames = {"standard", "flash2",
                                                                          "flash"};
// Cross-entropy: one fused kernel over the logits, or eager fp32 passes.
enum class LossKernel { fused, unfused };
inline constexpr std::array<std::string_view, 2> kLossKernelNames = {"fused", "unfused"};
// FP8 scaling recipe; delayed scaling reuses an amax history (one cast pass), current
// (tensorwise) and rowwise scaling read the tensor once more to find its scale first.
enum class Fp8Recipe { delayed, tensorwise, rowwise };
inline constexpr std::array<std::string_view, 3> kFp8RecipeNames = {"delayed", "tensorwise",
                                                                    "rowwise"};

struct StackDataParallel {
  // Gradient buckets reduce while the backward runs (false: after the rank's last backward).
  bool overlap_grad_reduce = true;
  // Gradients are accumulated and reduced in fp32 under 16-bit mixed precision (Megatron's
  // main_grad buffer with bf16; FSDP2 reduce_dtype float32): 4 bytes per gradient element in
  // memory and on the wire instead of 2.
  bool fp32_grad_reduce = false;
  bool operator==(const StackDataParallel&) const = default;
};

struct StackSharding { // ZeRO-3 / FSDP FULL_SHARD
  // Gathered layers kept ahead of the one in use (FSDP backward prefetch, FSDP2 implicit
  // prefetch): memory for 1 + prefetch_layers gathered layers.
  int prefetch_layers = 1;
  // Free the gathered parameters after each layer's forward and gather them again for the
  // backward (true), or keep them gathered until the backward (FSDP2 reshard_after_forward=False).
  bool reshard_after_forward = true;
  // Layers whose gathered buffers stay allocated after use until the next synchronisation
  // (FSDP1's recordStream on the all-gather stream).
  int retained_layers = 0;
  // The sharded gradients are reduce-scattered from backward hooks as each layer finishes
  // (FSDP, DeepSpeed ZeRO-3 with its default overlap_comm), whatever data_parallel says of the
  // replicated case.
  bool overlap_reduce = true;
  bool operator==(const StackSharding&) const = default;
};

struct StackMemory {
  double context_bytes = 1.0 * (1 << 30); // CUDA context, kernel images, library workspaces
  double communicator_bytes = 0;          // device buffers of one NCCL communicator
  // Caching-allocator slack over activations (blocks split and freed in varying sizes).
  double fragmentation = 0.08;
  // The allocator's segment granularity: every large allocation is rounded up to it.
  double segment_bytes = 0;
  bool operator==(const StackMemory&) const = default;
};

// How the stack checkpoints: every data-parallel rank 0 of each model shard writing its part in
// parallel (Megatron-Core dist-ckpt, PyTorch DCP, DeepSpeed) or one rank writing all of it, and
// whether training resumes once the state is copied to host memory while the write runs
// behind (Megatron's --async-save, DCP async_save). Defaults: sharded, synchronous.
struct StackCheckpoint {
  bool sharded = true;
  bool async = false;
  bool operator==(const StackCheckpoint&) const = default;
};

struct Stack {
  std::string name = "default";
  std::string notes;
  AttentionKernel attention = AttentionKernel::flash;
  LossKernel loss = LossKernel::fused;
  StackDataParallel data_parallel;
  StackSharding sharding;
  // Fraction of tensor-parallel collective time hidden behind GEMMs (async TP, TE userbuffers).
  double tp_comm_overlap = 0;
  Fp8Recipe fp8_recipe = Fp8Recipe::delayed;
  // Host time to dispatch one kernel (framework op dispatch, autograd): a layer whose kernels run
  // shorter than their dispatch leaves the GPU waiting. 0: the device's launch overhead only.
  double host_dispatch_us = 0;
  // Compute runs this fraction slower while communication kernels overlap it (they occupy SMs
  // and memory bandwidth).
  double overlap_compute_slowdown = 0.10;
  StackMemory memory;
  StackCheckpoint checkpoint;

  // Whether gradient reduction overlaps the backward pass under ZeRO stage `zero_stage`.
  bool overlaps_grad_reduce(int zero_stage) const {
    return zero_stage == 3 ? sharding.overlap_reduce : data_parallel.overlap_grad_reduce;
  }

  bool operator==(const Stack&) const = default;
};

std::string_view attention_kernel_name(AttentionKernel k);
std::string_view loss_kernel_name(LossKernel k);
std::string_view fp8_recipe_name(Fp8Recipe r);

// The cast traffic of an FP8 recipe relative to delayed scaling (one fused cast-transpose pass):
// current scaling reads the 16-bit tensor once more for its amax.
double fp8_cast_traffic_factor(Fp8Recipe r);

// Bytes the caching allocator reserves for one allocation of `bytes`: rounded up to 512 bytes,
// then, for requests of 1 MiB or more, to the stack's segment granularity when it has one.
double allocator_round_bytes(const Stack& stack, double bytes);

// Bytes reserved for a sequence of live allocations: each rounded on its own.
double allocator_reserved_bytes(const Stack& stack, std::span<const double> allocations);

} // namespace parallax
