#include "parallax/models/model_config.hpp"

#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>

namespace parallax {

namespace {

constexpr std::array<std::string_view, 3> kFamilies = {"gpt", "llama", "bert"};
constexpr std::array<std::string_view, 2> kActivations = {"gelu", "swiglu"};
constexpr std::array<std::string_view, 2> kNorms = {"layernorm", "rmsnorm"};
constexpr std::array<std::string_view, 3> kPositions = {"learned", "rope", "alibi"};
constexpr std::array<std::string_view, 3> kAttentionImpls = {"flash", "flash2", "standard"};
constexpr std::array<std::string_view, 2> kLossImpls = {"fused", "unfused"};

constexpr std::int64_t kMaxDim = std::int64_t{1} << 24;

ModelFamily family_parse(const std::string& s) {
  for (std::size_t i = 0; i < kFamilies.size(); ++i) {
    if (kFamilies[i] == s) {
      return static_cast<ModelFamily>(i);
    }
  }
  return ModelFamily::gpt;
}

// Family defaults: GPT and BERT use GELU, LayerNorm, learned positions, biases and dropout;
// Llama uses SwiGLU, RMSNorm, RoPE, no biases, no dropout, untied embeddings.
void apply_family_defaults(ModelConfig& c) {
  const bool llama = c.family == ModelFamily::llama;
  c.activation = llama ? "swiglu" : "gelu";
  c.norm = llama ? "rmsnorm" : "layernorm";
  c.position_embedding = llama ? "rope" : "learned";
  c.bias = !llama;
  c.tied_embeddings = !llama;
  c.dropout = !llama;
}

constexpr std::array<std::string_view, 2> kRouterScorings = {"softmax", "sigmoid"};

MoeConfig moe_from_json(const JsonReader& r) {
  r.reject_unknown({"num_experts", "experts_per_token", "expert_ffn_hidden_size", "shared_experts",
                    "shared_expert_ffn_hidden_size", "shared_expert_gate", "first_dense_layers",
                    "layer_interval", "layer_offset", "router_scoring", "router_bias",
                    "capacity_factor", "aux_loss_coef"});
  MoeConfig m;
  m.num_experts = static_cast<int>(r.integer("num_experts", 1, 1 << 16));
  m.experts_per_token = static_cast<int>(r.integer("experts_per_token", 1, m.num_experts));
  m.expert_ffn_hidden_size = r.integer("expert_ffn_hidden_size", 1, kMaxDim);
  m.shared_experts = static_cast<int>(r.integer_or("shared_experts", 0, 0, 64));
  m.shared_expert_ffn_hidden_size =
      r.integer_or("shared_expert_ffn_hidden_size", m.expert_ffn_hidden_size, 1, kMaxDim);
  m.shared_expert_gate = r.boolean_or("shared_expert_gate", false);
  m.first_dense_layers = static_cast<int>(r.integer_or("first_dense_layers", 0, 0, 1 << 16));
  m.layer_interval = static_cast<int>(r.integer_or("layer_interval", 1, 1, 1 << 16));
  m.layer_offset = static_cast<int>(r.integer_or("layer_offset", 0, 0, m.layer_interval - 1));
  m.router_scoring = r.choice_or("router_scoring", kRouterScorings, m.router_scoring);
  m.router_bias = r.boolean_or("router_bias", false);
  m.capacity_factor = r.non_negative_or("capacity_factor", 0.0);
  if (m.capacity_factor > 0 && m.capacity_factor < 1) {
    r.fail("capacity_factor", "0 (dropless) or at least 1", fmt::format("{}", m.capacity_factor));
  }
  m.aux_loss_coef = r.non_negative_or("aux_loss_coef", 0.0);
  return m;
}

Json moe_to_json(const MoeConfig& m) {
  return {{"num_experts", m.num_experts},
          {"experts_per_token", m.experts_per_token},
          {"expert_ffn_hidden_size", m.expert_ffn_hidden_size},
          {"shared_experts", m.shared_experts},
          {"shared_expert_ffn_hidden_size", m.shared_expert_ffn_hidden_size},
          {"shared_expert_gate", m.shared_expert_gate},
          {"first_dense_layers", m.first_dense_layers},
          {"layer_interval", m.layer_interval},
          {"layer_offset", m.layer_offset},
          {"router_scoring", m.router_scoring},
          {"router_bias", m.router_bias},
          {"capacity_factor", m.capacity_factor},
          {"aux_loss_coef", m.aux_loss_coef}};
}

MlaConfig mla_from_json(const JsonReader& r) {
  r.reject_unknown(
      {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"});
  MlaConfig m;
  m.q_lora_rank = r.integer_or("q_lora_rank", 0, 0, kMaxDim);
  m.kv_lora_rank = r.integer("kv_lora_rank", 1, kMaxDim);
  m.qk_nope_head_dim = r.integer("qk_nope_head_dim", 1, kMaxDim);
  m.qk_rope_head_dim = r.integer("qk_rope_head_dim", 2, kMaxDim);
  m.v_head_dim = r.integer("v_head_dim", 1, kMaxDim);
  return m;
}

Json mla_to_json(const MlaConfig& m) {
  return {{"q_lora_rank", m.q_lora_rank},
          {"kv_lora_rank", m.kv_lora_rank},
          {"qk_nope_head_dim", m.qk_nope_head_dim},
          {"qk_rope_head_dim", m.qk_rope_head_dim},
          {"v_head_dim", m.v_head_dim}};
}

void check_shape(const ModelConfig& c, const JsonReader& r) {
  if (c.moe.enabled() && c.activation != "swiglu") {
    r.fail("activation", "\"swiglu\" (routed experts are SwiGLU MLPs)", c.activation);
  }
  if (c.moe.enabled() && c.moe_layers() == 0) {
    r.fail("moe", fmt::format("at least one MoE layer among the {} layers", c.num_layers),
           fmt::format("first_dense_layers {}, layer_interval {}, layer_offset {}",
                       c.moe.first_dense_layers, c.moe.layer_interval, c.moe.layer_offset));
  }
  if (c.head_dim_stated > 0 || c.mla.enabled()) {
    // The head dimension is stated (or MLA's), not hidden_size / heads.
  } else if (c.hidden_size % c.num_attention_heads != 0) {
    r.fail("num_attention_heads", fmt::format("a divisor of hidden_size {}", c.hidden_size),
           std::to_string(c.num_attention_heads));
  }
  if (c.mla.enabled()) {
    // Latent attention compresses: each rank below the width it stands for, RoPE on pairs.
    const MlaConfig& m = c.mla;
    // The field where it was read: the "mla" object of a model file, the top level of a Hugging
    // Face config.
    const auto fail = [&](const char* key, const std::string& expected, std::int64_t found) {
      if (r.has("mla"))
        r.child("mla").fail(key, expected, std::to_string(found));
      r.fail(key, expected, std::to_string(found));
    };
    const std::int64_t kv_width =
        static_cast<std::int64_t>(c.num_attention_heads) * (m.qk_nope_head_dim + m.v_head_dim);
    const std::int64_t q_width = static_cast<std::int64_t>(c.num_attention_heads) *
                                 (m.qk_nope_head_dim + m.qk_rope_head_dim);
    if (m.kv_lora_rank >= std::min(c.hidden_size, kv_width)) {
      fail("kv_lora_rank",
           fmt::format("below hidden_size {} and heads × (qk_nope + v head dims) = {}",
                       c.hidden_size, kv_width),
           m.kv_lora_rank);
    }
    if (m.q_lora_rank >= std::min(c.hidden_size, q_width)) {
      fail("q_lora_rank",
           fmt::format("0 (no query compression) or below hidden_size {} and heads × query "
                       "head dim = {}",
                       c.hidden_size, q_width),
           m.q_lora_rank);
    }
    if (m.qk_rope_head_dim % 2 != 0) {
      fail("qk_rope_head_dim", "an even number (RoPE rotates pairs)", m.qk_rope_head_dim);
    }
  }
  if (c.num_attention_heads % c.num_kv_heads != 0) {
    r.fail("num_kv_heads",
           fmt::format("a divisor of num_attention_heads {}", c.num_attention_heads),
           std::to_string(c.num_kv_heads));
  }
  if (c.position_embedding == "learned" && c.seq_length > c.max_position_embeddings) {
    r.fail("seq_length",
           fmt::format("at most max_position_embeddings = {} with learned positions",
                       c.max_position_embeddings),
           std::to_string(c.seq_length));
  }
}

} // namespace

std::string_view model_family_name(ModelFamily f) {
  return kFamilies.at(static_cast<int>(f));
}

ModelConfig model_config_from_json(const Json& doc, const std::string& source) {
  JsonReader r(doc, source);
  r.reject_unknown({"name",
                    "family",
                    "num_layers",
                    "hidden_size",
                    "num_attention_heads",
                    "num_kv_heads",
                    "ffn_hidden_size",
                    "vocab_size",
                    "seq_length",
                    "max_position_embeddings",
                    "activation",
                    "norm",
                    "position_embedding",
                    "bias",
                    "tied_embeddings",
                    "dropout",
                    "attention_impl",
                    "loss_impl",
                    "head_dim",
                    "qk_norm",
                    "moe",
                    "mla",
                    "notes"});
  ModelConfig c;
  c.name = r.string("name");
  c.family = family_parse(r.choice("family", kFamilies));
  apply_family_defaults(c);
  c.num_layers = static_cast<int>(r.integer("num_layers", 1, 1 << 16));
  c.hidden_size = r.integer("hidden_size", 1, kMaxDim);
  c.num_attention_heads = static_cast<int>(r.integer("num_attention_heads", 1, 1 << 16));
  c.num_kv_heads =
      static_cast<int>(r.integer_or("num_kv_heads", c.num_attention_heads, 1, 1 << 16));
  if (c.family == ModelFamily::llama) {
    c.ffn_hidden_size = r.integer("ffn_hidden_size", 1, kMaxDim);
  } else {
    c.ffn_hidden_size = r.integer_or("ffn_hidden_size", 4 * c.hidden_size, 1, kMaxDim);
  }
  c.vocab_size = r.integer("vocab_size", 1, kMaxDim);
  c.seq_length = r.integer("seq_length", 1, kMaxDim);
  c.max_position_embeddings = r.integer_or("max_position_embeddings", c.seq_length, 1, kMaxDim);
  c.activation = r.choice_or("activation", kActivations, c.activation);
  c.norm = r.choice_or("norm", kNorms, c.norm);
  c.position_embedding = r.choice_or("position_embedding", kPositions, c.position_embedding);
  c.bias = r.boolean_or("bias", c.bias);
  c.tied_embeddings = r.boolean_or("tied_embeddings", c.tied_embeddings);
  c.dropout = r.boolean_or("dropout", c.dropout);
  c.attention_impl_stated = r.has("attention_impl");
  c.loss_impl_stated = r.has("loss_impl");
  c.attention_impl = r.choice_or("attention_impl", kAttentionImpls, c.attention_impl);
  c.loss_impl = r.choice_or("loss_impl", kLossImpls, c.loss_impl);
  c.head_dim_stated = r.integer_or("head_dim", 0, 1, kMaxDim);
  c.qk_norm = r.boolean_or("qk_norm", false);
  if (r.has("moe")) {
    c.moe = moe_from_json(r.child("moe"));
  }
  if (r.has("mla")) {
    c.mla = mla_from_json(r.child("mla"));
  }
  c.notes = r.string_or("notes", "");
  check_shape(c, r);
  return c;
}

Json model_config_to_json(const ModelConfig& c) {
  Json doc = {{"name", c.name},
              {"family", std::string(model_family_name(c.family))},
              {"num_layers", c.num_layers},
              {"hidden_size", c.hidden_size},
              {"num_attention_heads", c.num_attention_heads},
              {"num_kv_heads", c.num_kv_heads},
              {"ffn_hidden_size", c.ffn_hidden_size},
              {"vocab_size", c.vocab_size},
              {"seq_length", c.seq_length},
              {"max_position_embeddings", c.max_position_embeddings},
              {"activation", c.activation},
              {"norm", c.norm},
              {"position_embedding", c.position_embedding},
              {"bias", c.bias},
              {"tied_embeddings", c.tied_embeddings},
              {"dropout", c.dropout},
              {"attention_impl", c.attention_impl},
              {"loss_impl", c.loss_impl}};
  // Written when stated (or changed in code): an absent field leaves the choice to the stack.
  const ModelConfig defaults;
  if (!c.attention_impl_stated && c.attention_impl == defaults.attention_impl) {
    doc.erase("attention_impl");
  }
  if (!c.loss_impl_stated && c.loss_impl == defaults.loss_impl) {
    doc.erase("loss_impl");
  }
  if (c.head_dim_stated > 0) {
    doc["head_dim"] = c.head_dim_stated;
  }
  if (c.qk_norm) {
    doc["qk_norm"] = true;
  }
  if (c.moe.enabled()) {
    doc["moe"] = moe_to_json(c.moe);
  }
  if (c.mla.enabled()) {
    doc["mla"] = mla_to_json(c.mla);
  }
  if (!c.notes.empty()) {
    doc["notes"] = c.notes;
  }
  return doc;
}

namespace {

// A field that may be absent or null (Hugging Face writes "q_lora_rank": null).
std::int64_t hf_optional(const JsonReader& r, std::string_view key, std::int64_t fallback) {
  return r.has(key) && !r.value()[std::string(key)].is_null() ? r.integer(key, 0, kMaxDim)
                                                              : fallback;
}

// The mixture-of-experts and latent-attention fields of the HF MoE configs (transformers'
// MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig and DeepSeek's configuration_deepseek.py).
void hf_mixture_of_experts(const JsonReader& r, const std::string& type, ModelConfig& c) {
  if (type == "qwen3_moe" || type == "mixtral" || type == "qwen2_moe") {
    c.head_dim_stated = hf_optional(r, "head_dim", 0);
    if (c.head_dim_stated * c.num_attention_heads == c.hidden_size) {
      c.head_dim_stated = 0; // the default: not worth stating
    }
  }
  MoeConfig& m = c.moe;
  if (type == "mixtral") {
    m.num_experts = static_cast<int>(r.integer("num_local_experts", 1, 1 << 16));
    m.experts_per_token = static_cast<int>(r.integer("num_experts_per_tok", 1, m.num_experts));
    m.expert_ffn_hidden_size = c.ffn_hidden_size; // Mixtral's experts are intermediate_size wide
    m.aux_loss_coef = r.non_negative_or("router_aux_loss_coef", 0.02);
  } else if (type == "qwen2_moe" || type == "qwen3_moe") {
    m.num_experts = static_cast<int>(r.integer("num_experts", 1, 1 << 16));
    m.experts_per_token = static_cast<int>(r.integer("num_experts_per_tok", 1, m.num_experts));
    m.expert_ffn_hidden_size = r.integer("moe_intermediate_size", 1, kMaxDim);
    const int step = static_cast<int>(r.integer_or("decoder_sparse_step", 1, 1, 1 << 16));
    m.layer_interval = step;
    m.layer_offset = step - 1; // layer i is MoE when (i + 1) % step == 0
    if (r.has("mlp_only_layers") && !r.value()["mlp_only_layers"].empty()) {
      r.fail("mlp_only_layers", "an empty list (dense layers by index are not modelled)",
             json_describe(r.value()["mlp_only_layers"]));
    }
    m.aux_loss_coef = r.non_negative_or("router_aux_loss_coef", 0.001);
    if (type == "qwen2_moe") {
      const std::int64_t shared = hf_optional(r, "shared_expert_intermediate_size", 0);
      m.shared_experts = shared > 0 ? 1 : 0;
      m.shared_expert_ffn_hidden_size = shared > 0 ? shared : m.expert_ffn_hidden_size;
      m.shared_expert_gate = shared > 0;
    } else {
      c.qk_norm = true;
      m.shared_expert_ffn_hidden_size = m.expert_ffn_hidden_size;
    }
  } else if (type == "deepseek_v3") {
    m.num_experts = static_cast<int>(r.integer("n_routed_experts", 1, 1 << 16));
    m.experts_per_token = static_cast<int>(r.integer("num_experts_per_tok", 1, m.num_experts));
    m.expert_ffn_hidden_size = r.integer("moe_intermediate_size", 1, kMaxDim);
    m.shared_experts = static_cast<int>(hf_optional(r, "n_shared_experts", 0));
    m.shared_expert_ffn_hidden_size = m.expert_ffn_hidden_size;
    m.first_dense_layers = static_cast<int>(hf_optional(r, "first_k_dense_replace", 0));
    m.layer_interval =
        static_cast<int>(std::max<std::int64_t>(hf_optional(r, "moe_layer_freq", 1), 1));
    constexpr std::array<std::string_view, 2> kScoring = {"softmax", "sigmoid"};
    m.router_scoring = r.choice_or("scoring_func", kScoring, "softmax");
    m.router_bias = r.string_or("topk_method", "") == "noaux_tc";
    MlaConfig& a = c.mla;
    a.q_lora_rank = hf_optional(r, "q_lora_rank", 0);
    a.kv_lora_rank = r.integer("kv_lora_rank", 1, kMaxDim);
    a.qk_nope_head_dim = r.integer("qk_nope_head_dim", 1, kMaxDim);
    a.qk_rope_head_dim = r.integer("qk_rope_head_dim", 2, kMaxDim);
    a.v_head_dim = r.integer("v_head_dim", 1, kMaxDim);
    c.num_kv_heads = c.num_attention_heads; // MLA: every head has its own keys and values
  }
}

} // namespace

bool is_hf_config(const Json& doc) {
  return doc.is_object() && (doc.contains("model_type") || doc.contains("architectures"));
}

ModelConfig model_config_from_hf(const Json& doc, const std::string& source) {
  JsonReader r(doc, source);
  constexpr std::array<std::string_view, 10> kTypes = {
      "llama", "mistral", "qwen2",     "gpt2",      "gpt_neox",
      "bert",  "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"};
  const std::string type = r.choice("model_type", kTypes);
  ModelConfig c;
  c.name = r.string_or("_name_or_path", type);
  if (type == "gpt2") {
    c.family = ModelFamily::gpt;
    apply_family_defaults(c);
    c.num_layers = static_cast<int>(r.integer("n_layer", 1, 1 << 16));
    c.hidden_size = r.integer("n_embd", 1, kMaxDim);
    c.num_attention_heads = static_cast<int>(r.integer("n_head", 1, 1 << 16));
    c.num_kv_heads = c.num_attention_heads;
    c.ffn_hidden_size = r.integer_or("n_inner", 4 * c.hidden_size, 1, kMaxDim);
    c.vocab_size = r.integer("vocab_size", 1, kMaxDim);
    c.max_position_embeddings = r.integer("n_positions", 1, kMaxDim);
    c.tied_embeddings = r.boolean_or("tie_word_embeddings", true);
  } else {
    const bool llama_like = type == "llama" || type == "mistral" || type == "qwen2" ||
                            type == "mixtral" || type == "qwen2_moe" || type == "qwen3_moe" ||
                            type == "deepseek_v3";
    c.family =
        llama_like ? ModelFamily::llama : (type == "bert" ? ModelFamily::bert : ModelFamily::gpt);
    apply_family_defaults(c);
    c.num_layers = static_cast<int>(r.integer("num_hidden_layers", 1, 1 << 16));
    c.hidden_size = r.integer("hidden_size", 1, kMaxDim);
    c.num_attention_heads = static_cast<int>(r.integer("num_attention_heads", 1, 1 << 16));
    c.num_kv_heads =
        static_cast<int>(r.integer_or("num_key_value_heads", c.num_attention_heads, 1, 1 << 16));
    c.ffn_hidden_size = r.integer("intermediate_size", 1, kMaxDim);
    c.vocab_size = r.integer("vocab_size", 1, kMaxDim);
    c.max_position_embeddings = r.integer("max_position_embeddings", 1, kMaxDim);
    if (type == "gpt_neox") {
      c.position_embedding = "rope";
      c.tied_embeddings = r.boolean_or("tie_word_embeddings", false);
      c.dropout = false;
    } else if (type == "bert") {
      c.tied_embeddings = true;
    } else {
      c.tied_embeddings = r.boolean_or("tie_word_embeddings", false);
      // Qwen2 has biases on the QKV projection only; counted as no biases here (< 0.01%).
    }
  }
  hf_mixture_of_experts(r, type, c);
  c.seq_length = c.max_position_embeddings;
  check_shape(c, r);
  return c;
}

} // namespace parallax
