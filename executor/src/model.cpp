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
  if (m.llama()) {
    b.add("mlp.wg", h, f, ShardDim::cols, Init::normal);
    b.add("mlp.wu", h, f, ShardDim::cols, Init::normal);
  } else {
    b.add("mlp.w1", h, f, ShardDim::cols, Init::normal);
    if (c.bias)
      b.add("mlp.b1", 1, f, ShardDim::cols, Init::zeros);
  }
  b.add("mlp.w2", f, h, ShardDim::rows, Init::normal, out_std);
  if (c.bias)
    b.add("mlp.b2", 1, h, ShardDim::none, Init::zeros);
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

std::vector<BlockLayout> chunk_layout(const ExecModel& m, StageRange units, int tp, int tp_rank,
                                      int dp) {
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

ConstMatRef BlockBuffers::p(std::string_view suffix) const {
  const ParamInfo& i = layout->param(suffix);
  return {params + i.offset, i.local_rows, i.local_cols};
}

MatRef BlockBuffers::g(std::string_view suffix) const {
  const ParamInfo& i = layout->param(suffix);
  return {grads + i.offset, i.local_rows, i.local_cols};
}

namespace {

// Megatron's conjugate pair around a tensor-parallel region. gather: before a column-parallel
// GEMM (all-gather of sequence shards with SP, identity without); its backward is reduce.
// reduce: after a row-parallel GEMM (reduce-scatter to sequence shards with SP, all-reduce
// without); its backward is gather.
void report(const TpContext& tp, const char* what, double start, const Tensor& t) {
  if (tp.on_comm) {
    tp.on_comm(what, start, steady_seconds(), static_cast<double>(t.size()) * sizeof(float));
  }
}

// x over the full sequence: x itself, or (sequence parallelism) its all-gather into `storage`.
// The backward's gradients are gathered this way, without copying them first.
ConstMatRef full_rows(const TpContext& tp, const Tensor& x, Tensor& storage) {
  if (tp.size() == 1 || !tp.sequence_parallel)
    return x;
  const double start = steady_seconds();
  storage = Tensor(x.rows() * tp.size(), x.cols(), Tensor::uninitialized);
  tp.comm->all_gather(x.span(), storage.span());
  report(tp, "tp all-gather", start, storage);
  return storage;
}

Tensor tp_gather(const TpContext& tp, Tensor x) {
  Tensor full;
  full_rows(tp, x, full);
  return full.empty() ? std::move(x) : std::move(full);
}

Tensor tp_reduce(const TpContext& tp, Tensor x) {
  if (tp.size() == 1)
    return x;
  const double start = steady_seconds();
  if (!tp.sequence_parallel) {
    tp.comm->all_reduce_sum(x.span());
    report(tp, "tp all-reduce", start, x);
    return x;
  }
  PARALLAX_CHECK(x.rows() % tp.size() == 0, "sequence parallel needs rows divisible by tp");
  Tensor part(x.rows() / tp.size(), x.cols(), Tensor::uninitialized);
  tp.comm->reduce_scatter_sum(x.span(), part.span());
  report(tp, "tp reduce-scatter", start, x);
  return part;
}

Tensor copy_of(const Tensor& x) {
  Tensor y(x.rows(), x.cols(), Tensor::uninitialized);
  std::copy(x.span().begin(), x.span().end(), y.span().begin());
  return y;
}

struct NormOut {
  Tensor y, mean, rstd;
};

NormOut norm_forward(const ExecModel& m, const BlockBuffers& b, const std::string& prefix,
                     const Tensor& x) {
  NormOut o{Tensor(x.rows(), x.cols(), Tensor::uninitialized),
            Tensor(x.rows(), 1, Tensor::uninitialized), Tensor(x.rows(), 1, Tensor::uninitialized)};
  if (m.rmsnorm()) {
    ops::rmsnorm_forward(x, b.p(prefix + ".gamma"), o.y, o.rstd, m.norm_eps);
  } else {
    ops::layernorm_forward(x, b.p(prefix + ".gamma"), b.p(prefix + ".beta"), o.y, o.mean, o.rstd,
                           m.norm_eps);
  }
  return o;
}

// dx = norm backward(dy); accumulates into dx when `accumulate`.
void norm_backward(const ExecModel& m, const BlockBuffers& b, const std::string& prefix,
                   const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& dy,
                   Tensor& dx, bool accumulate) {
  Tensor tmp(x.rows(), x.cols(), Tensor::uninitialized);
  if (m.rmsnorm()) {
    ops::rmsnorm_backward(x, b.p(prefix + ".gamma"), rstd, dy, tmp, b.g(prefix + ".gamma"));
  } else {
    ops::layernorm_backward(x, b.p(prefix + ".gamma"), mean, rstd, dy, tmp, b.g(prefix + ".gamma"),
                            b.g(prefix + ".beta"));
  }
  if (accumulate) {
    dx.m() += tmp.m();
  } else {
    dx = std::move(tmp);
  }
}

ConstMatRef opt_p(const ExecModel& m, const BlockBuffers& b, std::string_view s) {
  return m.config.bias ? b.p(s) : ConstMatRef{};
}
MatRef opt_g(const ExecModel& m, const BlockBuffers& b, std::string_view s) {
  return m.config.bias ? b.g(s) : MatRef{};
}

// Cache slots of a transformer layer.
enum Slot : std::size_t {
  kX,
  kLn1Mean,
  kLn1Rstd,
  kLn1Full,
  kQ,
  kK,
  kV,
  kProbs,
  kAtt,
  kX1,
  kLn2Mean,
  kLn2Rstd,
  kLn2Full,
  kU,
  kUp,
  kAct,
  kNumSlots
};

ops::AttentionShape attention_shape(const ExecModel& m, const TpContext& tp, const MicroBatch& mb) {
  return {.batch = mb.batch,
          .seq = mb.seq,
          .heads = m.config.num_attention_heads / tp.size(),
          .kv_heads = m.config.num_kv_heads / tp.size(),
          .head_dim = static_cast<int>(m.config.head_dim())};
}

std::vector<std::int32_t> full_positions(const MicroBatch& mb) {
  std::vector<std::int32_t> pos(static_cast<std::size_t>(mb.batch * mb.seq));
  for (std::size_t r = 0; r < pos.size(); ++r) {
    pos[r] = static_cast<std::int32_t>(static_cast<Index>(r) % mb.seq);
  }
  return pos;
}

} // namespace

Tensor layer_forward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                     const MicroBatch& mb, const Tensor& x, KeepMode keep, BlockCache& cache) {
  const Index n = mb.batch * mb.seq;
  const ops::AttentionShape shape = attention_shape(m, tp, mb);
  const Index d = shape.head_dim;
  std::vector<Tensor> t(kNumSlots);

  // Attention sub-layer.
  NormOut ln1 = norm_forward(m, b, "ln1", x);
  t[kLn1Mean] = std::move(ln1.mean);
  t[kLn1Rstd] = std::move(ln1.rstd);
  t[kLn1Full] = tp_gather(tp, std::move(ln1.y));
  t[kQ] = Tensor(n, shape.heads * d, Tensor::uninitialized);
  t[kK] = Tensor(n, shape.kv_heads * d, Tensor::uninitialized);
  t[kV] = Tensor(n, shape.kv_heads * d, Tensor::uninitialized);
  ops::linear_forward(t[kLn1Full], b.p("attn.wq"), opt_p(m, b, "attn.bq"), t[kQ]);
  ops::linear_forward(t[kLn1Full], b.p("attn.wk"), opt_p(m, b, "attn.bk"), t[kK]);
  ops::linear_forward(t[kLn1Full], b.p("attn.wv"), opt_p(m, b, "attn.bv"), t[kV]);
  if (m.rope()) {
    const std::vector<std::int32_t> pos = full_positions(mb);
    ops::rope_forward(t[kQ], static_cast<int>(d), pos, m.rope_theta);
    ops::rope_forward(t[kK], static_cast<int>(d), pos, m.rope_theta);
  }
  t[kProbs] = Tensor(mb.batch * shape.heads, mb.seq * mb.seq, Tensor::uninitialized);
  t[kAtt] = Tensor(n, shape.heads * d, Tensor::uninitialized);
  ops::attention_forward(t[kQ], t[kK], t[kV], shape, t[kProbs], t[kAtt]);
  if (keep != KeepMode::all)
    t[kProbs].release();
  Tensor o(n, m.config.hidden_size, Tensor::uninitialized);
  ops::linear_forward(t[kAtt], b.p("attn.wo"), ConstMatRef{}, o);
  o = tp_reduce(tp, std::move(o));
  if (m.config.bias)
    o.m().rowwise() += b.p("attn.bo").m().row(0);
  t[kX1] = Tensor(x.rows(), x.cols(), Tensor::uninitialized);
  t[kX1].m() = x.m() + o.m();
  o.release();

  // MLP sub-layer.
  NormOut ln2 = norm_forward(m, b, "ln2", t[kX1]);
  t[kLn2Mean] = std::move(ln2.mean);
  t[kLn2Rstd] = std::move(ln2.rstd);
  t[kLn2Full] = tp_gather(tp, std::move(ln2.y));
  const Index f = m.config.ffn_hidden_size / tp.size();
  t[kU] = Tensor(n, f, Tensor::uninitialized);
  t[kAct] = Tensor(n, f, Tensor::uninitialized);
  if (m.llama()) {
    t[kUp] = Tensor(n, f, Tensor::uninitialized);
    ops::linear_forward(t[kLn2Full], b.p("mlp.wg"), ConstMatRef{}, t[kU]);
    ops::linear_forward(t[kLn2Full], b.p("mlp.wu"), ConstMatRef{}, t[kUp]);
    ops::swiglu_forward(t[kU], t[kUp], t[kAct]);
  } else {
    ops::linear_forward(t[kLn2Full], b.p("mlp.w1"), opt_p(m, b, "mlp.b1"), t[kU]);
    ops::gelu_forward(t[kU], t[kAct]);
  }
  Tensor dn(n, m.config.hidden_size, Tensor::uninitialized);
  ops::linear_forward(t[kAct], b.p("mlp.w2"), ConstMatRef{}, dn);
  dn = tp_reduce(tp, std::move(dn));
  if (m.config.bias)
    dn.m().rowwise() += b.p("mlp.b2").m().row(0);
  Tensor y(x.rows(), x.cols(), Tensor::uninitialized);
  y.m() = t[kX1].m() + dn.m();

  if (keep == KeepMode::input_only) {
    cache.t.assign(kNumSlots, Tensor());
    cache.t[kX] = copy_of(x);
  } else {
    t[kX] = copy_of(x);
    cache.t = std::move(t);
  }
  return y;
}

