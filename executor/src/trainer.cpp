#include "parallax/executor/trainer.hpp"

#include "parallax/core/error.hpp"
#include "parallax/core/memory_policy.hpp"
#include "parallax/core/pipeline_schedule.hpp"
#include "parallax/core/timeline_json.hpp"
#include "parallax/executor/ops.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <map>
#include <numbers>

namespace parallax {
namespace {

using Eigen::Index;

// One parameter block on this rank: its flat buffers and optimizer state.
struct Block {
  BlockLayout layout;
  std::int64_t own_begin = 0; // the slice of the flat buffer this data-parallel rank updates
  std::int64_t own_size = 0;
  Buffer params;      // full local parameters (ZeRO-3: only while gathered)
  Buffer param_shard; // ZeRO-3: the owned slice, always resident
  Buffer grads;       // full local gradients (ZeRO-2/3: only during a backward)
  Buffer grad_shard;  // ZeRO-2/3: reduced gradients of the owned slice, accumulated
  Buffer exp_avg;     // AdamW moments of the owned slice
  Buffer exp_avg_sq;
  CommRequest pending; // in-flight gradient all-reduce or reduce-scatter
  Buffer rs_out;       // reduce-scatter destination while pending
  bool rs_pending = false;
  // The LM head's tied embedding when the embedding lives on the same rank: no storage of its
  // own, it reads and writes the embedding block's buffers.
  Block* alias = nullptr;

  BlockBuffers buffers() const {
    const Block& s = alias ? *alias : *this;
    return {
        .layout = &layout, .params = s.params.data(), .grads = const_cast<float*>(s.grads.data())};
  }
  // Reduced gradients of the owned slice (valid after the step's reduction).
  float* owned_grads(int zero) { return zero >= 2 ? grad_shard.data() : grads.data() + own_begin; }
  float* owned_params(int zero) {
    return zero == 3 ? param_shard.data() : params.data() + own_begin;
  }
};

struct Chunk {
  int index = 0; // global chunk index
  StageRange units;
  std::vector<Block> blocks;
  bool first() const { return units.first == 0; }
};

Buffer zeros(std::int64_t n) {
  return Buffer(static_cast<std::size_t>(n), 0.0f);
}

std::span<float> span_of(Buffer& b) {
  return {b.data(), b.size()};
}

} // namespace

struct Trainer::Impl {
  ExecModel model;
  Plan plan;
  TrainOptions opt;
  std::unique_ptr<TokenSource> data;

  std::unique_ptr<Communicator> world;
  std::unique_ptr<Communicator> tp_comm;
  std::unique_ptr<Communicator> dp_comm;
  std::unique_ptr<Communicator> embed_comm; // first and last pipeline rank (tied embeddings)
  RankCoords me;
  int rank = 0;
  std::int64_t m = 1;        // micro-batches per replica
  std::vector<Chunk> chunks; // local chunks, by local index
  std::int64_t step_count = 0;
  std::int64_t samples_consumed = 0; // global samples of the steps done (the data position)
  double flops_per_sequence = 0;

  // Measured events of the recorded step.
  bool recording = false;
  double t0 = 0;
  std::vector<Event> events;

  // Per micro-batch caches: [local chunk][micro-batch][block].
  std::vector<std::vector<std::vector<BlockCache>>> caches;
  std::vector<std::vector<Tensor>> stash; // outputs kept alive while their sends are in flight
  std::vector<CommRequest> sends;
  std::map<int, Tensor> mailbox; // same-rank "sends" (pp = 1 with several chunks)
  // ZeRO-2/3: blocks whose gradient reduce-scatter is in flight, oldest first. At most
  // kReduceScatterWindow full-size gradient buffers are alive at once.
  static constexpr std::size_t kReduceScatterWindow = 2;
  std::deque<Block*> scattering;
  // Plans whose stack does not overlap gradient reduction: blocks whose reduction is due, launched
  // after the backward pass (ZeRO-2/3: after each micro-batch's, else after the step's).
  std::vector<std::pair<Block*, std::int64_t>> deferred;
  double loss_sum = 0;

  TpContext tp() {
    TpContext t{.comm = tp_comm.get(), .sequence_parallel = plan.sequence_parallel};
    if (recording) {
      t.on_comm = [this](const char* what, double s, double e, double bytes) {
        record(Stream::tp_comm, Category::tp_comm, what, -1, -1, s, e, 0, bytes);
      };
    }
    return t;
  }

  void record(Stream stream, Category cat, std::string name, int layer, int mb, double s, double e,
              double flops = 0, double bytes = 0) {
    if (!recording)
      return;
    events.push_back({.rank = rank,
                      .stream = stream,
                      .category = cat,
                      .name = std::move(name),
                      .layer = layer,
                      .micro_batch = mb,
                      .start_s = s - t0,
                      .end_s = e - t0,
                      .flops = flops,
                      .bytes = bytes});
  }

  int chunk_rank(int chunk) const {
    return rank_of(plan, {.dp = me.dp, .pp = chunk_pp_rank(plan, chunk), .tp = me.tp});
  }
  int tag(int chunk, std::int64_t mb, int dir) const {
    return static_cast<int>((static_cast<std::int64_t>(chunk) * m + mb) * 2 + dir);
  }

