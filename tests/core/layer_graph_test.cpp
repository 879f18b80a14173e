#include "parallax/core/error.hpp"
#include "parallax/core/layer_graph_json.hpp"
#include "parallax/models/model_loader.hpp"

#include <gtest/gtest.h>

namespace parallax {
namespace {

TEST(LayerGraphJson, KernelFamilyIsReadAndChecked) {
  Json doc = layer_graph_to_json(model_load("gpt-tiny").graph);
  for (Json& layer : doc["layers"]) {
    if (layer["kind"] == "attention") {
      layer["kernel"] = "flash2";
    }
  }
  const LayerGraph g = layer_graph_from_json(doc, "graph.json");
  int flash2 = 0;
  for (std::size_t v = 0; v < g.num_layers(); ++v) {
    flash2 += g.layer(v).kernel == FusedKernel::flash2 ? 1 : 0;
  }
  EXPECT_EQ(flash2, g.info().num_layers);
  doc["layers"][0]["kernel"] = "flash9";
  try {
    (void)layer_graph_from_json(doc, "graph.json");
    ADD_FAILURE() << "accepted";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "/layers/0/kernel");
  }
}

TEST(LayerGraphJson, BuiltGraphsRoundTripExactly) {
  for (const char* name : {"gpt-tiny", "llama-tiny", "bert-large", "llama3-8b"}) {
    SCOPED_TRACE(name);
    LayerGraph g = model_load(name).graph;
    Json doc = layer_graph_to_json(g);
    LayerGraph back = layer_graph_from_json(doc, "graph.json");
    EXPECT_EQ(back, g);
    EXPECT_EQ(layer_graph_to_json(back), doc);
    // The generic format is also accepted by the model loader.
    EXPECT_EQ(model_from_json(doc, "graph.json").graph, g);
  }
}

Json rhombus() {
  // a → b, a → c, b → d, c → d
  return Json::parse(R"({"name": "rhombus", "seq_length": 4, "layers": [
    {"name": "a", "unit": 0, "gemms": [{"m": 4, "n": 8, "k": 8}], "params": 64},
    {"name": "b", "unit": 0, "fwd_flops": 10},
    {"name": "c", "unit": 1, "fwd_flops": 20, "bwd_flops": 30},
    {"name": "d", "unit": 1}],
    "edges": [[0, 1], [0, 2], [1, 3], [2, 3]]})");
}

TEST(LayerGraphJson, GenericRhombus) {
  LayerGraph g = layer_graph_from_json(rhombus(), "r.json");
  EXPECT_EQ(g.num_layers(), 4U);
  EXPECT_EQ(g.num_edges(), 4U);
  EXPECT_EQ(g.num_units(), 2);
  EXPECT_EQ(g.total_params(), 64);
  EXPECT_DOUBLE_EQ(g.layer(0).fwd_flops, 2.0 * 4 * 8 * 8); // defaults to its GEMM FLOPs
  EXPECT_DOUBLE_EQ(g.layer(0).bwd_flops, 2.0 * g.layer(0).fwd_flops);
  EXPECT_DOUBLE_EQ(g.layer(2).bwd_flops, 30);
  auto order = g.topological_order();
  ASSERT_EQ(order.size(), 4U);
  EXPECT_EQ(order.front(), 0U);
  EXPECT_EQ(order.back(), 3U);
}

TEST(LayerGraphJson, RejectsCyclesBadEdgesAndBackwardUnits) {
  Json cycle = rhombus();
  cycle["edges"].push_back({3, 0});
  EXPECT_THROW(layer_graph_from_json(cycle, "r.json"), InputError);
  Json out_of_range = rhombus();
  out_of_range["edges"].push_back({0, 9});
  try {
    layer_graph_from_json(out_of_range, "r.json");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "/edges/4");
  }
  Json backward = rhombus();
  backward["layers"][3]["unit"] = 0;
  try {
    layer_graph_from_json(backward, "r.json");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "/layers/3/unit");
  }
  Json empty = rhombus();
  empty["layers"] = Json::array();
  EXPECT_THROW(layer_graph_from_json(empty, "r.json"), InputError);
  Json bad_kind = rhombus();
  bad_kind["layers"][1]["kind"] = "convolution";
  EXPECT_THROW(layer_graph_from_json(bad_kind, "r.json"), InputError);
}

} // namespace
} // namespace parallax