void layer_recompute(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                     const MicroBatch& mb, BlockCache& cache) {
  std::vector<Tensor>& t = cache.t;
  PARALLAX_CHECK(t.size() == kNumSlots && !t[kX].empty(), "layer backward without its forward");
  if (!t[kX1].empty())
    return; // the forward kept what the backward reads
  // Full recomputation: rerun the forward from the saved input (TP collectives included).
  BlockCache again;
  const Tensor x = std::move(t[kX]);
  layer_forward(m, b, tp, mb, x, KeepMode::all, again);
  cache = std::move(again);
}

Tensor layer_backward(const ExecModel& m, const BlockBuffers& b, const TpContext& tp,
                      const MicroBatch& mb, const Tensor& dy, BlockCache& cache) {
  layer_recompute(m, b, tp, mb, cache);
  std::vector<Tensor>& t = cache.t;
  const ops::AttentionShape shape = attention_shape(m, tp, mb);
  const Index n = mb.batch * mb.seq;

  // MLP sub-layer.
  if (m.config.bias)
    b.g("mlp.b2").m().row(0) += dy.m().colwise().sum();
  Tensor dd_storage;
  const ConstMatRef dd_full = full_rows(tp, dy, dd_storage);
  Tensor dact(n, t[kAct].cols(), Tensor::uninitialized);
  ops::linear_backward(t[kAct], b.p("mlp.w2"), dd_full, dact, b.g("mlp.w2"), MatRef{});
  t[kAct].release();
  Tensor dln2_full(n, m.config.hidden_size, Tensor::uninitialized);
  if (m.llama()) {
    Tensor dgate(n, t[kU].cols(), Tensor::uninitialized);
    Tensor dup(n, t[kU].cols(), Tensor::uninitialized);
    ops::swiglu_backward(t[kU], t[kUp], dact, dgate, dup);
    ops::linear_backward(t[kLn2Full], b.p("mlp.wg"), dgate, dln2_full, b.g("mlp.wg"), MatRef{});
    ops::linear_backward(t[kLn2Full], b.p("mlp.wu"), dup, dln2_full, b.g("mlp.wu"), MatRef{}, true);
  } else {
    Tensor du(n, t[kU].cols(), Tensor::uninitialized);
    ops::gelu_backward(t[kU], dact, du);
    ops::linear_backward(t[kLn2Full], b.p("mlp.w1"), du, dln2_full, b.g("mlp.w1"),
                         opt_g(m, b, "mlp.b1"));
  }
  t[kU].release();
  t[kUp].release();
  t[kLn2Full].release();
  const Tensor dln2 = tp_reduce(tp, std::move(dln2_full));
  Tensor dx1 = copy_of(dy);
  norm_backward(m, b, "ln2", t[kX1], t[kLn2Mean], t[kLn2Rstd], dln2, dx1, true);
  t[kX1].release();

  // Attention sub-layer.
  if (m.config.bias)
    b.g("attn.bo").m().row(0) += dx1.m().colwise().sum();
  Tensor do_storage;
  const ConstMatRef do_full = full_rows(tp, dx1, do_storage);
  Tensor datt(n, t[kAtt].cols(), Tensor::uninitialized);
  ops::linear_backward(t[kAtt], b.p("attn.wo"), do_full, datt, b.g("attn.wo"), MatRef{});
  t[kAtt].release();
  if (t[kProbs].empty()) {
    // Selective recomputation: the attention probabilities come back from q and k.
    t[kProbs] = Tensor(mb.batch * shape.heads, mb.seq * mb.seq, Tensor::uninitialized);
    ops::attention_probs(t[kQ], t[kK], shape, t[kProbs]);
  }
  Tensor dq(n, t[kQ].cols(), Tensor::uninitialized);
  Tensor dk(n, t[kK].cols(), Tensor::uninitialized);
  Tensor dv(n, t[kV].cols(), Tensor::uninitialized);
  ops::attention_backward(t[kQ], t[kK], t[kV], t[kProbs], datt, shape, dq, dk, dv);
  t[kProbs].release();
  if (m.rope()) {
    const std::vector<std::int32_t> pos = full_positions(mb);
    ops::rope_backward(dq, shape.head_dim, pos, m.rope_theta);
    ops::rope_backward(dk, shape.head_dim, pos, m.rope_theta);
  }
  Tensor dln1_full(n, m.config.hidden_size, Tensor::uninitialized);
  ops::linear_backward(t[kLn1Full], b.p("attn.wq"), dq, dln1_full, b.g("attn.wq"),
                       opt_g(m, b, "attn.bq"));
  ops::linear_backward(t[kLn1Full], b.p("attn.wk"), dk, dln1_full, b.g("attn.wk"),
                       opt_g(m, b, "attn.bk"), true);
  ops::linear_backward(t[kLn1Full], b.p("attn.wv"), dv, dln1_full, b.g("attn.wv"),
                       opt_g(m, b, "attn.bv"), true);
  const Tensor dln1 = tp_reduce(tp, std::move(dln1_full));
  norm_backward(m, b, "ln1", t[kX], t[kLn1Mean], t[kLn1Rstd], dln1, dx1, true);
  cache.t.clear();
  return dx1;
}