  MicroBatch micro_batch(std::int64_t k) const {
    const ModelConfig& c = model.config;
    MicroBatch mb;
    mb.batch = plan.micro_batch_size;
    mb.seq = c.seq_length;
    const std::int64_t base =
        samples_consumed + me.dp * (m * plan.micro_batch_size) + k * plan.micro_batch_size;
    std::vector<std::int32_t> sample(static_cast<std::size_t>(mb.seq + 1));
    for (Index b = 0; b < mb.batch; ++b) {
      data->sample(base + b, sample);
      mb.inputs.insert(mb.inputs.end(), sample.begin(), sample.end() - 1);
      mb.targets.insert(mb.targets.end(), sample.begin() + 1, sample.end());
    }
    const Index n = mb.batch * mb.seq;
    const int t = plan.sequence_parallel ? plan.tp : 1;
    const Index local = n / t;
    const Index first = plan.sequence_parallel ? local * me.tp : 0;
    for (Index r = 0; r < local; ++r) {
      mb.positions.push_back(static_cast<std::int32_t>((first + r) % mb.seq));
    }
    return mb;
  }

  // ---- parameters and ZeRO ----

  static Block& storage(Block& b) { return b.alias ? *b.alias : b; }

  void gather_params(Block& blk) {
    if (plan.zero_stage != 3)
      return;
    Block& b = storage(blk);
    const double s = steady_seconds();
    b.params = zeros(b.layout.padded);
    if (dp_comm->size() == 1) {
      std::copy(b.param_shard.begin(), b.param_shard.end(), b.params.begin());
    } else {
      dp_comm->all_gather(b.param_shard, span_of(b.params));
    }
    record(Stream::dp_comm, Category::dp_comm, "zero3 gather " + b.layout.name, b.layout.unit, -1,
           s, steady_seconds(), 0, static_cast<double>(b.layout.padded) * sizeof(float));
  }
  void release_params(Block& b) {
    if (plan.zero_stage == 3)
      Buffer().swap(storage(b).params);
  }

  void finish_reduce_scatter(Block& b) {
    if (!b.rs_pending)
      return;
    scattering.erase(std::find(scattering.begin(), scattering.end(), &b));
    const double s = steady_seconds();
    b.pending.wait();
    record(Stream::dp_comm, Category::dp_comm, "reduce-scatter wait " + b.layout.name,
           b.layout.unit, -1, s, steady_seconds());
    for (std::size_t i = 0; i < b.grad_shard.size(); ++i)
      b.grad_shard[i] += b.rs_out[i];
    Buffer().swap(b.rs_out);
    Buffer().swap(b.grads);
    b.rs_pending = false;
  }

  // Before a block's backward: make sure its gradient buffer exists and is free.
  void prepare_grads(Block& blk) {
    if (plan.zero_stage < 2)
      return;
    Block& b = storage(blk);
    finish_reduce_scatter(b);
    b.grads = zeros(b.layout.padded);
  }

  // The embedding shares its gradient buffer with a tied head on this rank: the head's backward,
  // earlier in the same micro-batch, already prepared it.
  bool shared_with_head(const Block& emb) const {
    for (const Chunk& c : chunks) {
      for (const Block& b : c.blocks) {
        if (b.alias == &emb)
          return true;
      }
    }
    return false;
  }

  // After a block's backward of micro-batch `k`: launch its data-parallel reduction when due.
  void after_backward(Block& b, std::int64_t k) {
    if (b.alias)
      return; // reduced with the embedding, whose backward comes later
    if (!plan.overlap_grad_reduce && plan.dp > 1 && (plan.zero_stage >= 2 || k == m - 1)) {
      deferred.emplace_back(&b, k);
      return;
    }
    launch_reduction(b, k);
  }

  // The deferred reductions of a stack without overlap; ZeRO-2/3 also wait for theirs here.
  void launch_deferred() {
    for (auto [b, k] : deferred)
      launch_reduction(*b, k);
    deferred.clear();
    if (plan.zero_stage >= 2) {
      while (!scattering.empty())
        finish_reduce_scatter(*scattering.front());
    }
  }

  void launch_reduction(Block& b, std::int64_t k) {
    const int dp = plan.dp;
    if (plan.zero_stage >= 2) {
      if (dp == 1) {
        for (std::size_t i = 0; i < b.grad_shard.size(); ++i)
          b.grad_shard[i] += b.grads[i];
        Buffer().swap(b.grads);
        return;
      }
      b.rs_out = zeros(b.own_size);
      b.pending = dp_comm->ireduce_scatter_sum(b.grads, span_of(b.rs_out));
      b.rs_pending = true;
      scattering.push_back(&b);
      while (scattering.size() > kReduceScatterWindow) {
        finish_reduce_scatter(*scattering.front());
      }
    } else if (dp > 1 && k == m - 1) {
      // The bucket is launched as soon as it is ready; a parameter server (data-parallel rank
      // 0) receives the sum and alone runs the optimizer.
      b.pending = parameter_server() ? dp_comm->ireduce_sum(span_of(b.grads), 0)
                                     : dp_comm->iall_reduce_sum(span_of(b.grads));
    }
  }

  // ---- pipeline ----

