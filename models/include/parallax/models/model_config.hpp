// ModelConfig: the shape of a transformer, as read from a zoo JSON or a Hugging Face config.json.
#pragma once

#include "parallax/core/json_reader.hpp"

#include <cstdint>
#include <string>

namespace parallax {

enum class ModelFamily { gpt, llama, bert };

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
  std::string notes;

  std::int64_t head_dim() const { return hidden_size / num_attention_heads; }
  bool operator==(const ModelConfig&) const = default;
};

std::string_view model_family_name(ModelFamily f);

// Reads Parallax's own model format (the contract in ARCHITECTURE.md), validating every field.
ModelConfig model_config_from_json(const Json& doc, const std::string& source);
Json model_config_to_json(const ModelConfig& config);

// Reads a Hugging Face config.json (model_type llama, mistral, qwen2, gpt2, gpt_neox, bert).
ModelConfig model_config_from_hf(const Json& doc, const std::string& source);

// True when `doc` looks like a Hugging Face config (has "model_type" or "architectures").
bool is_hf_config(const Json& doc);

} // namespace parallax
