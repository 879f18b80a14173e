// The trainer's checkpoints (every logical tensor with its AdamW moments, gathered on rank 0,
// and restored into any plan's layout) and the measured timeline gathered from every rank.
// Part of TrainerCore (trainer_core.hpp).
#pragma once

#include "parallax/executor/detail/trainer_core.hpp"

namespace parallax::detail {

template <TrainerBackend B> Timeline TrainerCore<B>::timeline() {
  Timeline mine;
  mine.events = events_;
  mine.peak_memory_bytes.assign(static_cast<std::size_t>(plan_.process_count()), 0);
  mine.peak_memory_bytes[static_cast<std::size_t>(rank_)] = be_.peak_bytes();
  const std::vector<std::string> parts =
      world_->gather_strings(timeline_to_chrome_trace(mine).dump(), 0);
  Timeline all;
  all.peak_memory_bytes.assign(static_cast<std::size_t>(plan_.process_count()), 0);
  for (std::size_t r = 0; r < parts.size(); ++r) {
    Timeline t = timeline_from_chrome_trace(json_parse_text(parts[r], "rank trace"), "rank trace");
    all.events.insert(all.events.end(), t.events.begin(), t.events.end());
    if (r < t.peak_memory_bytes.size())
      all.peak_memory_bytes[r] = t.peak_memory_bytes[r];
  }
  all.sort();
  return all;
}

// ---- checkpoints ----

template <TrainerBackend B> Buffer TrainerCore<B>::assemble(const Block& b, const float* owned) {
  const std::int64_t padded = b.layout.padded;
  Flat full = be_.zeros(padded);
  be_.copy(B::data(full) + b.own_begin, owned, b.own_size);
  if (plan_.parameter_servers > 0) {
    // Dedicated servers: each sends its shard to rank 0 (the one that writes the tensors).
    constexpr int kShardTag = 0x5101;
    const std::int64_t shard = padded / plan_.parameter_servers;
    Buffer host(static_cast<std::size_t>(padded), 0.0f);
    if (dedicated_server_) {
      Buffer mine(static_cast<std::size_t>(shard));
      be_.download(owned, shard, mine.data());
      world_->send(std::span<const float>(mine), 0, kShardTag);
    } else if (rank_ == 0) {
      for (int j = 0; j < plan_.parameter_servers; ++j) {
        world_->recv(std::span<float>(host).subspan(static_cast<std::size_t>(j * shard),
                                                    static_cast<std::size_t>(shard)),
                     plan_.world_size() + j, kShardTag);
      }
    }
    return host;
  }
  if ((plan_.zero_stage > 0 || async_server()) && b.comm->size() > 1) {
    const std::span<float> all = span_of(full);
    b.comm->all_gather(
        all.subspan(static_cast<std::size_t>(b.own_begin), static_cast<std::size_t>(b.own_size)),
        all);
  }
  Buffer host(static_cast<std::size_t>(padded));
  be_.download(B::data(full), padded, host.data());
  return host;
}

template <TrainerBackend B> Checkpoint TrainerCore<B>::checkpoint() {
  drain(); // the asynchronous server: every rank at the same, newest version
  const int z = plan_.zero_stage;
  // Full local flat vectors (params, moments) of every block, assembled over data parallelism.
  struct HostFlat {
    Buffer p, m1, m2;
  };
  std::vector<std::vector<HostFlat>> flats;
  for (Chunk& c : chunks_) {
    auto& fc = flats.emplace_back();
    for (Block& b : c.blocks) {
      const auto n = static_cast<std::size_t>(b.layout.padded);
      if (b.alias) { // nothing of its own to save (its one tensor is saved with the embedding)
        fc.push_back({Buffer(n, 0.0f), Buffer(n, 0.0f), Buffer(n, 0.0f)});
        continue;
      }
      HostFlat f;
      if (z == 3) {
        f.p = assemble(b, B::data(b.param_shard));
      } else {
        f.p = Buffer(n);
        be_.download(B::data(b.params), b.layout.padded, f.p.data());
      }
      f.m1 = assemble(b, B::data(b.exp_avg));
      f.m2 = assemble(b, B::data(b.exp_avg_sq));
      fc.push_back(std::move(f));
    }
  }
  Checkpoint ck;
  ck.step = step_count_;
  ck.samples = samples_consumed_;
  ck.seed = opt_.seed;
  ck.model = model_.config.name;
  // Rank 0 collects the data-parallel-rank-0 copy of every (pipeline, tensor) shard.
  std::map<std::string, CheckpointTensor> tensors;
  for (const ParamInfo& p : logical_params(model_)) {
    CheckpointTensor t;
    t.name = p.name;
    t.shape = {p.rows, p.cols};
    if (rank_ == 0) {
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
      for (std::int64_t i = 0; i < info.valid_rows(); ++i) {
        for (std::int64_t j = 0; j < info.valid_cols(); ++j) {
          const auto dst = static_cast<std::size_t>((info.row0 + i) * info.cols + info.col0 + j);
          const std::int64_t src = info.offset + i * info.local_cols + j;
          t.value[dst] = p[src];
          t.exp_avg[dst] = m1[src];
          t.exp_avg_sq[dst] = m2[src];
        }
      }
    }
  };
  // Experts blocks come from each EP rank (the first ep ranks of the dp·cp group), the rest
  // from the first.
  for (int pr = 0; pr < plan_.pp; ++pr) {
    for (int tr = 0; tr < plan_.tp; ++tr) {
      for (int er = 0; er < plan_.ep; ++er) {
        const int src =
            rank_of(plan_, {.dp = er / plan_.cp, .pp = pr, .tp = tr, .cp = er % plan_.cp});
        for (int lc = 0; lc < plan_.virtual_stages; ++lc) {
          const int chunk = lc * plan_.pp + pr;
          const auto layouts = chunk_layout(model_, plan_.stages[static_cast<std::size_t>(chunk)],
                                            plan_.tp, tr, layout_shards(), plan_.ep, er);
          for (std::size_t bi = 0; bi < layouts.size(); ++bi) {
            if (er > 0 && layouts[bi].kind != BlockKind::experts)
              continue; // taken from EP rank 0
            if (rank_ == src && src == 0) {
              const HostFlat& f = flats[static_cast<std::size_t>(lc)][bi];
              place(layouts[bi], f.p.data(), f.m1.data(), f.m2.data());
            } else if (rank_ == src) {
              HostFlat& f = flats[static_cast<std::size_t>(lc)][bi];
              world_->send(f.p, 0, 0);
              world_->send(f.m1, 0, 1);
              world_->send(f.m2, 0, 2);
            } else if (rank_ == 0) {
              const auto n = static_cast<std::size_t>(layouts[bi].padded);
              Buffer p(n, 0.0f), m1(n, 0.0f), m2(n, 0.0f);
              world_->recv({p.data(), n}, src, 0);
              world_->recv({m1.data(), n}, src, 1);
              world_->recv({m2.data(), n}, src, 2);
              place(layouts[bi], p.data(), m1.data(), m2.data());
            }
          }
        }
      }
    }
  }
  if (rank_ == 0) {
    for (const ParamInfo& p : logical_params(model_)) {
      ck.tensors.push_back(std::move(tensors.at(p.name)));
    }
  }
  return ck;
}

template <TrainerBackend B>
void TrainerCore<B>::restore(const Checkpoint& ck, const std::string& source) {
  ps_.reset(); // rebuilt at the next step, from the restored step and parameters
  if (ck.model != model_.config.name) {
    throw InputError(source, "model",
                     fmt::format("a checkpoint of model \"{}\"", model_.config.name),
                     fmt::format("\"{}\"", ck.model));
  }
  std::map<std::string, const CheckpointTensor*> by_name;
  for (const CheckpointTensor& t : ck.tensors)
    by_name[t.name] = &t;
  for (const ParamInfo& p : logical_params(model_)) {
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
  const int z = plan_.zero_stage;
  for (Chunk& c : chunks_) {
    for (Block& b : c.blocks) {
      if (b.alias)
        continue;
      const auto n = static_cast<std::size_t>(b.layout.padded);
      Buffer p(n, 0.0f), m1(n, 0.0f), m2(n, 0.0f);
      for (const ParamInfo& info : b.layout.params) {
        const CheckpointTensor& t = *by_name.at(info.name);
        for (std::int64_t i = 0; i < info.valid_rows(); ++i) {
          for (std::int64_t j = 0; j < info.valid_cols(); ++j) {
            const auto src = static_cast<std::size_t>((info.row0 + i) * info.cols + info.col0 + j);
            const auto dst = static_cast<std::size_t>(info.offset + i * info.local_cols + j);
            p[dst] = t.value[src];
            m1[dst] = t.exp_avg[src];
            m2[dst] = t.exp_avg_sq[src];
          }
        }
      }
      const auto own = [&](const Buffer& from) {
        return be_.upload(std::span<const float>(from).subspan(
            static_cast<std::size_t>(b.own_begin), static_cast<std::size_t>(b.own_size)));
      };
      if (z == 3)
        b.param_shard = own(p);
      else
        b.params = be_.upload(p);
      b.exp_avg = own(m1);
      b.exp_avg_sq = own(m2);
    }
  }
  step_count_ = ck.step;
  samples_consumed_ = ck.samples;
}

} // namespace parallax::detail
