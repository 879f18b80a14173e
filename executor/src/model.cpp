#include "parallax/executor/model.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/ops.hpp"
#include "parallax/models/transformer_builder.hpp"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <numbers>

namespace parallax {
namespace {

using Eigen::Index;

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

std::uint64_t hash_name(std::string_view name) {
  std::uint64_t h = 1469598103934665603ULL; // FNV-1a
  for (const char c : name) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ULL;
  }
  return h;
}

// Standard normal from two counter-based uniforms (Box–Muller).
float normal_at(std::uint64_t key, std::uint64_t index) {
  const std::uint64_t a = splitmix64(key ^ splitmix64(2 * index));
  const std::uint64_t b = splitmix64(key ^ splitmix64(2 * index + 1));
  const double u1 = (static_cast<double>(a >> 11) + 1.0) * 0x1.0p-53; // (0, 1]
  const double u2 = static_cast<double>(b >> 11) * 0x1.0p-53;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
}

void require(bool ok, const std::string& source, const std::string& field,
             const std::string& expected, const std::string& found) {
  if (!ok)
    throw InputError(source, field, expected, found);
}

struct LayoutBuilder {
  BlockLayout block;
  int tp = 1;
  int tp_rank = 0;

  // `padded`: the split dimension (the vocabulary) is rounded up to a multiple of tp, as
  // Megatron-LM pads its vocabulary; the padding rows / columns hold zeros.
  void add(std::string suffix, std::int64_t rows, std::int64_t cols, ShardDim split, Init init,
           float std = 0.02f, bool tied_copy = false, std::string full_name = {},
           bool padded = false) {
    ParamInfo p;
    p.name = full_name.empty() ? block.name + "." + suffix : std::move(full_name);
    p.rows = rows;
    p.cols = cols;
    p.split = split;
    const auto shard = [&](std::int64_t n) { return padded ? (n + tp - 1) / tp : n / tp; };
    p.local_rows = split == ShardDim::rows ? shard(rows) : rows;
    p.local_cols = split == ShardDim::cols ? shard(cols) : cols;
    p.row0 = split == ShardDim::rows ? p.local_rows * tp_rank : 0;
    p.col0 = split == ShardDim::cols ? p.local_cols * tp_rank : 0;
    PARALLAX_CHECK(padded || (p.local_rows * (split == ShardDim::rows ? tp : 1) == rows &&
                              p.local_cols * (split == ShardDim::cols ? tp : 1) == cols),
                   p.name + " does not split evenly over tensor parallelism");
    p.init = init;
    p.init_std = std;
    p.decay = rows > 1 && cols > 1;
    p.sp_partial = split == ShardDim::none;
    p.tied_copy = tied_copy;
    p.offset = block.numel;
    block.numel += p.local_size();
    block.params.push_back(std::move(p));
  }

