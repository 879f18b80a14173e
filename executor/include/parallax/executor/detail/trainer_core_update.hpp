// The trainer's parameter update: the learning-rate schedule, the tied-embedding and
// sequence-parallel gradient sums, the gradient norm, AdamW on the owned slices and the
// publish of the updated parameters. Part of TrainerCore (trainer_core.hpp).
#pragma once

#include "parallax/executor/detail/trainer_core.hpp"

namespace parallax::detail {

// ---- optimizer ----

template <TrainerBackend B> double TrainerCore<B>::learning_rate(std::int64_t step) const {
  const std::int64_t warmup = opt_.warmup_steps >= 0 ? opt_.warmup_steps : opt_.steps / 10;
  const std::int64_t horizon =
      std::max<std::int64_t>(opt_.decay_steps >= 0 ? opt_.decay_steps : opt_.steps, 1);
  if (step < warmup)
    return opt_.lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double progress =
      std::clamp(static_cast<double>(step - warmup) /
                     static_cast<double>(std::max<std::int64_t>(horizon - warmup, 1)),
                 0.0, 1.0);
  const double min_lr = opt_.lr * opt_.min_lr_ratio;
  return min_lr + 0.5 * (opt_.lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

// Calls f(param, begin, end) for the part [begin, end) of each parameter (flat offsets) that
// lies in the block's owned slice.
template <TrainerBackend B>
template <class F>
void TrainerCore<B>::for_owned(const Block& b, F&& f) {
  const std::int64_t lo = b.own_begin;
  const std::int64_t hi = b.own_begin + b.own_size;
  for (const ParamInfo& p : b.layout.params) {
    const std::int64_t s = std::max(lo, p.offset);
    const std::int64_t e = std::min(hi, p.offset + p.local_size());
    if (s < e)
      f(p, s, e);
  }
}

template <TrainerBackend B>
typename TrainerCore<B>::Block* TrainerCore<B>::find_block(BlockKind kind) {
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.layout.kind == kind)
        return &b;
    }
  }
  return nullptr;
}

// Tied embeddings on two stages: the embedding and the head's copy share one gradient.
template <TrainerBackend B> void TrainerCore<B>::embedding_sync() {
  Block* emb = find_block(BlockKind::embedding);
  Block* head = find_block(BlockKind::head);
  const int z = plan_.zero_stage;
  if (head && head->alias) {
    // One buffer on this rank: the gradients already met.
  } else if (emb && head) {
    float* a = emb->owned_grads(z);
    float* h = head->owned_grads(z);
    be_.add(a, h, emb->own_size);
    be_.copy(h, a, emb->own_size);
  } else if (emb || head) {
    Block* b = emb ? emb : head;
    embed_comm_->all_reduce_sum(
        std::span<float>(b->owned_grads(z), static_cast<std::size_t>(b->own_size)));
  }
}

// Sequence parallelism: replicated parameters saw only this rank's part of the sequence.
template <TrainerBackend B> void TrainerCore<B>::sp_sync() {
  std::vector<std::pair<float*, std::int64_t>> parts;
  std::int64_t total = 0;
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      float* g = b.owned_grads(plan_.zero_stage) - b.own_begin;
      for_owned(b, [&](const ParamInfo& p, std::int64_t s, std::int64_t e) {
        if (p.sp_partial) {
          parts.emplace_back(g + s, e - s);
          total += e - s;
        }
      });
    }
  }
  Flat packed = be_.zeros(total);
  std::int64_t at = 0;
  for (auto [g, n] : parts) {
    be_.copy(B::data(packed) + at, g, n);
    at += n;
  }
  tp_comm_->all_reduce_sum(span_of(packed));
  at = 0;
  for (auto [g, n] : parts) {
    be_.copy(g, B::data(packed) + at, n);
    at += n;
  }
}

template <TrainerBackend B> double TrainerCore<B>::gradient_norm() {
  Ranges ranges;
  // Each parameter once: its owned slices under ZeRO, else the first of its holders' copy.
  {
    for (Chunk& c : chunks_) {
      for (Block& b : c.blocks) {
        if (b.alias || (plan_.zero_stage == 0 && b.comm->rank() != 0))
          continue;
        const float* g = b.owned_grads(plan_.zero_stage) - b.own_begin;
        for_owned(b, [&](const ParamInfo& p, std::int64_t s, std::int64_t e) {
          if (p.tied_copy || (p.split == ShardDim::none && me_.tp != 0))
            return;
          ranges.emplace_back(g + s, e - s);
        });
      }
    }
  }
  double v[1] = {be_.sum_squares(ranges)};
  world_->all_reduce_sum(std::span<double>(v));
  return std::sqrt(v[0]);
}

// AdamW on block b's owned slice: p, g, and the moments addressed by flat offset (the
// block's own buffers, or an asynchronous server's shard), at optimizer step `step`.
template <TrainerBackend B>
void TrainerCore<B>::adamw_block(const Block& b, float* p, float* g, double lr, double clip_coef,
                                 std::int64_t step) {
  float* m1 = B::data(b.exp_avg) - b.own_begin;
  float* m2 = B::data(b.exp_avg_sq) - b.own_begin;
  for_owned(b, [&](const ParamInfo& info, std::int64_t s, std::int64_t e) {
    be_.adamw(p + s, g + s, m1 + s, m2 + s, e - s,
              ops::AdamwHyper{.lr = lr,
                              .beta1 = opt_.beta1,
                              .beta2 = opt_.beta2,
                              .eps = opt_.adam_eps,
                              .weight_decay = opt_.weight_decay,
                              .step = step,
                              .clip_coef = clip_coef,
                              .decay = info.decay});
  });
}

template <TrainerBackend B> void TrainerCore<B>::adamw(double lr, double clip_coef) {
  if (parameter_server() && replica_ != 0)
    return; // the server updates, the others receive
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      adamw_block(b, b.owned_params(plan_.zero_stage) - b.own_begin,
                  b.owned_grads(plan_.zero_stage) - b.own_begin, lr, clip_coef, step_count_ + 1);
    }
  }
}

// A step's fresh start: zero gradients, no loss yet, empty per-micro-batch caches.
template <TrainerBackend B> void TrainerCore<B>::begin_step_buffers() {
  const int z = plan_.zero_stage;
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks)
      be_.set_zero(z < 2 ? b.grads : b.grad_shard);
  }
  loss_sum_ = 0;
  caches_.clear();
  caches_.resize(chunks_.size());
  for (auto& per_chunk : caches_)
    per_chunk.resize(static_cast<std::size_t>(m_));
}

// The updated parameters to every data-parallel rank, as the program's publish op says: a
// parameter server broadcasts them, ZeRO-1/2 ranks all-gather their slices.
template <TrainerBackend B> void TrainerCore<B>::publish_params(StepCollective how) {
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      const std::span<float> all = span_of(b.params);
      if (how == StepCollective::broadcast) {
        b.comm->broadcast(all, 0);
      } else {
        b.comm->all_gather(all.subspan(static_cast<std::size_t>(b.own_begin),
                                       static_cast<std::size_t>(b.own_size)),
                           all);
      }
    }
  }
}

} // namespace parallax::detail
