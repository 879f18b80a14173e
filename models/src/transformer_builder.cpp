#include "parallax/models/transformer_builder.hpp"

#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace parallax {

namespace {

// FLOPs per element of the non-GEMM layers (forward); backward costs about twice as much.
constexpr double kLayerNormFlopsPerElem = 8.0;
constexpr double kRmsNormFlopsPerElem = 5.0;
constexpr double kGeluFlopsPerElem = 8.0;
constexpr double kSwigluFlopsPerElem = 6.0;
constexpr double kSoftmaxFlopsPerElem = 5.0;
constexpr double kRopeFlopsPerElem = 3.0;
constexpr double kCrossEntropyFlopsPerElem = 5.0;

Layer layer_make(std::string name, LayerKind kind, TpSplit split, int unit, int block) {
  Layer l;
  l.name = std::move(name);
  l.kind = kind;
  l.tp_split = split;
  l.unit = unit;
  l.block = block;
  return l;
}

class Builder {
public:
  Builder(const ModelConfig& c, LayerGraph& g) : c_(c), g_(g) {}

  LayerGraph::Vertex add(Layer layer, std::initializer_list<LayerGraph::Vertex> inputs) {
    double gemm_flops = 0;
    for (const Gemm& gemm : layer.gemms) {
      gemm_flops += gemm.flops();
    }
    layer.fwd_flops += gemm_flops;
    layer.bwd_flops += 2.0 * gemm_flops; // input gradient + weight gradient
    auto v = g_.add_layer(std::move(layer));
    for (auto in : inputs) {
      g_.add_edge(in, v);
    }
    return v;
  }

  Layer norm(std::string name, int unit, int block) const {
    const double sh = s() * h();
    const bool ln = c_.norm == "layernorm";
    Layer l = layer_make(std::move(name), LayerKind::norm, TpSplit::sequence, unit, block);
    l.output_shape = {c_.seq_length, c_.hidden_size};
    l.params = ln ? 2 * c_.hidden_size : c_.hidden_size;
    l.fwd_flops = (ln ? kLayerNormFlopsPerElem : kRmsNormFlopsPerElem) * sh;
    l.bwd_flops = 2.0 * l.fwd_flops;
    l.fwd_mem_elems = 2.0 * sh;
    l.saved_act_elems = sh;
    return l;
  }

  // GELU, or SwiGLU's gate (two inputs), over `elems` elements per sequence.
  Layer activation(std::string name, int unit, int block, std::vector<std::int64_t> shape,
                   double elems, bool swiglu) const {
    Layer l = layer_make(std::move(name), LayerKind::activation, TpSplit::column, unit, block);
    l.output_shape = std::move(shape);
    l.fwd_flops = (swiglu ? kSwigluFlopsPerElem : kGeluFlopsPerElem) * elems;
    l.bwd_flops = 2.0 * l.fwd_flops;
    l.fwd_mem_elems = (swiglu ? 3.0 : 2.0) * elems;
    l.saved_act_elems = (swiglu ? 2.0 : 1.0) * elems;
    return l;
  }

  Layer residual(std::string name, int unit, int block) const {
    const double sh = s() * h();
    Layer l = layer_make(std::move(name), LayerKind::elementwise, TpSplit::sequence, unit, block);
    l.output_shape = {c_.seq_length, c_.hidden_size};
    l.fwd_flops = (c_.dropout ? 2.0 : 1.0) * sh;
    l.bwd_flops = l.fwd_flops;
    l.fwd_mem_elems = 3.0 * sh;
    l.saved_mask_bytes = c_.dropout ? sh : 0.0;
    return l;
  }

  void edge(LayerGraph::Vertex from, LayerGraph::Vertex to) { g_.add_edge(from, to); }