  Tensor receive(int chunk_from, std::int64_t k, int dir, Index rows) {
    const int t = tag(chunk_from, k, dir);
    const int src = chunk_rank(chunk_from);
    if (src == rank) {
      auto it = mailbox.find(t);
      PARALLAX_CHECK(it != mailbox.end(), "pipeline message to self missing");
      Tensor x = std::move(it->second);
      mailbox.erase(it);
      return x;
    }
    Tensor x(rows, model.config.hidden_size);
    const double s = steady_seconds();
    world->recv(x.span(), src, t);
    record(Stream::pp_comm, Category::pp_comm, dir == 0 ? "recv activation" : "recv gradient", -1,
           static_cast<int>(k), s, steady_seconds(), 0,
           static_cast<double>(x.size()) * sizeof(float));
    return x;
  }

  void send(Tensor x, int chunk_to, int chunk_from, std::int64_t k, int dir) {
    const int t = tag(chunk_from, k, dir);
    const int dst = chunk_rank(chunk_to);
    if (dst == rank) {
      mailbox.emplace(t, std::move(x));
      return;
    }
    stash.emplace_back();
    stash.back().push_back(std::move(x));
    sends.push_back(world->isend(stash.back().back().span(), dst, t));
  }

  Index local_rows() const {
    const Index n = plan.micro_batch_size * model.config.seq_length;
    return plan.sequence_parallel ? n / plan.tp : n;
  }

  KeepMode keep_mode() const {
    switch (plan.recompute) {
    case Recompute::none:
      return KeepMode::all;
    case Recompute::selective:
      return KeepMode::no_attention_probs;
    case Recompute::full:
      return KeepMode::input_only;
    }
    return KeepMode::all;
  }

  void forward(int lc, std::int64_t k, const MicroBatch& mb) {
    Chunk& ch = chunks[static_cast<std::size_t>(lc)];
    auto& cache = caches[static_cast<std::size_t>(lc)][static_cast<std::size_t>(k)];
    cache.assign(ch.blocks.size(), BlockCache());
    const TpContext tpc = tp();
    const int last_chunk = plan.pp * plan.virtual_stages - 1;
    Tensor x;
    std::size_t i = 0;
    if (ch.first()) {
      Block& emb = ch.blocks[0];
      Block* pos = ch.blocks.size() > 1 && ch.blocks[1].layout.kind == BlockKind::positions
                       ? &ch.blocks[1]
                       : nullptr;
      gather_params(emb);
      if (pos)
        gather_params(*pos);
      const double s = steady_seconds();
      const BlockBuffers eb = emb.buffers();
      const BlockBuffers pb = pos ? pos->buffers() : BlockBuffers{};
      x = embedding_forward(model, eb, pos ? &pb : nullptr, tpc, mb);
      record(Stream::compute, Category::forward, "embedding", 0, static_cast<int>(k), s,
             steady_seconds());
      release_params(emb);
      if (pos)
        release_params(*pos);
      i = pos ? 2 : 1;
    } else {
      x = receive(ch.index - 1, k, 0, local_rows());
    }
    for (; i < ch.blocks.size(); ++i) {
      Block& b = ch.blocks[i];
      if (b.layout.kind != BlockKind::layer)
        break;
      gather_params(b);
      const double s = steady_seconds();
      x = layer_forward(model, b.buffers(), tpc, mb, x, keep_mode(), cache[i]);
      record(Stream::compute, Category::forward, b.layout.name, b.layout.unit, static_cast<int>(k),
             s, steady_seconds());
      release_params(b);
    }
    if (ch.index == last_chunk) {
      Block& norm = ch.blocks[i];
      Block& head = ch.blocks[i + 1];
      gather_params(norm);
      gather_params(head);
      const double s = steady_seconds();
      const double loss = head_forward(model, norm.buffers(), head.buffers(), tpc, mb, x, cache[i]);
      record(Stream::compute, Category::forward, "head", norm.layout.unit, static_cast<int>(k), s,
             steady_seconds());
      release_params(norm);
      release_params(head);
      if (me.tp == 0)
        loss_sum += loss;
    } else {
      send(std::move(x), ch.index + 1, ch.index, k, 0);
    }
  }