  BlockLayout finish(int dp) {
    block.padded = (block.numel + dp - 1) / dp * dp;
    return std::move(block);
  }
};

void add_norm(LayoutBuilder& b, const ExecModel& m, const std::string& prefix) {
  const std::int64_t h = m.config.hidden_size;
  b.add(prefix + ".gamma", 1, h, ShardDim::none, Init::ones);
  if (!m.rmsnorm())
    b.add(prefix + ".beta", 1, h, ShardDim::none, Init::zeros);
}

BlockLayout layer_layout(const ExecModel& m, int unit, int tp, int tp_rank, int dp) {
  const ModelConfig& c = m.config;
  const std::int64_t h = c.hidden_size;
  const std::int64_t d = c.head_dim();
  const std::int64_t q = c.num_attention_heads * d;
  const std::int64_t kv = c.num_kv_heads * d;
  const std::int64_t f = c.ffn_hidden_size;
  const float out_std = 0.02f / std::sqrt(2.0f * static_cast<float>(c.num_layers));
  LayoutBuilder b{
      .block = {.kind = BlockKind::layer, .name = fmt::format("block{}", unit), .unit = unit},
      .tp = tp,
      .tp_rank = tp_rank};
  add_norm(b, m, "ln1");
  b.add("attn.wq", h, q, ShardDim::cols, Init::normal);
  b.add("attn.wk", h, kv, ShardDim::cols, Init::normal);
  b.add("attn.wv", h, kv, ShardDim::cols, Init::normal);
  if (c.bias) {
    b.add("attn.bq", 1, q, ShardDim::cols, Init::zeros);
    b.add("attn.bk", 1, kv, ShardDim::cols, Init::zeros);
    b.add("attn.bv", 1, kv, ShardDim::cols, Init::zeros);
  }
  b.add("attn.wo", q, h, ShardDim::rows, Init::normal, out_std);
  if (c.bias)
    b.add("attn.bo", 1, h, ShardDim::none, Init::zeros);
  add_norm(b, m, "ln2");
  const MoeConfig& moe = c.moe;
  if (moe.is_moe_layer(unit)) {
    // The router is whole on every tensor-parallel rank and sees the full rows: its gradient
    // is complete on each (no sequence-parallel sum). The routed experts split like a dense
    // MLP; the shared experts are the layer's dense MLP.
    // The routed experts are a block of their own (experts_layout).
    b.add("moe.router", h, moe.num_experts, ShardDim::none, Init::normal);
    b.block.params.back().sp_partial = false;
    if (moe.shared_experts == 0)
      return b.finish(dp);
  }
  const std::int64_t fm =
      moe.is_moe_layer(unit) ? moe.shared_experts * moe.shared_expert_ffn_hidden_size : f;
  if (m.llama()) {
    b.add("mlp.wg", h, fm, ShardDim::cols, Init::normal);
    b.add("mlp.wu", h, fm, ShardDim::cols, Init::normal);
  } else {
    b.add("mlp.w1", h, f, ShardDim::cols, Init::normal);
    if (c.bias)
      b.add("mlp.b1", 1, f, ShardDim::cols, Init::zeros);
  }
  b.add("mlp.w2", fm, h, ShardDim::rows, Init::normal, out_std);
  if (c.bias)
    b.add("mlp.b2", 1, h, ShardDim::none, Init::zeros);
  return b.finish(dp);
}

// The routed experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of MoE layer `unit`, split over TP like
// a dense MLP, padded for `dp` ranks (the expert-data-parallel ones).
BlockLayout experts_layout(const ExecModel& m, int unit, int tp, int tp_rank, int dp, int ep,
                           int ep_rank) {
  const ModelConfig& c = m.config;
  const MoeConfig& moe = c.moe;
  PARALLAX_CHECK(moe.num_experts % ep == 0 && ep_rank >= 0 && ep_rank < ep,
                 "expert parallelism must divide the experts");
  const std::int64_t h = c.hidden_size;
  const std::int64_t fe = moe.expert_ffn_hidden_size;
  const float out_std = 0.02f / std::sqrt(2.0f * static_cast<float>(c.num_layers));
  LayoutBuilder b{
      .block = {.kind = BlockKind::experts, .name = fmt::format("block{}", unit), .unit = unit},
      .tp = tp,
      .tp_rank = tp_rank};
  const int local = moe.num_experts / ep;
  for (int j = ep_rank * local; j < (ep_rank + 1) * local; ++j) {
    b.add(fmt::format("moe.e{}.wg", j), h, fe, ShardDim::cols, Init::normal);
    b.add(fmt::format("moe.e{}.wu", j), h, fe, ShardDim::cols, Init::normal);
    b.add(fmt::format("moe.e{}.w2", j), fe, h, ShardDim::rows, Init::normal, out_std);
  }
  return b.finish(dp);
}

} // namespace

const ParamInfo& BlockLayout::param(std::string_view suffix) const {
  for (const ParamInfo& p : params) {
    const std::string_view n = p.name;
    if (n.size() > suffix.size() && n.substr(n.size() - suffix.size()) == suffix &&
        n[n.size() - suffix.size() - 1] == '.') {
      return p;
    }
  }
  check_fail(__FILE__, __LINE__, "param",
             fmt::format("block {} has no parameter {}", name, suffix));
}