Tensor embedding_forward(const ExecModel& m, const BlockBuffers& emb, const BlockBuffers* positions,
                         const TpContext& tp, const MicroBatch& mb) {
  const ParamInfo& wte = emb.layout->param("wte");
  Tensor e(mb.batch * mb.seq, m.config.hidden_size, Tensor::uninitialized);
  ops::embedding_forward(mb.inputs, emb.p("wte"), wte.row0, e);
  e = tp_reduce(tp, std::move(e));
  if (positions != nullptr) {
    const auto wpe = positions->p("wpe").m();
    auto em = e.m();
    for (Index r = 0; r < e.rows(); ++r)
      em.row(r) += wpe.row(mb.positions[static_cast<std::size_t>(r)]);
  }
  return e;
}

void embedding_backward(const ExecModel& /*m*/, const BlockBuffers& emb,
                        const BlockBuffers* positions, const TpContext& tp, const MicroBatch& mb,
                        const Tensor& dx) {
  if (positions != nullptr) {
    auto dwpe = positions->g("wpe").m();
    const auto dm = dx.m();
    for (Index r = 0; r < dx.rows(); ++r)
      dwpe.row(mb.positions[static_cast<std::size_t>(r)]) += dm.row(r);
  }
  Tensor dfull_storage;
  const ConstMatRef dfull = full_rows(tp, dx, dfull_storage);
  ops::embedding_backward(mb.inputs, dfull, emb.layout->param("wte").row0, emb.g("wte"));
}

