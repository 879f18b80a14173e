// The data-parallel gradient all-reduce under a plan's gradient compression: the bytes each
// method puts on the wire and the device time it spends compressing and decompressing.
//
//   bf16        2 bytes per element instead of the stack's gradient type; two casts.
//   topk:f      an all-gather of every rank's k = f·N (value, index) pairs (n·k·8 bytes arrive
//               at each of n ranks: more than a ring all-reduce's 2·N·4 once n·f > 1/2);
//               selection (a radix select over |g + e|), the error update and the scatter-add of
//               the n·k pairs, all memory-bound passes.
//   powersgd:r  two all-reduces, of P (Σ rows·r, with the uncompressed vectors) and of
//               Q (Σ cols·r); the products M·Q, Mᵀ·P̂ and P̂·Qᵀ (6·r FLOPs per matrix element,
//               memory-bound for small r: each reads M once) and the error update.
// The compression's device time is added to the reduction's latency: it runs on the reduction's
// stream, before, between and after its collectives, and does not share the links.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/plan.hpp"
#include "parallax/simulator/collectives.hpp"

namespace parallax {

// The gradients one reduction carries, as compression sees them (one rank's share).
struct ReducedGradients {
  double params = 0;        // elements
  double matrix_params = 0; // of them, in weight matrices (PowerSGD factorises these)
  double matrix_dims = 0;   // Σ (rows + cols) over those matrices
};

// The plan's data-parallel all-reduce of `g` at `elem_bytes` per element (compressed when the
// plan says so; otherwise data_parallel_cost with the plan's algorithm).
CollectiveCost gradient_all_reduce_cost(const Cluster& cluster, const Plan& plan,
                                        const ReducedGradients& g, double elem_bytes,
                                        double expert_params = 0);

// Elements one rank sends per reduction under the plan's compression (for reports and tests):
// N, k·(value + index) for top-k, and the factors with the vectors for PowerSGD.
double compressed_elements(const Plan& plan, const ReducedGradients& g);

// The device time of compressing and decompressing `g` once.
double compression_compute_s(const Cluster& cluster, const Plan& plan, const ReducedGradients& g);

} // namespace parallax