  void backward(int lc, std::int64_t k, const MicroBatch& mb, float loss_scale) {
    Chunk& ch = chunks[static_cast<std::size_t>(lc)];
    auto& cache = caches[static_cast<std::size_t>(lc)][static_cast<std::size_t>(k)];
    const TpContext tpc = tp();
    const int last_chunk = plan.pp * plan.virtual_stages - 1;
    std::size_t end = ch.blocks.size();
    Tensor dy;
    if (ch.index == last_chunk) {
      Block& norm = ch.blocks[end - 2];
      Block& head = ch.blocks[end - 1];
      gather_params(norm);
      gather_params(head);
      prepare_grads(norm);
      prepare_grads(head);
      const double s = steady_seconds();
      dy =
          head_backward(model, norm.buffers(), head.buffers(), tpc, mb, loss_scale, cache[end - 2]);
      record(Stream::compute, Category::backward, "head", norm.layout.unit, static_cast<int>(k), s,
             steady_seconds());
      release_params(norm);
      release_params(head);
      after_backward(head, k);
      after_backward(norm, k);
      end -= 2;
    } else {
      dy = receive(ch.index + 1, k, 1, local_rows());
    }
    const std::size_t first_layer = ch.first() ? (model.rope() ? 1 : 2) : 0;
    for (std::size_t i = end; i-- > first_layer;) {
      Block& b = ch.blocks[i];
      gather_params(b);
      prepare_grads(b);
      const double s = steady_seconds();
      const bool full = plan.recompute == Recompute::full;
      dy = layer_backward(model, b.buffers(), tpc, mb, dy, cache[i]);
      record(Stream::compute, full ? Category::recompute : Category::backward, b.layout.name,
             b.layout.unit, static_cast<int>(k), s, steady_seconds());
      release_params(b);
      after_backward(b, k);
    }
    if (ch.first()) {
      Block& emb = ch.blocks[0];
      Block* pos = first_layer == 2 ? &ch.blocks[1] : nullptr;
      gather_params(emb);
      if (!shared_with_head(emb))
        prepare_grads(emb);
      if (pos) {
        gather_params(*pos);
        prepare_grads(*pos);
      }
      const double s = steady_seconds();
      const BlockBuffers eb = emb.buffers();
      const BlockBuffers pb = pos ? pos->buffers() : BlockBuffers{};
      embedding_backward(model, eb, pos ? &pb : nullptr, tpc, mb, dy);
      record(Stream::compute, Category::backward, "embedding", 0, static_cast<int>(k), s,
             steady_seconds());
      release_params(emb);
      if (pos) {
        release_params(*pos);
        after_backward(*pos, k);
      }
      after_backward(emb, k);
    } else {
      send(std::move(dy), ch.index - 1, ch.index, k, 1);
    }
    cache.clear();
    if (plan.zero_stage >= 2) {
      launch_deferred();
    }
  }

  // ---- optimizer ----