namespace {
enum HeadSlot : std::size_t { kHX, kHMean, kHRstd, kHFull, kHLogits, kHMax, kHSum, kHNumSlots };
// Logit of a padded vocabulary entry: exp(kMaskedLogit − max) is 0 for any real max.
constexpr float kMaskedLogit = -1e30f;
} // namespace

double head_forward(const ExecModel& m, const BlockBuffers& norm, const BlockBuffers& head,
                    const TpContext& tp, const MicroBatch& mb, const Tensor& x, BlockCache& cache) {
  std::vector<Tensor> t(kHNumSlots);
  NormOut o = norm_forward(m, norm, "norm", x);
  t[kHMean] = std::move(o.mean);
  t[kHRstd] = std::move(o.rstd);
  t[kHFull] = tp_gather(tp, std::move(o.y));
  const Index n = t[kHFull].rows();
  const bool tied = m.config.tied_embeddings;
  const ConstMatRef w = head.p(tied ? "wte" : "w");
  t[kHLogits] = Tensor(n, tied ? w.rows : w.cols, Tensor::uninitialized);
  if (tied) {
    t[kHLogits].m().noalias() = t[kHFull].m() * w.m().transpose();
  } else {
    ops::linear_forward(t[kHFull], w, ConstMatRef{}, t[kHLogits]);
  }
  const ParamInfo& vocab = head.layout->param(tied ? "wte" : "w");
  const std::int64_t vocab_begin = tied ? vocab.row0 : vocab.col0;
  // A padded vocabulary's extra logits take no part in the softmax (and get no gradient).
  const std::int64_t valid = tied ? vocab.valid_rows() : vocab.valid_cols();
  if (valid < t[kHLogits].cols()) {
    t[kHLogits].m().rightCols(t[kHLogits].cols() - valid).setConstant(kMaskedLogit);
  }
  t[kHMax] = Tensor(n, 1);
  t[kHSum] = Tensor(n, 1);
  Tensor target(n, 1);
  ops::row_max(t[kHLogits], t[kHMax]);
  if (tp.size() > 1)
    tp.comm->all_reduce_max(t[kHMax].span());
  ops::row_sum_exp(t[kHLogits], t[kHMax], t[kHSum]);
  ops::target_logits(t[kHLogits], mb.targets, vocab_begin, target);
  if (tp.size() > 1) {
    // One all-reduce for both sums.
    Tensor both(2, n);
    std::copy(t[kHSum].span().begin(), t[kHSum].span().end(), both.data());
    std::copy(target.span().begin(), target.span().end(), both.data() + n);
    tp.comm->all_reduce_sum(both.span());
    std::copy(both.data(), both.data() + n, t[kHSum].data());
    std::copy(both.data() + n, both.data() + 2 * n, target.data());
  }
  double loss = 0;
  for (Index r = 0; r < n; ++r) {
    loss +=
        std::log(static_cast<double>(t[kHSum].data()[r])) + t[kHMax].data()[r] - target.data()[r];
  }
  t[kHX] = copy_of(x);
  cache.t = std::move(t);
  return loss;
}