ExecModel ExecModel::from_config(const ModelConfig& c, const std::string& source) {
  require(c.family == ModelFamily::gpt || c.family == ModelFamily::llama, source, "/family",
          "\"gpt\" or \"llama\" (the executor trains decoder-only models)",
          std::string(model_family_name(c.family)));
  require(c.activation == "gelu" || c.activation == "swiglu", source, "/activation",
          "\"gelu\" or \"swiglu\"", c.activation);
  require(c.position_embedding == "learned" || c.position_embedding == "rope", source,
          "/position_embedding", "\"learned\" or \"rope\" for training", c.position_embedding);
  // Mixtures of experts train dropless or with a capacity factor, with normalised top-k weights
  // and no selection bias or shared-expert gate; latent attention and QK norms are planned and
  // simulated, not trained.
  require(!c.moe.enabled() || (!c.moe.router_bias && !c.moe.shared_expert_gate), source, "/moe",
          "a mixture without router_bias or shared_expert_gate for training (plan and simulate "
          "take both)",
          fmt::format("router_bias {}, shared_expert_gate {}", c.moe.router_bias,
                      c.moe.shared_expert_gate));
  require(!c.mla.enabled(), source, "/mla",
          "absent: the executor does not train multi-head latent attention yet (plan and "
          "simulate do)",
          fmt::format("kv_lora_rank {}", c.mla.kv_lora_rank));
  require(!c.qk_norm, source, "/qk_norm", "false: the executor has no query/key norms yet", "true");
  require(c.head_dim() * c.num_attention_heads == c.hidden_size, source, "/num_attention_heads",
          "a divisor of hidden_size", std::to_string(c.num_attention_heads));
  require(c.position_embedding != "rope" || c.head_dim() % 2 == 0, source, "/hidden_size",
          "an even head dimension for rotary embeddings", std::to_string(c.head_dim()));
  require(c.position_embedding != "learned" || c.max_position_embeddings >= c.seq_length, source,
          "/max_position_embeddings", fmt::format(">= seq_length {}", c.seq_length),
          std::to_string(c.max_position_embeddings));
  require(c.vocab_size <= (std::int64_t{1} << 31), source, "/vocab_size", "< 2^31",
          std::to_string(c.vocab_size));
  ExecModel m;
  m.config = c;
  return m;
}

std::vector<std::int32_t> context_chunk_positions(Eigen::Index seq, int cp, int cp_rank) {
  PARALLAX_CHECK(cp >= 1 && cp_rank >= 0 && cp_rank < cp && seq % (2 * cp) == 0,
                 "context parallelism splits the sequence into 2·cp equal chunks");
  const Eigen::Index chunk = seq / (2 * cp);
  std::vector<std::int32_t> out;
  out.reserve(static_cast<std::size_t>(2 * chunk));
  for (const Eigen::Index c : {Eigen::Index{cp_rank}, Eigen::Index{2 * cp - 1 - cp_rank}}) {
    for (Eigen::Index i = 0; i < chunk; ++i) {
      out.push_back(static_cast<std::int32_t>(c * chunk + i));
    }
  }
  return out;
}