  double s() const { return static_cast<double>(c_.seq_length); }
  double h() const { return static_cast<double>(c_.hidden_size); }

private:
  const ModelConfig& c_;
  LayerGraph& g_;
};

// A fused (flash) attention core: the s×s scores never reach memory; the backward recomputes
// QKᵀ and the softmax from Q, K, V and the per-row log-sum-exp (fp32: two 16-bit elements per
// head and token, `heads_s` = a·s of them).
void fuse_attention(Layer& core, const ModelConfig& c, double fwd_flops, double softmax_flops,
                    double qkv_elems, double heads_s) {
  core.fused = true;
  core.kernel = c.attention_impl == "flash2" ? FusedKernel::flash2 : FusedKernel::native;
  core.fwd_flops = fwd_flops;
  core.bwd_flops = 2.0 * core.fwd_flops;
  core.bwd_extra_flops = core.gemms[0].flops() + softmax_flops;
  core.fwd_mem_elems = 2.0 * qkv_elems;
  core.saved_act_elems = qkv_elems + 2.0 * heads_s;
}

// Standard multi-head (grouped-query) attention: the QKV projection, the core, the output
// projection (Megatron-LM's column / heads / row split).
LayerGraph::Vertex add_attention(Builder& b, const ModelConfig& c, const std::string& p, int i,
                                 LayerGraph::Vertex n1) {
  const std::int64_t S = c.seq_length;
  const std::int64_t H = c.hidden_size;
  const std::int64_t A = c.num_attention_heads;
  const std::int64_t D = c.head_dim();
  const std::int64_t QW = A * D;              // width of Q (hidden_size unless head_dim is stated)
  const std::int64_t KV = c.num_kv_heads * D; // width of K (and of V)
  const double s = b.s();
  const double sh = s * b.h();
  const double as2 = static_cast<double>(A) * s * s;
  Layer qkv = layer_make(p + "attn.qkv", LayerKind::linear, TpSplit::column, i, i);
  qkv.output_shape = {S, QW + 2 * KV};
  qkv.params = H * (QW + 2 * KV) + (c.bias ? QW + 2 * KV : 0) + (c.qk_norm ? 2 * D : 0);
  qkv.gemms = {{1, S, QW + 2 * KV, H}};
  qkv.fwd_flops = c.bias ? s * static_cast<double>(QW + 2 * KV) : 0.0;
  qkv.bwd_flops = qkv.fwd_flops;
  qkv.saved_act_elems = sh; // its input, for the weight gradient
  qkv.tp_bwd_comm_elems = sh;
  auto vqkv = b.add(std::move(qkv), {n1});

  // Attention core: QKᵀ, softmax, dropout, ·V. It keeps Q, K and V for its backward.
  Layer core = layer_make(p + "attn.core", LayerKind::attention, TpSplit::heads, i, i);
  core.output_shape = {S, QW};
  core.gemms = {{A, S, S, D}, {A, S, D, S}};
  const double qkv_elems = s * static_cast<double>(QW) + 2.0 * s * static_cast<double>(KV);
  const double softmax_flops = kSoftmaxFlopsPerElem * as2;
  const double rope_flops =
      (c.position_embedding == "rope" ? kRopeFlopsPerElem * s * static_cast<double>(QW + KV)
                                      : 0.0) +
      (c.qk_norm ? kRmsNormFlopsPerElem * s * static_cast<double>(QW + KV) : 0.0);
  if (c.attention_impl == "flash" || c.attention_impl == "flash2") {
    fuse_attention(core, c, softmax_flops + rope_flops, softmax_flops, qkv_elems,
                   static_cast<double>(A) * s);
  } else {
    // Materialised scores: softmax output (and dropout output and mask) are kept; selective
    // recomputation drops exactly these s² tensors (Korthikanti et al. 2022).
    const double score_elems = c.dropout ? 2.0 * as2 : as2;
    core.fwd_flops = softmax_flops + (c.dropout ? as2 : 0.0) + rope_flops;
    core.bwd_flops = 2.0 * core.fwd_flops;
    core.fwd_mem_elems = 4.0 * as2 + qkv_elems + sh;
    core.saved_act_elems = qkv_elems + score_elems;
    core.saved_mask_bytes = c.dropout ? as2 : 0.0;
    core.selective_saved_elems = score_elems;
    core.selective_recompute = true;
  }
  auto vcore = b.add(std::move(core), {vqkv});

  Layer proj = layer_make(p + "attn.proj", LayerKind::linear, TpSplit::row, i, i);
  proj.output_shape = {S, H};
  proj.params = QW * H + (c.bias ? H : 0);
  proj.gemms = {{1, S, H, QW}};
  proj.saved_act_elems = s * static_cast<double>(QW);
  proj.tp_fwd_comm_elems = sh;
  return b.add(std::move(proj), {vcore});
}

// Multi-head latent attention (DeepSeek-V2/V3; shapes as in DeepSeek's modeling code): the
// down-projections to the query and key/value latents are replicated over tensor-parallel ranks
// (Megatron-Core's MLA), the up-projections column-parallel by heads, the output row-parallel.
LayerGraph::Vertex add_latent_attention(Builder& b, const ModelConfig& c, const std::string& p,
                                        int i, LayerGraph::Vertex input) {
  const MlaConfig& m = c.mla;
  const std::int64_t S = c.seq_length;
  const std::int64_t H = c.hidden_size;
  const std::int64_t A = c.num_attention_heads;
  const std::int64_t QK = m.qk_nope_head_dim + m.qk_rope_head_dim; // query / key head width
  const double s = b.s();
  const double sh = s * b.h();
  const double as2 = static_cast<double>(A) * s * s;
  const auto sx = [s](std::int64_t width) { return s * static_cast<double>(width); };

  // Queries: a rank-q_lora_rank bottleneck with its RMSNorm, or one projection.
  LayerGraph::Vertex q_in = input;
  std::int64_t q_in_width = H;
  if (m.q_lora_rank > 0) {
    Layer down = layer_make(p + "attn.q_down", LayerKind::linear, TpSplit::replicated, i, i);
    down.output_shape = {S, m.q_lora_rank};
    down.params = H * m.q_lora_rank + m.q_lora_rank; // + q_a_layernorm
    down.gemms = {{1, S, m.q_lora_rank, H}};
    down.fwd_flops = kRmsNormFlopsPerElem * sx(m.q_lora_rank);
    down.bwd_flops = 2.0 * down.fwd_flops;
    down.saved_act_elems = sh + sx(m.q_lora_rank); // its input and the latent before the norm
    q_in = b.add(std::move(down), {input});
    q_in_width = m.q_lora_rank;
  }
  Layer q_up = layer_make(p + "attn.q_up", LayerKind::linear, TpSplit::column, i, i);
  q_up.output_shape = {S, A * QK};
  q_up.params = q_in_width * A * QK;
  q_up.gemms = {{1, S, A * QK, q_in_width}};
  q_up.saved_act_elems = sx(q_in_width);
  q_up.tp_bwd_comm_elems = sx(q_in_width);
  const LayerGraph::Vertex vq = b.add(std::move(q_up), {q_in});

  // Keys and values: one latent (plus the decoupled RoPE key shared by all heads).
  const std::int64_t latent = m.kv_lora_rank + m.qk_rope_head_dim;
  Layer kv_down = layer_make(p + "attn.kv_down", LayerKind::linear, TpSplit::replicated, i, i);
  kv_down.output_shape = {S, latent};
  kv_down.params = H * latent + m.kv_lora_rank; // + kv_a_layernorm
  kv_down.gemms = {{1, S, latent, H}};
  kv_down.fwd_flops = kRmsNormFlopsPerElem * sx(m.kv_lora_rank);
  kv_down.bwd_flops = 2.0 * kv_down.fwd_flops;
  kv_down.saved_act_elems = sx(m.kv_lora_rank); // its input is the one q_down (q_up) keeps
  const LayerGraph::Vertex vkv_down = b.add(std::move(kv_down), {input});
  Layer kv_up = layer_make(p + "attn.kv_up", LayerKind::linear, TpSplit::column, i, i);
  kv_up.output_shape = {S, A * (m.qk_nope_head_dim + m.v_head_dim)};
  kv_up.params = m.kv_lora_rank * A * (m.qk_nope_head_dim + m.v_head_dim);
  kv_up.gemms = {{1, S, A * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank}};
  kv_up.saved_act_elems = sx(m.kv_lora_rank);
  kv_up.tp_bwd_comm_elems = sx(m.kv_lora_rank);
  const LayerGraph::Vertex vkv = b.add(std::move(kv_up), {vkv_down});

  // Attention core over QK-wide queries and keys and v_head_dim-wide values, fused (flash).
  Layer core = layer_make(p + "attn.core", LayerKind::attention, TpSplit::heads, i, i);
  core.output_shape = {S, A * m.v_head_dim};
  core.gemms = {{A, S, S, QK}, {A, S, m.v_head_dim, S}};
  const double softmax_flops = kSoftmaxFlopsPerElem * as2;
  const double rope_flops = kRopeFlopsPerElem * sx((A + 1) * m.qk_rope_head_dim);
  const double qkv_elems = sx(2 * A * QK + A * m.v_head_dim);
  fuse_attention(core, c, softmax_flops + rope_flops, softmax_flops, qkv_elems,
                 static_cast<double>(A) * s);
  const LayerGraph::Vertex vcore = b.add(std::move(core), {vq, vkv});

  Layer proj = layer_make(p + "attn.proj", LayerKind::linear, TpSplit::row, i, i);
  proj.output_shape = {S, H};
  proj.params = A * m.v_head_dim * H;
  proj.gemms = {{1, S, H, A * m.v_head_dim}};
  proj.saved_act_elems = sx(A * m.v_head_dim);
  proj.tp_fwd_comm_elems = sh;
  return b.add(std::move(proj), {vcore});
}

// Tokens each routed expert computes per sequence: its fair share s·k/E, or with a capacity
// factor that share padded up to the capacity.
std::int64_t expert_tokens(const ModelConfig& c) {
  const MoeConfig& m = c.moe;
  const double fair = static_cast<double>(c.seq_length) * m.experts_per_token / m.num_experts;
  const double tokens = m.capacity_factor > 0 ? std::ceil(m.capacity_factor * fair) : fair;
  return std::max<std::int64_t>(1, std::llround(tokens));
}

// A mixture-of-experts MLP (Shazeer et al. 2017; Mixtral, Qwen-MoE, DeepSeek-V3): router, token
// permutation to the experts, the routed SwiGLU experts as grouped GEMMs (one batch entry per
// expert, experts split like a dense MLP under tensor parallelism), the weighted combine, and
// the shared experts every token visits. Returns the block's output (the residual sum).
LayerGraph::Vertex add_moe(Builder& b, const ModelConfig& c, const std::string& p, int i,
                           LayerGraph::Vertex input, LayerGraph::Vertex residual_in) {
  const MoeConfig& m = c.moe;
  const std::int64_t S = c.seq_length;
  const std::int64_t H = c.hidden_size;
  const std::int64_t E = m.num_experts;
  const std::int64_t F = m.expert_ffn_hidden_size;
  const double s = b.s();
  const double sh = s * b.h();
  const double k = m.experts_per_token;
  const std::int64_t T = expert_tokens(c);
  const double routed = static_cast<double>(E * T); // token copies the experts compute

  Layer router = layer_make(p + "moe.router", LayerKind::linear, TpSplit::replicated, i, i);
  router.output_shape = {S, E};
  router.params = H * E + (m.router_bias ? E : 0);
  router.gemms = {{1, S, E, H}};
  // Scoring (softmax or sigmoid), top-k selection and the weights' normalisation.
  router.fwd_flops = (kSoftmaxFlopsPerElem + 2.0) * s * static_cast<double>(E);
  router.bwd_flops = kSoftmaxFlopsPerElem * s * static_cast<double>(E);
  router.fwd_mem_elems = 2.0 * s * static_cast<double>(E);
  router.saved_act_elems = sh + s * static_cast<double>(E); // its input and the scores
  const LayerGraph::Vertex vrouter = b.add(std::move(router), {input});

  // Permutation: each token copied to its k experts' rows (the backward gathers them back).
  Layer dispatch = layer_make(p + "moe.dispatch", LayerKind::elementwise, TpSplit::sequence, i, i);
  dispatch.output_shape = {E * T, H};
  dispatch.fwd_flops = routed * b.h();
  dispatch.bwd_flops = dispatch.fwd_flops;
  dispatch.fwd_mem_elems = sh + routed * b.h();
  const LayerGraph::Vertex vdispatch = b.add(std::move(dispatch), {vrouter, input});

  Layer up = layer_make(p + "moe.experts.up", LayerKind::linear, TpSplit::column, i, i);
  up.output_shape = {E * T, 2 * F};
  up.params = E * 2 * H * F;
  up.gemms = {{E, T, F, H}, {E, T, F, H}};
  up.saved_act_elems = routed * b.h();
  up.experts = m.num_experts;
  up.experts_active = m.experts_per_token;
  const LayerGraph::Vertex vup = b.add(std::move(up), {vdispatch});

  const double rf = routed * static_cast<double>(F);
  const LayerGraph::Vertex vact =
      b.add(b.activation(p + "moe.experts.act", i, i, {E * T, F}, rf, true), {vup});

  Layer down = layer_make(p + "moe.experts.down", LayerKind::linear, TpSplit::row, i, i);
  down.output_shape = {E * T, H};
  down.params = E * F * H;
  down.gemms = {{E, T, H, F}};
  down.saved_act_elems = rf;
  down.tp_fwd_comm_elems = routed * b.h();
  down.experts = m.num_experts;
  down.experts_active = m.experts_per_token;
  const LayerGraph::Vertex vdown = b.add(std::move(down), {vact});

  // Combine: each token's k expert outputs weighted by its router scores (the backward needs
  // the outputs for the weights' gradient).
  Layer combine = layer_make(p + "moe.combine", LayerKind::elementwise, TpSplit::sequence, i, i);
  combine.output_shape = {S, H};
  combine.fwd_flops = 2.0 * k * sh;
  combine.bwd_flops = 2.0 * combine.fwd_flops;
  combine.fwd_mem_elems = routed * b.h() + sh;
  combine.saved_act_elems = routed * b.h();
  const LayerGraph::Vertex vcombine = b.add(std::move(combine), {vdown, vrouter});

  std::vector<LayerGraph::Vertex> sum = {vcombine, residual_in};
  if (m.shared_experts > 0) {
    const std::int64_t FS = m.shared_experts * m.shared_expert_ffn_hidden_size;
    const double sfs = s * static_cast<double>(FS);
    Layer sup = layer_make(p + "moe.shared.up", LayerKind::linear, TpSplit::column, i, i);
    sup.output_shape = {S, 2 * FS};
    sup.params = 2 * H * FS + (m.shared_expert_gate ? H : 0);
    sup.gemms = {{1, S, FS, H}, {1, S, FS, H}};
    sup.saved_act_elems = sh;
    sup.tp_bwd_comm_elems = sh;
    const LayerGraph::Vertex vsup = b.add(std::move(sup), {input});
    const LayerGraph::Vertex vsact =
        b.add(b.activation(p + "moe.shared.act", i, i, {S, FS}, sfs, true), {vsup});
    Layer sdown = layer_make(p + "moe.shared.down", LayerKind::linear, TpSplit::row, i, i);
    sdown.output_shape = {S, H};
    sdown.params = FS * H;
    sdown.gemms = {{1, S, H, FS}};
    sdown.saved_act_elems = sfs;
    sdown.tp_fwd_comm_elems = sh;
    sum.push_back(b.add(std::move(sdown), {vsact}));
  }
  Layer res = b.residual(p + "mlp.residual", i, i);
  const LayerGraph::Vertex out = b.add(std::move(res), {});
  for (LayerGraph::Vertex v : sum) {
    b.edge(v, out);
  }
  return out;
}

} // namespace

