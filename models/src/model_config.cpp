#include "parallax/models/model_config.hpp"

#include "parallax/core/error.hpp"

#include <fmt/format.h>

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

void check_shape(const ModelConfig& c, const JsonReader& r) {
  if (c.hidden_size % c.num_attention_heads != 0) {
    r.fail("num_attention_heads", fmt::format("a divisor of hidden_size {}", c.hidden_size),
           std::to_string(c.num_attention_heads));
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
  r.reject_unknown({"name", "family", "num_layers", "hidden_size", "num_attention_heads",
                    "num_kv_heads", "ffn_hidden_size", "vocab_size", "seq_length",
                    "max_position_embeddings", "activation", "norm", "position_embedding", "bias",
                    "tied_embeddings", "dropout", "attention_impl", "loss_impl", "notes"});
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
  if (!c.notes.empty()) {
    doc["notes"] = c.notes;
  }
  return doc;
}

bool is_hf_config(const Json& doc) {
  return doc.is_object() && (doc.contains("model_type") || doc.contains("architectures"));
}

ModelConfig model_config_from_hf(const Json& doc, const std::string& source) {
  JsonReader r(doc, source);
  constexpr std::array<std::string_view, 6> kTypes = {"llama", "mistral",  "qwen2",
                                                      "gpt2",  "gpt_neox", "bert"};
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
    const bool llama_like = type == "llama" || type == "mistral" || type == "qwen2";
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
  c.seq_length = c.max_position_embeddings;
  check_shape(c, r);
  return c;
}

} // namespace parallax