  double learning_rate(std::int64_t step) const {
    const std::int64_t warmup = opt.warmup_steps >= 0 ? opt.warmup_steps : opt.steps / 10;
    const std::int64_t horizon =
        std::max<std::int64_t>(opt.decay_steps >= 0 ? opt.decay_steps : opt.steps, 1);
    if (step < warmup)
      return opt.lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
    const double progress =
        std::clamp(static_cast<double>(step - warmup) /
                       static_cast<double>(std::max<std::int64_t>(horizon - warmup, 1)),
                   0.0, 1.0);
    const double min_lr = opt.lr * opt.min_lr_ratio;
    return min_lr + 0.5 * (opt.lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
  }

  // Calls f(param, begin, end) for the part [begin, end) of each parameter (flat offsets) that
  // lies in the block's owned slice.
  template <class F> static void for_owned(const Block& b, F&& f) {
    const std::int64_t lo = b.own_begin;
    const std::int64_t hi = b.own_begin + b.own_size;
    for (const ParamInfo& p : b.layout.params) {
      const std::int64_t s = std::max(lo, p.offset);
      const std::int64_t e = std::min(hi, p.offset + p.local_size());
      if (s < e)
        f(p, s, e);
    }
  }

  Block* find_block(BlockKind kind) {
    for (Chunk& c : chunks) {
      for (Block& b : c.blocks) {
        if (b.layout.kind == kind)
          return &b;
      }
    }
    return nullptr;
  }

  void reduce_gradients() {
    for (Chunk& c : chunks) {
      for (Block& b : c.blocks) {
        if (b.alias)
          continue;
        if (plan.zero_stage >= 2) {
          finish_reduce_scatter(b);
        } else if (b.pending.pending()) {
          const double s = steady_seconds();
          b.pending.wait();
          record(Stream::dp_comm, Category::dp_comm, "all-reduce wait " + b.layout.name,
                 b.layout.unit, -1, s, steady_seconds(), 0,
                 static_cast<double>(b.grads.size()) * sizeof(float));
        }
      }
    }
    // Tied embeddings: the embedding and the head's copy share one gradient.
    if (model.config.tied_embeddings) {
      Block* emb = find_block(BlockKind::embedding);
      Block* head = find_block(BlockKind::head);
      const int z = plan.zero_stage;
      if (head && head->alias) {
        // One buffer on this rank: the gradients already met.
      } else if (emb && head) {
        float* a = emb->owned_grads(z);
        float* h = head->owned_grads(z);
        for (std::int64_t i = 0; i < emb->own_size; ++i)
          a[i] = h[i] = a[i] + h[i];
      } else if (emb || head) {
        Block* b = emb ? emb : head;
        embed_comm->all_reduce_sum(
            std::span<float>(b->owned_grads(z), static_cast<std::size_t>(b->own_size)));
      }
    }
    // Sequence parallelism: replicated parameters saw only this rank's part of the sequence.
    if (plan.sequence_parallel && plan.tp > 1) {
      std::vector<float> packed;
      for (Chunk& c : chunks) {
        for (Block& b : c.blocks) {
          if (b.alias)
            continue;
          float* g = b.owned_grads(plan.zero_stage) - b.own_begin;
          for_owned(b, [&](const ParamInfo& p, std::int64_t s, std::int64_t e) {
            if (p.sp_partial)
              packed.insert(packed.end(), g + s, g + e);
          });
        }
      }
      tp_comm->all_reduce_sum(std::span<float>(packed));
      std::size_t at = 0;
      for (Chunk& c : chunks) {
        for (Block& b : c.blocks) {
          if (b.alias)
            continue;
          float* g = b.owned_grads(plan.zero_stage) - b.own_begin;
          for_owned(b, [&](const ParamInfo& p, std::int64_t s, std::int64_t e) {
            if (!p.sp_partial)
              return;
            std::copy(packed.begin() + static_cast<std::ptrdiff_t>(at),
                      packed.begin() +
                          static_cast<std::ptrdiff_t>(at + static_cast<std::size_t>(e - s)),
                      g + s);
            at += static_cast<std::size_t>(e - s);
          });
        }
      }
    }
  }

  double gradient_norm() {
    double sq = 0;
    const bool count_dp = plan.zero_stage > 0 || me.dp == 0;
    if (count_dp) {
      for (Chunk& c : chunks) {
        for (Block& b : c.blocks) {
          if (b.alias)
            continue;
          const float* g = b.owned_grads(plan.zero_stage) - b.own_begin;
          for_owned(b, [&](const ParamInfo& p, std::int64_t s, std::int64_t e) {
            if (p.tied_copy || (p.split == ShardDim::none && me.tp != 0))
              return;
            for (std::int64_t i = s; i < e; ++i)
              sq += static_cast<double>(g[i]) * g[i];
          });
        }
      }
    }
    double v[1] = {sq};
    world->all_reduce_sum(std::span<double>(v));
    return std::sqrt(v[0]);
  }

  bool parameter_server() const { return plan.grad_sync == GradSync::parameter_server; }

  void adamw(double lr, double clip_coef) {
    if (parameter_server() && me.dp != 0)
      return; // the server updates, the others receive
    const std::int64_t t = step_count + 1;
    const double bc1 = 1.0 - std::pow(opt.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(opt.beta2, static_cast<double>(t));
    const float b1 = static_cast<float>(opt.beta1);
    const float b2 = static_cast<float>(opt.beta2);
    for (Chunk& c : chunks) {
      for (Block& b : c.blocks) {
        if (b.alias)
          continue;
        float* g = b.owned_grads(plan.zero_stage) - b.own_begin;
        float* p = b.owned_params(plan.zero_stage) - b.own_begin;
        float* m1 = b.exp_avg.data() - b.own_begin;
        float* m2 = b.exp_avg_sq.data() - b.own_begin;
        // fp32 arithmetic throughout so the loop vectorises (it is a memory-bound pass).
        const float clip = static_cast<float>(clip_coef);
        const float step_size = static_cast<float>(lr / bc1);
        const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
        const float eps = static_cast<float>(opt.adam_eps);
        for_owned(b, [&](const ParamInfo& info, std::int64_t s, std::int64_t e) {
          const float keep = static_cast<float>(1.0 - lr * (info.decay ? opt.weight_decay : 0.0));
          ops::adamw_update(p + s, g + s, m1 + s, m2 + s, e - s,
                            {b1, b2, clip, keep, step_size, inv_sqrt_bc2, eps});
        });
      }
    }
  }

  void publish_params() {
    if (parameter_server() && plan.dp > 1) {
      for (Chunk& c : chunks) {
        for (Block& b : c.blocks) {
          if (b.alias)
            continue;
          const double s = steady_seconds();
          dp_comm->broadcast(span_of(b.params), 0);
          record(Stream::dp_comm, Category::dp_comm, "parameter broadcast " + b.layout.name,
                 b.layout.unit, -1, s, steady_seconds(), 0,
                 static_cast<double>(b.params.size()) * sizeof(float));
        }
      }
      return;
    }
    if (plan.zero_stage == 0 || plan.zero_stage == 3 || plan.dp == 1)
      return;
    for (Chunk& c : chunks) {
      for (Block& b : c.blocks) {
        if (b.alias)
          continue;
        const double s = steady_seconds();
        const std::span<float> all = span_of(b.params);
        dp_comm->all_gather(all.subspan(static_cast<std::size_t>(b.own_begin),
                                        static_cast<std::size_t>(b.own_size)),
                            all);
        record(Stream::dp_comm, Category::dp_comm, "param all-gather " + b.layout.name,
               b.layout.unit, -1, s, steady_seconds(), 0,
               static_cast<double>(b.params.size()) * sizeof(float));
      }
    }
  }
};

void trainer_check_plan(const ExecModel& model, const Plan& plan, int world_size,
                        const std::string& plan_source) {
  if (plan.world_size() != world_size) {
    throw InputError(plan_source, "/dp",
                     fmt::format("dp·tp·pp equal to the number of processes ({})", world_size),
                     fmt::format("{}·{}·{} = {}", plan.dp, plan.tp, plan.pp, plan.world_size()),
                     fmt::format("launch with mpirun -np {}", plan.world_size()));
  }
  const ModelConfig& c = model.config;
  if (plan.sequence_parallel && (plan.micro_batch_size * c.seq_length) % plan.tp != 0) {
    throw InputError(plan_source, "/sequence_parallel",
                     fmt::format("micro_batch_size × seq_length divisible by tp = {}", plan.tp),
                     "true");
  }
  if (c.vocab_size % plan.tp != 0 || c.ffn_hidden_size % plan.tp != 0) {
    throw InputError(plan_source, "/tp",
                     fmt::format("a divisor of vocab_size {} and ffn_hidden_size {}", c.vocab_size,
                                 c.ffn_hidden_size),
                     std::to_string(plan.tp));
  }
  if (plan.grad_sync == GradSync::parameter_server && plan.zero_stage != 0) {
    throw InputError(plan_source, "/grad_sync",
                     "\"allreduce\", \"tree\" or \"hierarchical\" with ZeRO (a parameter server "
                     "holds the whole optimizer state)",
                     "\"parameter_server\" with zero_stage " + std::to_string(plan.zero_stage));
  }
}

Trainer::Trainer(const ExecModel& model, const Plan& plan, const TrainOptions& options,
                 const std::string& plan_source)
    : impl_(std::make_unique<Impl>()) {
  // Activations are allocated and freed every micro-batch.
  keep_freed_memory();
  Impl& s = *impl_;
  s.model = model;
  s.plan = plan;
  s.opt = options;
  s.world = mpi_world(options.comm_timeout);
  s.rank = s.world->rank();
  trainer_check_plan(model, plan, s.world->size(), plan_source);
  PARALLAX_CHECK(static_cast<int>(plan.stages.size()) == plan.pp * plan.virtual_stages,
                 "the trainer needs the plan's stage ranges");
  const ModelConfig& c = model.config;
  s.me = rank_coords(plan, s.rank);
  s.m = plan.num_microbatches();
  // Pipeline messages go point to point over the world communicator (any two chunks' ranks).
  s.tp_comm = mpi_group(tp_group(plan, s.rank), "tp", options.comm_timeout);
  s.dp_comm = mpi_group(dp_group(plan, s.rank), "dp", options.comm_timeout);
  if (c.tied_embeddings && plan.pp > 1 && (s.me.pp == 0 || s.me.pp == plan.pp - 1)) {
    s.embed_comm = mpi_group({rank_of(plan, {.dp = s.me.dp, .pp = 0, .tp = s.me.tp}),
                              rank_of(plan, {.dp = s.me.dp, .pp = plan.pp - 1, .tp = s.me.tp})},
                             "embedding", options.comm_timeout);
  }
  s.data = options.data_path.empty()
               ? make_synthetic_source(c.vocab_size, options.seed)
               : open_token_file(options.data_path, c.vocab_size, c.seq_length);
  s.flops_per_sequence = model_flops_per_sequence(model);

  const int z = plan.zero_stage;
  for (int lc = 0; lc < plan.virtual_stages; ++lc) {
    Chunk ch;
    ch.index = lc * plan.pp + s.me.pp;
    ch.units = plan.stages[static_cast<std::size_t>(ch.index)];
    for (BlockLayout& layout : chunk_layout(model, ch.units, plan.tp, s.me.tp, plan.dp)) {
      Block b;
      b.layout = std::move(layout);
      const std::int64_t padded = b.layout.padded;
      b.own_size = z == 0 ? padded : padded / plan.dp;
      b.own_begin = z == 0 ? 0 : b.own_size * s.me.dp;
      Buffer full = zeros(padded);
      init_block(b.layout, options.seed, span_of(full));
      if (z == 3) {
        b.param_shard.assign(full.begin() + b.own_begin, full.begin() + b.own_begin + b.own_size);
      } else {
        b.params = std::move(full);
      }
      if (z < 2)
        b.grads = zeros(padded);
      if (z >= 2)
        b.grad_shard = zeros(b.own_size);
      b.exp_avg = zeros(b.own_size);
      b.exp_avg_sq = zeros(b.own_size);
      ch.blocks.push_back(std::move(b));
    }
    s.chunks.push_back(std::move(ch));
  }
  if (c.tied_embeddings) {
    Block* emb = s.find_block(BlockKind::embedding);
    Block* head = s.find_block(BlockKind::head);
    if (emb && head) {
      head->alias = emb;
      for (Buffer* buf : {&head->params, &head->param_shard, &head->grads, &head->grad_shard,
                          &head->exp_avg, &head->exp_avg_sq}) {
        Buffer().swap(*buf);
      }
    }
  }
}

Trainer::~Trainer() = default;

std::int64_t Trainer::steps_done() const {
  return impl_->step_count;
}

StepStats Trainer::step(bool record) {
  Impl& s = *impl_;
  s.recording = record;
  s.events.clear();
  MemoryTracker::reset_peak();
  s.world->barrier();
  const double start = steady_seconds();
  s.t0 = start;

  const int z = s.plan.zero_stage;
  for (Chunk& c : s.chunks) {
    for (Block& b : c.blocks) {
      if (z < 2)
        std::fill(b.grads.begin(), b.grads.end(), 0.0f);
      else
        std::fill(b.grad_shard.begin(), b.grad_shard.end(), 0.0f);
    }
  }
  s.loss_sum = 0;
  s.caches.assign(s.chunks.size(),
                  std::vector<std::vector<BlockCache>>(static_cast<std::size_t>(s.m)));
  const double global_tokens =
      static_cast<double>(s.plan.global_batch_size * s.model.config.seq_length);
  const float loss_scale = static_cast<float>(1.0 / global_tokens);

  std::map<std::int64_t, MicroBatch> batches;
  for (const PipelineOp& op : pipeline_schedule(s.plan, s.me.pp)) {
    const int lc = op.chunk / s.plan.pp;
    auto it = batches.find(op.micro_batch);
    if (it == batches.end())
      it = batches.emplace(op.micro_batch, s.micro_batch(op.micro_batch)).first;
    if (op.forward) {
      s.forward(lc, op.micro_batch, it->second);
    } else {
      s.backward(lc, op.micro_batch, it->second, loss_scale);
    }
  }
  for (CommRequest& r : s.sends)
    r.wait();
  s.sends.clear();
  s.stash.clear();
  PARALLAX_CHECK(s.mailbox.empty(), "pipeline messages left undelivered");

  s.launch_deferred();
  s.reduce_gradients();
  const double norm = s.gradient_norm();
  const double lr = s.learning_rate(s.step_count);
  const double clip = s.opt.clip_grad_norm > 0 && norm > s.opt.clip_grad_norm
                          ? s.opt.clip_grad_norm / (norm + 1e-6)
                          : 1.0;
  const double opt_start = steady_seconds();
  s.adamw(lr, clip);
  s.record(Stream::compute, Category::optimizer, "optimizer", -1, -1, opt_start, steady_seconds());
  s.publish_params();
  s.step_count += 1;
  s.samples_consumed += s.plan.global_batch_size;

  double sums[1] = {s.loss_sum};
  s.world->all_reduce_sum(std::span<double>(sums));
  double maxes[2] = {steady_seconds() - start, static_cast<double>(MemoryTracker::peak())};
  s.world->all_reduce_max(std::span<double>(maxes));

  StepStats st;
  st.step = s.step_count;
  st.loss = sums[0] / global_tokens;
  st.grad_norm = norm;
  st.lr = lr;
  st.step_time_s = maxes[0];
  st.tokens_per_s = global_tokens / maxes[0];
  const double flops = s.flops_per_sequence * static_cast<double>(s.plan.global_batch_size);
  st.mfu = s.opt.peak_flops_per_rank > 0
               ? flops / maxes[0] / (s.opt.peak_flops_per_rank * s.plan.world_size())
               : 0.0;
  st.peak_memory_bytes = static_cast<std::int64_t>(maxes[1]);
  s.recording = false;
  return st;
}

Timeline Trainer::timeline() {
  Impl& s = *impl_;
  Timeline mine;
  mine.events = s.events;
  mine.peak_memory_bytes.assign(static_cast<std::size_t>(s.plan.world_size()), 0);
  mine.peak_memory_bytes[static_cast<std::size_t>(s.rank)] = MemoryTracker::peak();
  const std::vector<std::string> parts =
      s.world->gather_strings(timeline_to_chrome_trace(mine).dump(), 0);
  Timeline all;
  all.peak_memory_bytes.assign(static_cast<std::size_t>(s.plan.world_size()), 0);
  for (std::size_t r = 0; r < parts.size(); ++r) {
    Timeline t = timeline_from_chrome_trace(json_parse_text(parts[r], "rank trace"), "rank trace");
    all.events.insert(all.events.end(), t.events.begin(), t.events.end());
    if (r < t.peak_memory_bytes.size())
      all.peak_memory_bytes[r] = t.peak_memory_bytes[r];
  }
  all.sort();
  return all;
}

Checkpoint Trainer::checkpoint() {
  Impl& s = *impl_;
  const int z = s.plan.zero_stage;
  // Full local flat vectors (params, moments) of every block, assembled over data parallelism.
  struct Flat {
    Buffer p, m1, m2;
  };
  std::vector<std::vector<Flat>> flats;
  for (Chunk& c : s.chunks) {
    auto& fc = flats.emplace_back();
    for (Block& b : c.blocks) {
      Flat f{zeros(b.layout.padded), zeros(b.layout.padded), zeros(b.layout.padded)};
      if (b.alias) { // nothing of its own to save (its one tensor is saved with the embedding)
        fc.push_back(std::move(f));
        continue;
      }
      const auto own = [&](Buffer& dst, const float* src) {
        std::copy(src, src + b.own_size, dst.begin() + b.own_begin);
        if (z > 0 && s.plan.dp > 1) {
          const std::span<float> all = span_of(dst);
          s.dp_comm->all_gather(all.subspan(static_cast<std::size_t>(b.own_begin),
                                            static_cast<std::size_t>(b.own_size)),
                                all);
        }
      };
      if (z == 3)
        own(f.p, b.param_shard.data());
      else
        f.p.assign(b.params.begin(), b.params.end());
      own(f.m1, b.exp_avg.data());
      own(f.m2, b.exp_avg_sq.data());
      fc.push_back(std::move(f));
    }
  }
  Checkpoint ck;
  ck.step = s.step_count;
  ck.samples = s.samples_consumed;
  ck.seed = s.opt.seed;
  ck.model = s.model.config.name;
  // Rank 0 collects the data-parallel-rank-0 copy of every (pipeline, tensor) shard.
  std::map<std::string, CheckpointTensor> tensors;
  for (const ParamInfo& p : logical_params(s.model)) {
    CheckpointTensor t;
    t.name = p.name;
    t.shape = {p.rows, p.cols};
    if (s.rank == 0) {
      const auto n = static_cast<std::size_t>(p.rows * p.cols);
      t.value.assign(n, 0.0f);
      t.exp_avg.assign(n, 0.0f);
      t.exp_avg_sq.assign(n, 0.0f);
    }
    tensors.emplace(p.name, std::move(t));
  }
  const auto place = [&](const BlockLayout& layout, const float* p, const float* m1,
                         const float* m2) {
    for (const ParamInfo& info : layout.params) {
      if (info.tied_copy)
        continue;
      CheckpointTensor& t = tensors.at(info.name);
      for (std::int64_t i = 0; i < info.local_rows; ++i) {
        for (std::int64_t j = 0; j < info.local_cols; ++j) {
          const auto dst = static_cast<std::size_t>((info.row0 + i) * info.cols + info.col0 + j);
          const std::int64_t src = info.offset + i * info.local_cols + j;
          t.value[dst] = p[src];
          t.exp_avg[dst] = m1[src];
          t.exp_avg_sq[dst] = m2[src];
        }
      }
    }
  };
  const Plan& plan = s.plan;
  for (int pr = 0; pr < plan.pp; ++pr) {
    for (int tr = 0; tr < plan.tp; ++tr) {
      const int src = rank_of(plan, {.dp = 0, .pp = pr, .tp = tr});
      for (int lc = 0; lc < plan.virtual_stages; ++lc) {
        const int chunk = lc * plan.pp + pr;
        const auto layouts = chunk_layout(s.model, plan.stages[static_cast<std::size_t>(chunk)],
                                          plan.tp, tr, plan.dp);
        for (std::size_t bi = 0; bi < layouts.size(); ++bi) {
          if (s.rank == src && src == 0) {
            const Flat& f = flats[static_cast<std::size_t>(lc)][bi];
            place(layouts[bi], f.p.data(), f.m1.data(), f.m2.data());
          } else if (s.rank == src) {
            Flat& f = flats[static_cast<std::size_t>(lc)][bi];
            s.world->send(f.p, 0, 0);
            s.world->send(f.m1, 0, 1);
            s.world->send(f.m2, 0, 2);
          } else if (s.rank == 0) {
            Buffer p = zeros(layouts[bi].padded), m1 = zeros(layouts[bi].padded),
                   m2 = zeros(layouts[bi].padded);
            s.world->recv(span_of(p), src, 0);
            s.world->recv(span_of(m1), src, 1);
            s.world->recv(span_of(m2), src, 2);
            place(layouts[bi], p.data(), m1.data(), m2.data());
          }
        }
      }
    }
  }
  if (s.rank == 0) {
    for (const ParamInfo& p : logical_params(s.model)) {
      ck.tensors.push_back(std::move(tensors.at(p.name)));
    }
  }
  return ck;
}

void Trainer::restore(const Checkpoint& ck, const std::string& source) {
  Impl& s = *impl_;
  if (ck.model != s.model.config.name) {
    throw InputError(source, "model",
                     fmt::format("a checkpoint of model \"{}\"", s.model.config.name),
                     fmt::format("\"{}\"", ck.model));
  }
  std::map<std::string, const CheckpointTensor*> by_name;
  for (const CheckpointTensor& t : ck.tensors)
    by_name[t.name] = &t;
  for (const ParamInfo& p : logical_params(s.model)) {
    auto it = by_name.find(p.name);
    if (it == by_name.end()) {
      throw InputError(source, "tensors", fmt::format("a tensor named {}", p.name), "none");
    }
    const std::vector<std::int64_t> shape{p.rows, p.cols};
    if (it->second->shape != shape) {
      throw InputError(source, fmt::format("tensors/{}/shape", p.name),
                       fmt::format("[{}, {}]", p.rows, p.cols),
                       fmt::format("{} dimensions", it->second->shape.size()));
    }
  }
  const int z = s.plan.zero_stage;
  for (Chunk& c : s.chunks) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      Buffer p = zeros(b.layout.padded), m1 = zeros(b.layout.padded), m2 = zeros(b.layout.padded);
      for (const ParamInfo& info : b.layout.params) {
        const CheckpointTensor& t = *by_name.at(info.name);
        for (std::int64_t i = 0; i < info.local_rows; ++i) {
          for (std::int64_t j = 0; j < info.local_cols; ++j) {
            const auto src = static_cast<std::size_t>((info.row0 + i) * info.cols + info.col0 + j);
            const auto dst = static_cast<std::size_t>(info.offset + i * info.local_cols + j);
            p[dst] = t.value[src];
            m1[dst] = t.exp_avg[src];
            m2[dst] = t.exp_avg_sq[src];
          }
        }
      }
      const auto own = [&](const Buffer& from) {
        return Buffer(from.begin() + b.own_begin, from.begin() + b.own_begin + b.own_size);
      };
      if (z == 3)
        b.param_shard = own(p);
      else
        b.params = std::move(p);
      b.exp_avg = own(m1);
      b.exp_avg_sq = own(m2);
    }
  }
  s.step_count = ck.step;
  s.samples_consumed = ck.samples;
}

} // namespace parallax
