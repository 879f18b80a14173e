#include "parallax/core/layer_graph_json.hpp"

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <array>

namespace parallax {

namespace {

double non_negative(const JsonReader& r, std::string_view key) {
  return r.non_negative_or(key, 0.0);
}

Layer layer_from_json(const JsonReader& r) {
  r.reject_unknown({"name",
                    "kind",
                    "tp_split",
                    "unit",
                    "block",
                    "output_shape",
                    "params",
                    "gemms",
                    "fwd_flops",
                    "bwd_flops",
                    "bwd_extra_flops",
                    "fused",
                    "kernel",
                    "fwd_mem_elems",
                    "saved_act_elems",
                    "saved_mask_bytes",
                    "working_act_elems",
                    "selective_saved_elems",
                    "selective_recompute",
                    "tp_fwd_comm_elems",
                    "tp_bwd_comm_elems",
                    "experts",
                    "experts_active"});
  Layer l;
  l.name = r.string("name");
  l.kind =
      *enum_from_name<LayerKind>(kLayerKindNames, r.choice_or("kind", kLayerKindNames, "generic"));
  l.tp_split =
      *enum_from_name<TpSplit>(kTpSplitNames, r.choice_or("tp_split", kTpSplitNames, "replicated"));
  l.unit = static_cast<int>(r.integer("unit", 0, 1 << 20));
  l.block = static_cast<int>(r.integer_or("block", -1, -1, 1 << 20));
  if (r.has("output_shape")) {
    JsonReader shape = r.array("output_shape");
    for (std::size_t i = 0; i < shape.array_size(); ++i) {
      const Json& v = shape.value()[i];
      if (!v.is_number_integer() || v.get<std::int64_t>() < 1) {
        shape.element(i).fail_here("a dimension >= 1", json_describe(v));
      }
      l.output_shape.push_back(v.get<std::int64_t>());
    }
  }
  l.params = r.integer_or("params", 0, 0);
  if (r.has("gemms")) {
    JsonReader gemms = r.array("gemms");
    for (std::size_t i = 0; i < gemms.array_size(); ++i) {
      JsonReader g = gemms.element(i);
      g.reject_unknown({"batch", "m", "n", "k"});
      l.gemms.push_back({g.integer_or("batch", 1, 1, std::int64_t{1} << 40),
                         g.integer("m", 1, std::int64_t{1} << 40),
                         g.integer("n", 1, std::int64_t{1} << 40),
                         g.integer("k", 1, std::int64_t{1} << 40)});
    }
  }
  double gemm_flops = 0;
  for (const Gemm& g : l.gemms) {
    gemm_flops += g.flops();
  }
  l.fwd_flops = r.has("fwd_flops") ? non_negative(r, "fwd_flops") : gemm_flops;
  l.bwd_flops = r.has("bwd_flops") ? non_negative(r, "bwd_flops") : 2.0 * l.fwd_flops;
  l.bwd_extra_flops = non_negative(r, "bwd_extra_flops");
  l.fused = r.boolean_or("fused", false);
  l.kernel = *enum_from_name<FusedKernel>(kFusedKernelNames,
                                          r.choice_or("kernel", kFusedKernelNames, "native"));
  l.fwd_mem_elems = non_negative(r, "fwd_mem_elems");
  l.saved_act_elems = non_negative(r, "saved_act_elems");
  l.saved_mask_bytes = non_negative(r, "saved_mask_bytes");
  l.working_act_elems = non_negative(r, "working_act_elems");
  l.selective_saved_elems = non_negative(r, "selective_saved_elems");
  if (l.selective_saved_elems > l.saved_act_elems) {
    r.fail("selective_saved_elems", "at most saved_act_elems",
           fmt::format("{} > {}", l.selective_saved_elems, l.saved_act_elems));
  }
  l.selective_recompute = r.boolean_or("selective_recompute", false);
  l.tp_fwd_comm_elems = non_negative(r, "tp_fwd_comm_elems");
  l.tp_bwd_comm_elems = non_negative(r, "tp_bwd_comm_elems");
  l.experts = static_cast<int>(r.integer_or("experts", 0, 0, 1 << 20));
  if (l.experts > 0) {
    l.experts_active = static_cast<int>(r.integer("experts_active", 1, l.experts));
    if (l.params % l.experts != 0) {
      r.fail("params", fmt::format("a multiple of experts = {}", l.experts),
             std::to_string(l.params));
    }
  } else if (r.has("experts_active")) {
    r.fail("experts_active", "absent unless experts > 0",
           json_describe(r.value()["experts_active"]));
  }
  return l;
}

Json layer_to_json(const Layer& l) {
  Json gemms = Json::array();
  for (const Gemm& g : l.gemms) {
    gemms.push_back({{"batch", g.batch}, {"m", g.m}, {"n", g.n}, {"k", g.k}});
  }
  Json doc = {{"name", l.name},
              {"kind", std::string(layer_kind_name(l.kind))},
              {"tp_split", std::string(tp_split_name(l.tp_split))},
              {"unit", l.unit},
              {"block", l.block},
              {"output_shape", l.output_shape},
              {"params", l.params},
              {"gemms", gemms},
              {"fwd_flops", l.fwd_flops},
              {"bwd_flops", l.bwd_flops},
              {"bwd_extra_flops", l.bwd_extra_flops},
              {"fused", l.fused},
              {"kernel", std::string(enum_name(kFusedKernelNames, l.kernel))},
              {"fwd_mem_elems", l.fwd_mem_elems},
              {"saved_act_elems", l.saved_act_elems},
              {"saved_mask_bytes", l.saved_mask_bytes},
              {"working_act_elems", l.working_act_elems},
              {"selective_saved_elems", l.selective_saved_elems},
              {"selective_recompute", l.selective_recompute},
              {"tp_fwd_comm_elems", l.tp_fwd_comm_elems},
              {"tp_bwd_comm_elems", l.tp_bwd_comm_elems}};
  if (l.experts > 0) {
    doc["experts"] = l.experts;
    doc["experts_active"] = l.experts_active;
  }
  return doc;
}

} // namespace

LayerGraph layer_graph_from_json(const Json& doc, const std::string& source) {
  JsonReader r(doc, source);
  r.reject_unknown({"name", "family", "num_layers", "seq_length", "hidden_size",
                    "num_attention_heads", "num_kv_heads", "vocab_size", "ffn_hidden_size",
                    "tied_embeddings", "num_experts", "experts_per_token", "expert_ffn_hidden_size",
                    "layers", "edges", "notes"});
  GraphInfo info;
  info.name = r.string("name");
  info.family = r.string_or("family", "generic");
  info.seq_length = r.integer("seq_length", 1, 1 << 24);
  info.hidden_size = r.integer_or("hidden_size", 1, 1, 1 << 24);
  info.num_attention_heads = static_cast<int>(r.integer_or("num_attention_heads", 1, 1, 1 << 16));
  info.num_kv_heads =
      static_cast<int>(r.integer_or("num_kv_heads", info.num_attention_heads, 1, 1 << 16));
  info.vocab_size = r.integer_or("vocab_size", 0, 0, 1 << 28);
  info.ffn_hidden_size = r.integer_or("ffn_hidden_size", 0, 0, 1 << 28);
  info.tied_embeddings = r.boolean_or("tied_embeddings", false);
  info.num_experts = static_cast<int>(r.integer_or("num_experts", 0, 0, 1 << 20));
  info.experts_per_token =
      static_cast<int>(r.integer_or("experts_per_token", 0, 0, std::max(info.num_experts, 0)));
  info.expert_ffn_hidden_size = r.integer_or("expert_ffn_hidden_size", 0, 0, 1 << 28);
  LayerGraph g(info);

  JsonReader layers = r.array("layers");
  if (layers.array_size() == 0) {
    r.fail("layers", "at least one layer", "an empty array");
  }
  for (std::size_t i = 0; i < layers.array_size(); ++i) {
    g.add_layer(layer_from_json(layers.element(i)));
  }
  if (r.has("edges")) {
    JsonReader edges = r.array("edges");
    const auto n = static_cast<std::int64_t>(g.num_layers());
    for (std::size_t i = 0; i < edges.array_size(); ++i) {
      const Json& e = edges.value()[i];
      if (!e.is_array() || e.size() != 2 || !e[0].is_number_integer() ||
          !e[1].is_number_integer() || e[0].get<std::int64_t>() < 0 ||
          e[0].get<std::int64_t>() >= n || e[1].get<std::int64_t>() < 0 ||
          e[1].get<std::int64_t>() >= n || e[0] == e[1]) {
        edges.element(i).fail_here(
            fmt::format("a [from, to] pair of distinct layer indices in [0, {})", n),
            json_describe(e));
      }
      g.add_edge(e[0].get<std::size_t>(), e[1].get<std::size_t>());
    }
  }
  g.topological_order(source); // rejects cycles
  // Units must be non-decreasing along every edge so pipeline stages only send forward.
  for (const auto& [from, to] : g.edges()) {
    if (g.layer(to).unit < g.layer(from).unit) {
      throw InputError(
          source, fmt::format("/layers/{}/unit", to),
          fmt::format("a unit >= {} (the unit of its input layer {})", g.layer(from).unit, from),
          std::to_string(g.layer(to).unit), "pipeline stages must follow the data flow");
    }
  }
  int max_block = -1;
  for (std::size_t v = 0; v < g.num_layers(); ++v) {
    max_block = std::max(max_block, g.layer(v).block);
  }
  g.info().num_layers = static_cast<int>(
      r.integer_or("num_layers", std::max(max_block + 1, g.num_units()), 1, 1 << 20));
  return g;
}

Json layer_graph_to_json(const LayerGraph& g) {
  const GraphInfo& info = g.info();
  Json layers = Json::array();
  for (std::size_t v = 0; v < g.num_layers(); ++v) {
    layers.push_back(layer_to_json(g.layer(v)));
  }
  Json edges = Json::array();
  for (const auto& [from, to] : g.edges()) {
    edges.push_back({from, to});
  }
  Json doc = {{"name", info.name},
              {"family", info.family},
              {"num_layers", info.num_layers},
              {"seq_length", info.seq_length},
              {"hidden_size", info.hidden_size},
              {"num_attention_heads", info.num_attention_heads},
              {"num_kv_heads", info.num_kv_heads},
              {"vocab_size", info.vocab_size},
              {"ffn_hidden_size", info.ffn_hidden_size},
              {"tied_embeddings", info.tied_embeddings},
              {"layers", layers},
              {"edges", edges}};
  if (info.num_experts > 0) {
    doc["num_experts"] = info.num_experts;
    doc["experts_per_token"] = info.experts_per_token;
    doc["expert_ffn_hidden_size"] = info.expert_ffn_hidden_size;
  }
  return doc;
}

} // namespace parallax
