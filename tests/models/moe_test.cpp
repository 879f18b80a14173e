// Mixtures of experts and latent attention in the layer graph: parameter counts against the
// published checkpoints, per-layer FLOPs by hand, Hugging Face import, and the zoo format.
#include "parallax/core/error.hpp"
#include "parallax/core/layer_graph_json.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/models/transformer_builder.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace parallax {
namespace {

std::string hf(const char* file) {
  return (std::filesystem::path(PARALLAX_TEST_DATA_DIR) / "hf" / file).string();
}

const Layer* find(const LayerGraph& g, const std::string& name) {
  for (std::size_t v = 0; v < g.num_layers(); ++v) {
    if (g.layer(v).name == name) {
      return &g.layer(v);
    }
  }
  return nullptr;
}

struct Counted {
  const char* zoo;
  const char* hf_file;
  std::int64_t total;  // exact, from the released checkpoint
  std::int64_t active; // exact: embedding, attention, router, shared and top-k routed experts
  double published_total;
  double published_active;
  const char* source;
};

// Totals: Mixtral's and Qwen3's BF16 safetensors indexes hold 93,405,585,408 and
// 61,064,245,248 bytes (2 per parameter); DeepSeek-V3's main model (671B in the report; the
// checkpoint's 685B adds the 14B multi-token-prediction module, left out here). Published
// active figures count the embedding (Mixtral 12.9B, Qwen3 "3.3B activated"; DeepSeek-V3's
// "37B activated" is 37.55B with the embedding, 36.6B without).
const Counted kCounted[] = {
    {"mixtral-8x7b", "mixtral-8x7b.json", 46702792704, 12879925248, 46.7e9, 12.9e9,
     "Mistral AI, 'Mixtral of experts' (2023)"},
    {"qwen3-30b-a3b", "qwen3-30b-a3b.json", 30532122624, 3353032704, 30.5e9, 3.3e9,
     "Qwen/Qwen3-30B-A3B model card"},
    {"deepseek-v3", "deepseek-v3.json", 671026419200, 37552297472, 671e9, 37e9,
     "DeepSeek-V3 technical report, Table 1"},
};

TEST(MoeParams, ExactCheckpointCountsAndPublishedFigures) {
  for (const Counted& c : kCounted) {
    SCOPED_TRACE(c.zoo);
    const LayerGraph g = model_load(c.zoo).graph;
    EXPECT_EQ(g.total_params(), c.total);
    EXPECT_EQ(g.active_params(), c.active);
    EXPECT_NEAR(static_cast<double>(g.total_params()) / c.published_total, 1.0, 0.005) << c.source;
    EXPECT_NEAR(static_cast<double>(g.active_params()) / c.published_active, 1.0, 0.02) << c.source;
    // The Hugging Face config.json builds the same graph (at the zoo entry's training
    // sequence length; an import trains at max_position_embeddings).
    ModelConfig imported = *model_load(hf(c.hf_file)).config;
    imported.name = g.info().name;
    imported.seq_length = g.info().seq_length;
    EXPECT_EQ(transformer_build_graph(imported), g);
  }
}

TEST(MoeParams, Qwen2MoeSharedExpertAndItsGate) {
  // Qwen1.5-MoE-A2.7B: 60 experts of width 1408, top-4, one 5632-wide shared expert with a
  // sigmoid gate; published 14.3B total, 2.7B activated (Qwen blog, 2024). By hand per layer:
  // attention 4·2048² + routed 60·3·2048·1408 + shared 3·2048·5632 + gate 2048 + router
  // 60·2048 + norms 2·2048 = 570,554,368; ×24 + embedding and head 2·151936·2048 + final norm.
  const LayerGraph g = model_load(hf("qwen1.5-moe-a2.7b.json")).graph;
  EXPECT_EQ(g.total_params(), std::int64_t{570554368} * 24 + 2 * 151936 * 2048 + 2048);
  EXPECT_NEAR(static_cast<double>(g.total_params()) / 14.3e9, 1.0, 0.005);
  EXPECT_NEAR(static_cast<double>(g.active_params()) / 2.7e9, 1.0, 0.01);
  EXPECT_NE(find(g, "block0.moe.shared.up"), nullptr);
}

TEST(MoeLayers, DenseAndMoeLayersAndTheirShapes) {
  const LayerGraph g = model_load("deepseek-v3").graph;
  EXPECT_EQ(g.info().num_experts, 256);
  EXPECT_EQ(g.info().experts_per_token, 8);
  EXPECT_EQ(g.info().expert_ffn_hidden_size, 2048);
  EXPECT_EQ(g.info().ffn_hidden_size, 18432); // the 3 dense layers' width
  // The first 3 layers are dense, the rest MoE.
  EXPECT_NE(find(g, "block2.mlp.up"), nullptr);
  EXPECT_EQ(find(g, "block2.moe.router"), nullptr);
  EXPECT_EQ(find(g, "block3.mlp.up"), nullptr);
  const Layer* up = find(g, "block3.moe.experts.up");
  ASSERT_NE(up, nullptr);
  EXPECT_EQ(up->experts, 256);
  EXPECT_EQ(up->experts_active, 8);
  // Grouped GEMM: one problem per expert, each over its fair share s·k/E = 4096·8/256 tokens.
  ASSERT_EQ(up->gemms.size(), 2u);
  EXPECT_EQ(up->gemms[0], (Gemm{256, 128, 2048, 7168}));
  // Its FLOPs are those of the routed tokens only: 2 GEMMs · 2·s·k·h·F.
  EXPECT_DOUBLE_EQ(up->fwd_flops, 2.0 * 2.0 * 4096 * 8 * 7168 * 2048);
  // Every MoE layer: router, dispatch, experts, combine, the shared expert; MLA's four
  // projections with the queries' and keys' latents.
  for (const char* name :
       {"block60.moe.router", "block60.moe.dispatch", "block60.moe.combine",
        "block60.moe.shared.down", "block60.attn.q_down", "block60.attn.kv_up"}) {
    EXPECT_NE(find(g, name), nullptr) << name;
  }
  EXPECT_EQ(find(g, "block3.attn.qkv"), nullptr);
  EXPECT_NO_THROW(g.topological_order());
  // Latent attention per layer: 187,107,328 parameters (q_a, q_a_norm, q_b, kv_a, kv_a_norm,
  // kv_b, o_proj of DeepSeek's modeling code).
  std::int64_t mla = 0;
  for (const char* name : {"block5.attn.q_down", "block5.attn.q_up", "block5.attn.kv_down",
                           "block5.attn.kv_up", "block5.attn.proj"}) {
    mla += find(g, name)->params;
  }
  EXPECT_EQ(mla, 187107328);
}

TEST(MoeLayers, CapacityFactorPadsTheExpertsWork) {
  ModelConfig c = *model_load("moe-tiny").config;
  const LayerGraph dropless = transformer_build_graph(c);
  c.moe.capacity_factor = 1.5;
  const LayerGraph capped = transformer_build_graph(c);
  // 64 tokens · top-2 / 8 experts = 16 per expert; at capacity 1.5 each computes 24.
  EXPECT_EQ(find(dropless, "block1.moe.experts.down")->gemms[0].m, 16);
  EXPECT_EQ(find(capped, "block1.moe.experts.down")->gemms[0].m, 24);
  EXPECT_EQ(dropless.total_params(), capped.total_params());
  EXPECT_GT(capped.total_fwd_flops(), dropless.total_fwd_flops());
}

TEST(MoeLayers, GraphJsonRoundTripsTheExpertFields) {
  const LayerGraph g = model_load("moe-tiny").graph;
  EXPECT_EQ(layer_graph_from_json(layer_graph_to_json(g), "rt"), g);
}

TEST(MoeConfigJson, RoundTripsAndRejectsWhatCannotBe) {
  for (const char* name : {"mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "moe-tiny"}) {
    const ModelConfig c = *model_load(name).config;
    EXPECT_EQ(model_config_from_json(model_config_to_json(c), "rt"), c) << name;
  }
  const Json valid = model_config_to_json(*model_load("moe-tiny").config);
  const std::pair<const char*, const char*> bad[] = {
      {R"({"moe": {"experts_per_token": 9}})", "/moe/experts_per_token"},
      {R"({"moe": {"num_experts": 0}})", "/moe/num_experts"},
      {R"({"moe": {"capacity_factor": 0.5}})", "/moe/capacity_factor"},
      {R"({"moe": {"router_scoring": "relu"}})", "/moe/router_scoring"},
      {R"({"moe": {"first_dense_layers": 4}})", "/moe"},
      {R"({"moe": {"experts": 8}})", "/moe/experts"},
      {R"({"activation": "gelu"})", "/activation"},
      {R"({"mla": {"kv_lora_rank": 0}})", "/mla/kv_lora_rank"},
      {R"({"mla": {"kv_lora_rank": 64}})", "/mla/kv_lora_rank"}, // not below hidden_size 64
      {R"({"mla": {"q_lora_rank": 96}})", "/mla/q_lora_rank"},
      {R"({"mla": {"qk_rope_head_dim": 7}})", "/mla/qk_rope_head_dim"},
  };
  for (const auto& [patch, field] : bad) {
    SCOPED_TRACE(patch);
    Json doc = valid;
    if (std::string(patch).find("mla") != std::string::npos) {
      doc["mla"] = {{"kv_lora_rank", 32},
                    {"qk_nope_head_dim", 16},
                    {"qk_rope_head_dim", 8},
                    {"v_head_dim", 16}};
    }
    doc.merge_patch(Json::parse(patch));
    try {
      model_config_from_json(doc, "bad.json");
      ADD_FAILURE() << "accepted";
    } catch (const InputError& e) {
      EXPECT_EQ(e.field(), field) << e.what();
    }
  }
  // Dense layers by index (Qwen's mlp_only_layers) are named, not silently dropped.
  Json qwen = json_load_file(hf("qwen3-30b-a3b.json"));
  qwen["mlp_only_layers"] = {0, 5};
  try {
    model_config_from_hf(qwen, "q.json");
    ADD_FAILURE() << "accepted";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "/mlp_only_layers");
  }
}

} // namespace
} // namespace parallax
