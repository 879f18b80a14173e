// The step program: what one rank does in one training step, as a list of ops with explicit
// dependencies — the single statement of the step's order that the simulator costs and the
// executor runs.
//
// Built on the pipeline schedule (core/pipeline_schedule), per partition unit (transformer
// layer; the embedding belongs to the first, the final norm and LM head to the last):
//
//   forward(chunk c, micro-batch k):  recv activation (c > 0) · per unit u: [gather u] forward u
//                                     · send activation (c not last)
//   backward(c, k):                   recv gradient (c not last) · per unit u, last to first:
//                                     [gather u] [recompute u] backward u [reduce u]
//                                     · send gradient (c > 0) · [deferred reductions]
//   after the schedule:               [deferred reductions] [embedding sync] [sp sync]
//                                     optimizer [publish]
//
// ZeRO and overlap rules, written here and nowhere else:
//   - ZeRO-3 (dp·cp > 1) all-gathers a unit's parameters before its forward, prefetched one unit
//     ahead (the gather may start when the compute two compute ops back has finished), and again
//     before its backward when the stack reshards after the forward.
//   - Gradients of a unit are reduced over the dp·cp ranks that hold it (dp·cp > 1, the unit has
//     parameters; context-parallel ranks hold the same parameters as data-parallel ones):
//     ZeRO-2/3 reduce-scatter every micro-batch's gradients; otherwise the last micro-batch's
//     are all-reduced (a parameter server reduces them to data-parallel rank 0).
//   - With overlap_grad_reduce the reduction starts as the unit's backward ends, beside the next
//     compute; without it the reductions wait for the backward pass and hold the rank: after each
//     micro-batch's backward under ZeRO-2/3, after the last backward otherwise.
//   - Tied embeddings split over pipeline stages sum their two gradients between the first and
//     the last stage; sequence parallelism sums the gradients of replicated parameters (norms,
//     biases) over the tensor-parallel group. Both before the optimizer.
//   - The optimizer waits for every reduction. ZeRO-1/2 (dp·cp > 1) then all-gather the updated
//     parameters; a parameter server broadcasts them.
//
// An op is `async` when the rank launches it and goes on (prefetched gathers, overlapped
// reductions, the parameter publish); every other op holds the rank until it is done, in list
// order. `after` lists the other ops of the same rank it waits for. Op names are the event
// names of both the simulated and the measured timeline, so the two pair up op for op.
#pragma once

#include "parallax/core/plan.hpp"
#include "parallax/core/timeline.hpp"

#include <string>
#include <vector>

namespace parallax {

enum class StepOpKind {
  gather,         // ZeRO-3 all-gather of a unit's parameters
  forward,        // a unit's forward
  recompute,      // a unit's forward again, before its backward (full recomputation)
  backward,       // a unit's backward (selective recomputation included)
  send,           // pipeline send to the next (activation) or previous (gradient) chunk
  recv,           // pipeline receive from the previous (activation) or next (gradient) chunk
  reduce,         // data-parallel gradient reduction of a unit
  embedding_sync, // tied embeddings on different stages: sum of the two gradients
  sp_sync,        // sequence parallelism: tensor-parallel sum of replicated parameters' grads
  optimizer,      // gradient norm, clipping and AdamW on the owned parameters
  publish,        // ZeRO-1/2 all-gather of the updated parameters, parameter-server broadcast
};

// The data-parallel collective a reduce or publish op runs.
enum class StepCollective {
  none,
  all_reduce,
  reduce_scatter,
  reduce_to_root,
  all_gather,
  broadcast
};

struct StepOp {
  StepOpKind kind = StepOpKind::forward;
  int unit = -1;        // partition unit; -1 for whole-rank ops
  int chunk = -1;       // global model chunk the op belongs to; -1 for whole-rank ops
  int micro_batch = -1; // -1 for whole-step ops
  int peer_chunk = -1;  // send / recv: the chunk on the other side
  StepCollective collective = StepCollective::none;
  bool async = false;
  bool in_backward = false; // a gather for the backward pass (the stack resharded after forward)
  std::vector<int> after;   // indices of ops of this program it waits for

  bool compute() const {
    return kind == StepOpKind::forward || kind == StepOpKind::recompute ||
           kind == StepOpKind::backward || kind == StepOpKind::optimizer;
  }
  // send / recv: an activation (forward direction) rather than a gradient.
  bool activation() const {
    return kind == StepOpKind::send ? peer_chunk > chunk : peer_chunk < chunk;
  }
  Category category() const;
  Stream stream() const;
  std::string name() const; // e.g. "forward u3 mb1", "send act c0>c1 mb1", "optimizer"
  // (a backward gather: "gather bwd u3 mb1")
  bool operator==(const StepOp&) const = default;
};

// What the program needs of the model and the software stack.
struct StepShape {
  int units = 0;                     // partition units of the model
  std::vector<bool> unit_has_params; // per unit; empty: every unit has parameters
  bool tied_embeddings = false;      // the LM head reuses the token embedding
  bool reshard_after_forward = true; // ZeRO-3 gathers again before the backward
};

// The data-parallel communication of a plan's step: the one rule the step program emits, the
// analytic cost model costs and the executor runs (through the program's ops).
//   ZeRO-0   gradients all-reduced after the last micro-batch (a parameter server: reduced to
//            data-parallel rank 0, which updates and broadcasts the parameters)
//   ZeRO-1   gradients reduce-scattered after the last micro-batch, each rank updates its
//            shard, the updated parameters all-gathered (Megatron-LM's distributed optimizer,
//            DeepSpeed stage 1)
//   ZeRO-2   gradients reduce-scattered after every micro-batch's backward, parameters
//            all-gathered after the update
//   ZeRO-3   as ZeRO-2, parameters gathered before each unit's forward and, when the stack
//            frees them after the forward, again before its backward; no publish
// With one data-parallel rank there is nothing to communicate.
struct DataParallelComm {
  StepCollective gradients = StepCollective::none; // the reduce ops' collective
  bool per_micro_batch = false;                    // reduced after every micro-batch's backward
  StepCollective publish = StepCollective::none;   // after the optimizer
  int gathers_per_micro_batch = 0;                 // ZeRO-3 parameter all-gathers per unit
  bool operator==(const DataParallelComm&) const = default;
};

DataParallelComm data_parallel_comm(const Plan& plan, bool reshard_after_forward);

// One op of the pipeline schedule (a chunk's forward or backward of one micro-batch) and the
// last program op it spans.
struct StepPhase {
  bool forward = true;
  int chunk = 0;
  int micro_batch = 0;
  int last_op = 0;
  bool operator==(const StepPhase&) const = default;
};

struct StepProgram {
  int rank = 0;
  int pp_rank = 0;
  std::vector<StageRange> stages; // the plan's chunks ([first, last) units), global order
  std::vector<StepOp> ops;
  std::vector<StepPhase> phases; // in schedule order
};

// The program of global rank `rank` of `plan` (stages: the plan's, else an even split).
StepProgram step_program(const Plan& plan, const StepShape& shape, int rank);

std::string_view step_op_kind_name(StepOpKind k);

} // namespace parallax
