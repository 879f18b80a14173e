// Compressed data-parallel gradient all-reduce on the CPU executor (plan field
// grad_compression; the methods and their wire formats in core/grad_compression.hpp and the
// simulator's grad_compression_cost.hpp).
//
// One GradCompressor per parameter block keeps that block's compression state across steps:
// the error-feedback residual (what top-k and PowerSGD did not send, added to the next step's
// gradient) and PowerSGD's Q factors (warm-started from the previous step, as Vogels et al.
// do). Every rank of the group ends with the same sum of every rank's decompressed message.
#pragma once

#include "parallax/core/grad_compression.hpp"
#include "parallax/executor/comm.hpp"
#include "parallax/executor/model.hpp"

#include <bit>
#include <cstdint>
#include <span>
#include <vector>

namespace parallax {

// bfloat16 <-> float, round to nearest even (NaN stays NaN). Inline and branch-free, so the
// conversion loops (and MPI's 16-bit sum) vectorise.
inline std::uint16_t float_to_bf16(float x) {
  const auto bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u); // to nearest, ties to even
  const auto rounded = static_cast<std::uint16_t>((bits + rounding) >> 16);
  const auto quiet_nan = static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  return (bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
}
inline float bf16_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

class GradCompressor {
public:
  // `layout`: the block's parameters (PowerSGD factorises those whose local shard is a matrix
  // with (rows + cols)·r < rows·cols). `seed` draws the initial Q factors, the same on every
  // rank of the group.
  GradCompressor(GradCompression method, bool error_feedback, const BlockLayout& layout,
                 std::uint64_t seed);

  // Replaces `grads` (the block's flat local gradients) by the group's sum of every rank's
  // compressed gradient, updating the residual. Blocking: runs its collectives to completion.
  // Returns the bytes this rank put into the collectives.
  double all_reduce(Communicator& comm, std::span<float> grads);

  // What top-k and PowerSGD kept back on this rank (empty without error feedback).
  std::span<const float> residual() const { return residual_; }

private:
  struct Matrix {
    std::int64_t offset = 0; // in the block's flat buffer
    std::int64_t rows = 0;
    std::int64_t cols = 0;
    std::vector<float> q; // cols × r, column-major
  };
  double all_reduce_bf16(Communicator& comm, std::span<float> grads);
  double all_reduce_topk(Communicator& comm, std::span<float> grads);
  double all_reduce_powersgd(Communicator& comm, std::span<float> grads);
  void add_residual(std::span<float> grads);

  GradCompression method_;
  bool error_feedback_;
  std::vector<Matrix> matrices_;
  std::vector<std::pair<std::int64_t, std::int64_t>> vectors_; // [begin, end) sent whole
  std::vector<float> residual_;
};

} // namespace parallax