LayerGraph transformer_build_graph(const ModelConfig& c) {
  PARALLAX_CHECK(
      c.num_layers > 0 && c.hidden_size > 0 && c.num_attention_heads > 0 && c.num_kv_heads > 0 &&
          (c.head_dim_stated > 0 || c.mla.enabled() || c.hidden_size % c.num_attention_heads == 0),
      "model shape must be validated before building");
  GraphInfo info{.name = c.name,
                 .family = std::string(model_family_name(c.family)),
                 .num_layers = c.num_layers,
                 .seq_length = c.seq_length,
                 .hidden_size = c.hidden_size,
                 .num_attention_heads = c.num_attention_heads,
                 .num_kv_heads = c.num_kv_heads,
                 .vocab_size = c.vocab_size,
                 .ffn_hidden_size = c.moe_layers() < c.num_layers ? c.ffn_hidden_size : 0,
                 .tied_embeddings = c.tied_embeddings,
                 .num_experts = c.moe.num_experts,
                 .experts_per_token = c.moe.experts_per_token,
                 .expert_ffn_hidden_size = c.moe.enabled() ? c.moe.expert_ffn_hidden_size : 0};
  LayerGraph g(info);
  Builder b(c, g);

  const std::int64_t S = c.seq_length;
  const std::int64_t H = c.hidden_size;
  const std::int64_t F = c.ffn_hidden_size;
  const std::int64_t V = c.vocab_size;
  const double s = static_cast<double>(S);
  const double h = static_cast<double>(H);
  const double sh = s * h;
  const double sf = s * static_cast<double>(F);
  const bool bert = c.family == ModelFamily::bert;
  const int last = c.num_layers - 1;

  // Embedding: vocabulary-parallel lookup (+ learned positions), all-reduced across TP ranks.
  Layer embed = layer_make("embedding", LayerKind::embedding, TpSplit::vocab, 0, -1);
  embed.output_shape = {S, H};
  embed.params = V * H;
  if (c.position_embedding == "learned") {
    embed.params += c.max_position_embeddings * H;
  }
  if (bert) {
    embed.params += 2 * H + 2 * H; // token-type embeddings and the embedding LayerNorm
  }
  embed.fwd_flops = sh;
  embed.bwd_flops = sh;
  embed.fwd_mem_elems = 3.0 * sh;
  embed.saved_mask_bytes = c.dropout ? sh : 0.0;
  embed.tp_fwd_comm_elems = sh;
  auto x = b.add(std::move(embed), {});

  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = fmt::format("block{}.", i);
    auto n1 = b.add(b.norm(p + "norm1", i, i), {x});

    LayerGraph::Vertex vproj{};
    if (c.mla.enabled()) {
      vproj = add_latent_attention(b, c, p, i, n1);
    } else {
      vproj = add_attention(b, c, p, i, n1);
    }
    auto r1 = b.add(b.residual(p + "attn.residual", i, i), {vproj, x});

    auto n2 = b.add(b.norm(p + "norm2", i, i), {r1});
    if (c.moe.is_moe_layer(i)) {
      x = add_moe(b, c, p, i, n2, r1);
      continue;
    }
    const bool swiglu = c.activation == "swiglu";
    Layer up = layer_make(p + "mlp.up", LayerKind::linear, TpSplit::column, i, i);
    up.output_shape = {S, swiglu ? 2 * F : F};
    up.params = (swiglu ? 2 : 1) * H * F + (c.bias ? (swiglu ? 2 : 1) * F : 0);
    up.gemms =
        swiglu ? std::vector<Gemm>{{1, S, F, H}, {1, S, F, H}} : std::vector<Gemm>{{1, S, F, H}};
    up.saved_act_elems = sh;
    up.tp_bwd_comm_elems = sh;
    auto vup = b.add(std::move(up), {n2});

    auto vact = b.add(b.activation(p + "mlp.act", i, i, {S, F}, sf, swiglu), {vup});

    Layer down = layer_make(p + "mlp.down", LayerKind::linear, TpSplit::row, i, i);
    down.output_shape = {S, H};
    down.params = F * H + (c.bias ? H : 0);
    down.gemms = {{1, S, H, F}};
    down.saved_act_elems = sf;
    down.tp_fwd_comm_elems = sh;
    auto vdown = b.add(std::move(down), {vact});
    x = b.add(b.residual(p + "mlp.residual", i, i), {vdown, r1});
  }

  if (bert) {
    // Pooler and next-sentence classifier (on the first token only) and the MLM transform.
    Layer pooler = layer_make("pooler", LayerKind::linear, TpSplit::replicated, last, -1);
    pooler.output_shape = {1, H};
    pooler.params = H * H + H + 2 * H + 2;
    pooler.gemms = {{1, 1, H, H}};
    b.add(std::move(pooler), {x});
    Layer transform = layer_make("mlm.transform", LayerKind::linear, TpSplit::replicated, last, -1);
    transform.output_shape = {S, H};
    transform.params = H * H + H + 2 * H;
    transform.gemms = {{1, S, H, H}};
    transform.fwd_flops = (kGeluFlopsPerElem + kLayerNormFlopsPerElem) * sh;
    transform.bwd_flops = 2.0 * transform.fwd_flops;
    transform.fwd_mem_elems = 4.0 * sh;
    transform.saved_act_elems = 3.0 * sh;
    x = b.add(std::move(transform), {x});
  } else {
    x = b.add(b.norm("final_norm", last, -1), {x});
  }

  Layer head = layer_make("lm_head", LayerKind::linear, TpSplit::vocab, last, -1);
  head.output_shape = {S, V};
  head.params = (c.tied_embeddings ? 0 : V * H) + (bert ? V : 0);
  head.gemms = {{1, S, V, H}};
  head.saved_act_elems = sh;
  head.tp_bwd_comm_elems = sh;
  x = b.add(std::move(head), {x});

  // Vocabulary-parallel cross-entropy, fused (Megatron's vocab-parallel kernel, llm.c): the
  // forward reads the logits once, the backward reads them and writes their gradient. It keeps
  // fp32 logits (two 16-bit elements each) for the backward; three all-reduces of s fp32 values
  // (max, sum of exponentials, target logit).
  Layer loss = layer_make("loss", LayerKind::loss, TpSplit::vocab, last, -1);
  loss.output_shape = {1};
  loss.fwd_flops = kCrossEntropyFlopsPerElem * s * static_cast<double>(V);
  loss.bwd_flops = 2.0 * s * static_cast<double>(V);
  // Unfused (eager) cross-entropy moves ~36 bytes per logit over forward and backward: the fp32
  // copy (read 2, write 4), log-softmax (read 4, write 4), its backward (read 4 + 4, write 4)
  // and the cast of the gradient back (read 4, write 2): 6 16-bit elements forward, with the
  // backward's usual twice that.
  loss.fwd_mem_elems = (c.loss_impl == "unfused" ? 6.0 : 1.0) * s * static_cast<double>(V);
  loss.saved_act_elems = 2.0 * s * static_cast<double>(V);
  // Eager cross-entropy holds working copies beside the softmax it keeps while it forms it: the
  // 16-bit logits and an fp32 copy, three 16-bit elements per logit (the Hugging Face models
  // keep logits.float() beside log_softmax's output; nanotron's vocab-parallel loss casts the
  // logits to fp32 and subtracts the maximum into a new tensor). A fused kernel works in place.
  loss.working_act_elems = c.loss_impl == "unfused" ? 3.0 * s * static_cast<double>(V) : 0.0;
  loss.tp_fwd_comm_elems = 6.0 * s;
  b.add(std::move(loss), {x});
  return g;
}

} // namespace parallax
