// The routed experts of a mixture-of-experts layer on the CPU (Eigen): router, top-k, the
// experts' SwiGLU MLPs over the rows routed to them, the weighted combine, and the sequence-wise
// load-balancing loss (Switch Transformer's α·E·Σ f_j·P_j per sequence, averaged over the global
// batch like the token loss). Called by the transformer layer (detail/block.hpp) between the
// MLP's tensor-parallel gather and reduce: the rows are the full (gathered) rows, the experts'
// MLPs split over tensor-parallel ranks like a dense MLP (partial outputs, summed by the
// layer's reduce). Shared experts are the layer's dense MLP (mlp.wg / wu / w2).
#pragma once

#include "parallax/executor/model.hpp"
#include "parallax/executor/tensor.hpp"

#include <vector>

namespace parallax {

// Cache slots beyond the dense layer's (block::kNumSlots): routing, then five per expert.
inline constexpr std::size_t kMoeScores = 0;  // [rows, E] router scores (softmax or sigmoid)
inline constexpr std::size_t kMoeChosen = 1;  // [rows, k] chosen experts (as floats)
inline constexpr std::size_t kMoeWeights = 2; // [rows, k] their normalised weights
inline constexpr std::size_t kMoeCounts = 3;  // [ep, E / ep] rows each EP rank sent my experts
inline constexpr std::size_t kMoeExpertSlots = 4;
// Per expert: on the rank computing it, its gate, up and activation over every row routed to
// it (from all EP ranks) and those rows (input); on every rank, its output for the rank's own
// rows routed to it (returned by the combine).
inline constexpr std::size_t kMoePerExpert = 5;
inline constexpr std::size_t kMoeGate = 0, kMoeUp = 1, kMoeAct = 2, kMoeOut = 3, kMoeIn = 4;

// The MoE slots past `first`, and the first slot of expert j.
inline std::size_t moe_slot_count(const MoeConfig& moe) {
  return kMoeExpertSlots + kMoePerExpert * static_cast<std::size_t>(moe.num_experts);
}
inline std::size_t moe_expert_slot(std::size_t first, int j) {
  return first + kMoeExpertSlots + kMoePerExpert * static_cast<std::size_t>(j);
}

// out (+)= the routed experts' contribution for the rows of x (ln2 output, full rows); fills
// the slots from `first_slot` on (t holds at least first_slot + moe_slot_count of them).
// Under expert parallelism (tp.ep_comm) the rows routed to another EP rank's experts go there
// and their outputs come back (dispatch and combine, MPI all-to-all); a rank holds only its EP
// rank's experts (BlockBuffers::experts_layout), reduced over the ranks holding the same ones.
// `seq`: rows per sequence (the capacity factor's group).
void moe_forward(const ExecModel& model, const BlockBuffers& b, const TpContext& tp,
                 Eigen::Index seq, const Tensor& x, std::vector<Tensor>& t, std::size_t first_slot,
                 Tensor& out);
// dx (+)= ∂/∂x of the routed part given dout (full rows), accumulating the experts' and the
// router's gradients; the router's input gradient on tensor-parallel rank 0 only (dx is summed
// over the group afterwards). Releases the slots.
void moe_backward(const ExecModel& model, const BlockBuffers& b, const TpContext& tp,
                  const MicroBatch& mb, const Tensor& x, std::vector<Tensor>& t,
                  std::size_t first_slot, ConstMatRef dout, Tensor& dx);

} // namespace parallax
