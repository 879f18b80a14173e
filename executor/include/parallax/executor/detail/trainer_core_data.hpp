// The trainer's input: micro-batch k of this rank's data-parallel replica from the token source,
// its context-parallel chunks of every sequence and the positions of its sequence-parallel
// rows. Part of TrainerCore (trainer_core.hpp).
#pragma once

#include "parallax/executor/detail/trainer_core.hpp"

namespace parallax::detail {

template <TrainerBackend B> MicroBatch TrainerCore<B>::micro_batch(std::int64_t k) const {
  const ModelConfig& c = model_.config;
  MicroBatch mb;
  mb.batch = plan_.micro_batch_size;
  mb.seq = c.seq_length / plan_.cp; // this rank's tokens of each sequence
  mb.loss_scale =
      static_cast<float>(1.0 / static_cast<double>(plan_.global_batch_size * c.seq_length));
  if (plan_.cp > 1) {
    mb.seq_positions = context_chunk_positions(c.seq_length, plan_.cp, me_.cp);
  }
  const std::int64_t base =
      samples_consumed_ + (plan_.first_microbatch_of(me_.dp) + k) * plan_.micro_batch_size;
  std::vector<std::int32_t> sample(static_cast<std::size_t>(c.seq_length + 1));
  for (Eigen::Index b = 0; b < mb.batch; ++b) {
    data_->sample(base + b, sample);
    for (Eigen::Index i = 0; i < mb.seq; ++i) {
      const auto at = static_cast<std::size_t>(mb.seq_position(i));
      mb.inputs.push_back(sample[at]);
      mb.targets.push_back(sample[at + 1]);
    }
  }
  const Eigen::Index n = mb.batch * mb.seq;
  const int t = plan_.sequence_parallel ? plan_.tp : 1;
  const Eigen::Index local = n / t;
  const Eigen::Index first = plan_.sequence_parallel ? local * me_.tp : 0;
  for (Eigen::Index r = 0; r < local; ++r) {
    mb.positions.push_back(mb.seq_position((first + r) % mb.seq));
  }
  return mb;
}

} // namespace parallax::detail
