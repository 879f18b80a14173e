// The model parts of a published row beyond the dense transformer: its mixture of experts and
// latent attention, as the model zoo's files state them.
#include "published_detail.hpp"

#include <fmt/format.h>

namespace parallax::published_detail {

namespace {

// A whole number in `object` (the row's model.moe or model.mla) at `key`, or `fallback`.
std::int64_t nested_integer(const Row& r, const Json& object, const char* section, const char* key,
                            std::int64_t fallback) {
  if (!object.contains(key) || object[key].is_null()) {
    return fallback;
  }
  const Json& v = object[key];
  if (!v.is_number_integer() || v.get<std::int64_t>() < 0 || v.get<std::int64_t>() > (1 << 24)) {
    r.fail(fmt::format("/model/{}/{}", section, key), "a whole number in [0, 16777216]",
           json_describe(v));
  }
  return v.get<std::int64_t>();
}

} // namespace

void moe_and_mla_of(const Row& r, ModelConfig& c) {
  if (const Json* moe = r.at("model", "moe"); moe != nullptr && moe->is_object()) {
    c.moe.num_experts = static_cast<int>(nested_integer(r, *moe, "moe", "num_experts", 0));
    c.moe.experts_per_token =
        static_cast<int>(nested_integer(r, *moe, "moe", "experts_per_token", 0));
    c.moe.expert_ffn_hidden_size = nested_integer(r, *moe, "moe", "expert_ffn_hidden_size", 0);
    c.moe.shared_experts = static_cast<int>(nested_integer(r, *moe, "moe", "shared_experts", 0));
    c.moe.first_dense_layers =
        static_cast<int>(nested_integer(r, *moe, "moe", "first_dense_layers", 0));
    if (c.moe.num_experts < 1 || c.moe.experts_per_token < 1 ||
        c.moe.experts_per_token > c.moe.num_experts || c.moe.expert_ffn_hidden_size < 1) {
      r.fail("/model/moe", "num_experts >= experts_per_token >= 1 and expert_ffn_hidden_size >= 1",
             r.describe("model", "moe"));
    }
    if (moe->contains("router_scoring") && (*moe)["router_scoring"].is_string()) {
      c.moe.router_scoring = has(lower((*moe)["router_scoring"].get<std::string>()), "sigmoid")
                                 ? "sigmoid"
                                 : "softmax";
    }
  }
  if (const Json* mla = r.at("model", "mla"); mla != nullptr && mla->is_object()) {
    c.mla.q_lora_rank = nested_integer(r, *mla, "mla", "q_lora_rank", 0);
    c.mla.kv_lora_rank = nested_integer(r, *mla, "mla", "kv_lora_rank", 0);
    c.mla.qk_nope_head_dim = nested_integer(r, *mla, "mla", "qk_nope_head_dim", 0);
    c.mla.qk_rope_head_dim = nested_integer(r, *mla, "mla", "qk_rope_head_dim", 0);
    c.mla.v_head_dim = nested_integer(r, *mla, "mla", "v_head_dim", 0);
  }
  if (const std::optional<std::int64_t> d = r.integer("model", "head_dim")) {
    c.head_dim_stated = *d;
  }
  c.qk_norm = r.boolean("model", "qk_layernorm").value_or(false);
}

} // namespace parallax::published_detail