std::vector<BlockLayout> chunk_layout(const ExecModel& m, StageRange units, int tp, int tp_rank,
                                      int dp, int ep, int ep_rank) {
  PARALLAX_CHECK(ep >= 1 && dp % ep == 0, "expert parallelism must divide the dp·cp ranks");
  const ModelConfig& c = m.config;
  const std::int64_t h = c.hidden_size;
  std::vector<BlockLayout> blocks;
  if (units.first == 0) {
    LayoutBuilder e{.block = {.kind = BlockKind::embedding, .name = "embedding", .unit = 0},
                    .tp = tp,
                    .tp_rank = tp_rank};
    e.add("wte", c.vocab_size, h, ShardDim::rows, Init::normal, 0.02f, false, {}, true);
    blocks.push_back(e.finish(dp));
    if (!m.rope()) {
      LayoutBuilder p{.block = {.kind = BlockKind::positions, .name = "positions", .unit = 0},
                      .tp = tp,
                      .tp_rank = tp_rank};
      p.add("wpe", c.seq_length, h, ShardDim::none, Init::normal, 0.01f);
      blocks.push_back(p.finish(dp));
    }
  }
  for (int u = units.first; u < units.second; ++u) {
    blocks.push_back(layer_layout(m, u, tp, tp_rank, dp));
    if (c.moe.is_moe_layer(u)) {
      blocks.push_back(experts_layout(m, u, tp, tp_rank, dp / ep, ep, ep_rank));
    }
  }
  if (units.second == c.num_layers) {
    const int last = c.num_layers - 1;
    LayoutBuilder n{.block = {.kind = BlockKind::final_norm, .name = "final_norm", .unit = last},
                    .tp = tp,
                    .tp_rank = tp_rank};
    add_norm(n, m, "norm");
    blocks.push_back(n.finish(dp));
    LayoutBuilder hd{.block = {.kind = BlockKind::head, .name = "head", .unit = last},
                     .tp = tp,
                     .tp_rank = tp_rank};
    if (c.tied_embeddings) {
      // Same shape and split as the embedding block, so their shards match element by element.
      hd.add("wte", c.vocab_size, h, ShardDim::rows, Init::normal, 0.02f, true, "embedding.wte",
             true);
    } else {
      hd.add("w", h, c.vocab_size, ShardDim::cols, Init::normal, 0.02f, false, {}, true);
    }
    blocks.push_back(hd.finish(dp));
  }
  return blocks;
}

std::vector<ParamInfo> logical_params(const ExecModel& m) {
  std::vector<ParamInfo> out;
  for (const BlockLayout& b : chunk_layout(m, {0, m.config.num_layers}, 1, 0, 1)) {
    for (const ParamInfo& p : b.params) {
      if (!p.tied_copy)
        out.push_back(p);
    }
  }
  return out;
}

void init_block(const BlockLayout& block, std::uint64_t seed, std::span<float> flat) {
  PARALLAX_CHECK(static_cast<std::int64_t>(flat.size()) == block.padded, "flat buffer size");
  std::fill(flat.begin(), flat.end(), 0.0f);
  for (const ParamInfo& p : block.params) {
    const std::uint64_t key = splitmix64(seed ^ hash_name(p.name));
    for (std::int64_t i = 0; i < p.valid_rows(); ++i) {
      for (std::int64_t j = 0; j < p.valid_cols(); ++j) {
        const auto global = static_cast<std::uint64_t>((p.row0 + i) * p.cols + p.col0 + j);
        float v = 0.0f;
        switch (p.init) {
        case Init::normal:
          v = p.init_std * normal_at(key, global);
          break;
        case Init::ones:
          v = 1.0f;
          break;
        case Init::zeros:
          v = 0.0f;
          break;
        }
        flat[static_cast<std::size_t>(p.offset + i * p.local_cols + j)] = v;
      }
    }
  }
}

double model_flops_per_sequence(const ExecModel& model) {
  return transformer_build_graph(model.config).model_flops_per_sequence();
}

double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

namespace {
bool expert_param(std::string_view suffix) {
  return suffix.starts_with("moe.e");
}
} // namespace

ConstMatRef BlockBuffers::p(std::string_view suffix) const {
  if (experts_layout != nullptr && expert_param(suffix)) {
    const ParamInfo& i = experts_layout->param(suffix);
    return {experts_params + i.offset, i.local_rows, i.local_cols};
  }
  const ParamInfo& i = layout->param(suffix);
  return {params + i.offset, i.local_rows, i.local_cols};
}

MatRef BlockBuffers::g(std::string_view suffix) const {
  if (experts_layout != nullptr && expert_param(suffix)) {
    const ParamInfo& i = experts_layout->param(suffix);
    return {experts_grads + i.offset, i.local_rows, i.local_cols};
  }
  const ParamInfo& i = layout->param(suffix);
  return {grads + i.offset, i.local_rows, i.local_cols};
}

} // namespace parallax
