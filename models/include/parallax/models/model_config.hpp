// ModelConfig: the shape of a transformer, as read from a zoo JSON or a Hugging Face config.json.
#pragma once

#include "parallax/core/json_reader.hpp"

#include <cstdint>
#include <string>

namespace parallax {

enum class ModelFamily { gpt, llama, bert };

// A mixture-of-experts feed-forward layer in place of the dense MLP (Mixtral, Qwen-MoE,
// DeepSeek-V3): a router scores `num_experts` routed SwiGLU experts per token and sends it to
// the `experts_per_token` best (top-k), beside `shared_experts` experts every token visits.
struct MoeConfig {
  int num_experts = 0; // 0: dense MLPs only
  int experts_per_token = 0;
  std::int64_t expert_ffn_hidden_size = 0;        // width of one routed expert's MLP
  int shared_experts = 0;                         // experts every token visits
  std::int64_t shared_expert_ffn_hidden_size = 0; // width of one shared expert's MLP
  bool shared_expert_gate = false; // a sigmoid gate (h → 1) on the shared output (Qwen2-MoE)
  // Which layers are MoE: layer i with i >= first_dense_layers and i % layer_interval ==
  // layer_offset (DeepSeek-V3: the first 3 dense; Qwen2-MoE's decoder_sparse_step n: offset n−1).
  int first_dense_layers = 0;
  int layer_interval = 1;
  int layer_offset = 0;
  std::string router_scoring = "softmax"; // "softmax" | "sigmoid" (DeepSeek-V3)
  bool router_bias = false; // a per-expert bias for the top-k choice (DeepSeek-V3's noaux_tc)
  // Tokens an expert takes, as a multiple of its fair share (tokens · k / E), dropping the rest
  // and padding to it (GShard, Switch); 0: dropless (every routed token computed, as Megatron-Core
  // and DeepSeek-V3 do).
  double capacity_factor = 0;
  double aux_loss_coef = 0; // load-balancing loss weight (Switch Transformer); 0: none

  bool enabled() const { return num_experts > 0; }
  bool is_moe_layer(int i) const {
    return enabled() && i >= first_dense_layers && i % layer_interval == layer_offset;
  }
  bool operator==(const MoeConfig&) const = default;
};

// Multi-head latent attention (DeepSeek-V2/V3): queries through a rank-q_lora_rank bottleneck
// (0: a plain projection), keys and values from one rank-kv_lora_rank latent, RoPE on a
// decoupled qk_rope_head_dim part of each query and a key shared by all heads.
struct MlaConfig {
  std::int64_t q_lora_rank = 0;
  std::int64_t kv_lora_rank = 0; // 0: standard attention
  std::int64_t qk_nope_head_dim = 0;
  std::int64_t qk_rope_head_dim = 0;
  std::int64_t v_head_dim = 0;
  bool enabled() const { return kv_lora_rank > 0; }
  bool operator==(const MlaConfig&) const = default;
};

struct ModelConfig {
  std::string name;
  ModelFamily family = ModelFamily::gpt;
  int num_layers = 0;           // L
  std::int64_t hidden_size = 0; // h
  int num_attention_heads = 0;  // a
  int num_kv_heads = 0;         // grouped-query attention: a / num_kv_heads queries per group
  std::int64_t ffn_hidden_size = 0;
  std::int64_t vocab_size = 0; // V
  std::int64_t seq_length = 0; // s (training sequence length)
  std::int64_t max_position_embeddings = 0;
  std::string activation = "gelu";            // "gelu" | "swiglu"
  std::string norm = "layernorm";             // "layernorm" | "rmsnorm"
  std::string position_embedding = "learned"; // "learned" | "rope" | "alibi"
  bool bias = true;
  bool tied_embeddings = true;
  bool dropout = true; // dropout layers present (their masks are kept for backward)
  // "flash": fused attention that never stores the s×s scores, the best such kernel for the
  // device (FlashAttention-2 on Ampere, FlashAttention-3 or cuDNN on Hopper); "flash2": the same
  // with FlashAttention-2-class kernels everywhere (Ampere instructions, slow on Hopper);
  // "standard": scores, softmax and dropout materialised (Megatron-LM before 2022).
  std::string attention_impl = "flash";
  // "fused": one cross-entropy kernel over the logits (Megatron-LM's vocabulary-parallel loss,
  // llm.c); "unfused": eager framework ops (PyTorch's cross_entropy under autocast: an fp32 copy
  // of the logits, log-softmax, and their backward), several passes over the logits.
  std::string loss_impl = "fused";
  // Whether the model file stated attention_impl / loss_impl. These are properties of the
  // software stack; a file that states them overrides the stack's choice (model_apply_stack).
  bool attention_impl_stated = false;
  bool loss_impl_stated = false;
  // Head dimension when stated (Qwen3: 128 with hidden 2048 and 32 heads); 0: hidden / heads.
  std::int64_t head_dim_stated = 0;
  bool qk_norm = false; // RMSNorm of each query and key head before RoPE (Qwen3)
  MoeConfig moe;
  MlaConfig mla;
  std::string notes;

  std::int64_t head_dim() const {
    return head_dim_stated > 0 ? head_dim_stated : hidden_size / num_attention_heads;
  }
  int moe_layers() const {
    int n = 0;
    for (int i = 0; i < num_layers; ++i) {
      n += moe.is_moe_layer(i) ? 1 : 0;
    }
    return n;
  }
  bool operator==(const ModelConfig&) const = default;
};

std::string_view model_family_name(ModelFamily f);

// Reads Parallax's own model format (the contract in ARCHITECTURE.md), validating every field.
ModelConfig model_config_from_json(const Json& doc, const std::string& source);
Json model_config_to_json(const ModelConfig& config);

// Reads a Hugging Face config.json (model_type llama, mistral, qwen2, gpt2, gpt_neox, bert, and
// the mixtures of experts mixtral, qwen2_moe, qwen3_moe, deepseek_v3). DeepSeek-V3's
// multi-token-prediction module (num_nextn_predict_layers) is not part of the model built.
ModelConfig model_config_from_hf(const Json& doc, const std::string& source);

// True when `doc` looks like a Hugging Face config (has "model_type" or "architectures").
bool is_hf_config(const Json& doc);

} // namespace parallax