Tensor head_backward(const ExecModel& m, const BlockBuffers& norm, const BlockBuffers& head,
                     const TpContext& tp, const MicroBatch& mb, float loss_scale,
                     BlockCache& cache) {
  std::vector<Tensor>& t = cache.t;
  PARALLAX_CHECK(t.size() == kHNumSlots, "head backward without its forward");
  const bool tied = m.config.tied_embeddings;
  const std::int64_t vocab_begin =
      tied ? head.layout->param("wte").row0 : head.layout->param("w").col0;
  Tensor dlogits(t[kHLogits].rows(), t[kHLogits].cols(), Tensor::uninitialized);
  ops::cross_entropy_backward(t[kHLogits], t[kHMax], t[kHSum], mb.targets, vocab_begin, loss_scale,
                              dlogits);
  t[kHLogits].release();
  Tensor dfull(t[kHFull].rows(), t[kHFull].cols(), Tensor::uninitialized);
  if (tied) {
    const ConstMatRef w = head.p("wte");
    dfull.m().noalias() = dlogits.m() * w.m();
    head.g("wte").m().noalias() += dlogits.m().transpose() * t[kHFull].m();
  } else {
    ops::linear_backward(t[kHFull], head.p("w"), dlogits, dfull, head.g("w"), MatRef{});
  }
  dlogits.release();
  const Tensor dnorm = tp_reduce(tp, std::move(dfull));
  Tensor dx;
  norm_backward(m, norm, "norm", t[kHX], t[kHMean], t[kHRstd], dnorm, dx, false);
  cache.t.clear();
  return dx;
}

} // namespace parallax
