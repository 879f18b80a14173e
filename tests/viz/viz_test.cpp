// Pictures of plans: DOT that Graphviz parses, SVG that is well-formed XML with the expected
// node and edge counts, golden DOT for a 2×2×2 plan, and the HTML report as one XML document.
//
// Golden files under tests/golden/viz are compared byte for byte; regenerate them on purpose with
// PARALLAX_UPDATE_GOLDEN=1.
#include "parallax/core/error.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/simulator/unit_cost.hpp"
#include "parallax/viz/graphviz_render.hpp"
#include "parallax/viz/layer_graph_dot.hpp"
#include "parallax/viz/mesh_dot.hpp"
#include "parallax/viz/palette.hpp"
#include "parallax/viz/report_html.hpp"
#include "parallax/viz/svg_writer.hpp"
#include "parallax/viz/timeline_svg.hpp"

#include <expat.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

namespace parallax::viz {
namespace {

// Element counts of an XML document, by tag and by `class` attribute; `error` when malformed.
struct XmlSummary {
  std::map<std::string, int> tags;
  std::map<std::string, int> classes;
  std::string error;
};

XmlSummary parse_xml(const std::string& text) {
  XmlSummary s;
  XML_Parser parser = XML_ParserCreate("UTF-8");
  XML_SetUserData(parser, &s);
  XML_SetStartElementHandler(parser, [](void* data, const XML_Char* name, const XML_Char** attrs) {
    auto* summary = static_cast<XmlSummary*>(data);
    ++summary->tags[name];
    for (int i = 0; attrs[i] != nullptr; i += 2) {
      if (std::string(attrs[i]) == "class") {
        ++summary->classes[attrs[i + 1]];
      }
    }
  });
  if (XML_Parse(parser, text.data(), static_cast<int>(text.size()), 1) == XML_STATUS_ERROR) {
    s.error = std::string(XML_ErrorString(XML_GetErrorCode(parser))) + " at line " +
              std::to_string(XML_GetCurrentLineNumber(parser));
  }
  XML_ParserFree(parser);
  return s;
}

Plan plan_222() {
  Plan p;
  p.dp = 2;
  p.tp = 2;
  p.pp = 2;
  p.zero_stage = 1;
  p.micro_batch_size = 1;
  p.global_batch_size = 8;
  p.recompute = Recompute::selective;
  p.sequence_parallel = true;
  p.stages = {{0, 1}, {1, 2}};
  return p;
}

void expect_golden(const std::string& name, const std::string& text) {
  const std::filesystem::path path =
      std::filesystem::path(PARALLAX_TEST_DATA_DIR) / ".." / "golden" / "viz" / name;
  if (std::getenv("PARALLAX_UPDATE_GOLDEN") != nullptr) {
    std::ofstream(path) << text;
    GTEST_SKIP() << "rewrote " << path;
  }
  std::ifstream in(path);
  ASSERT_TRUE(in) << "missing golden file " << path << " (PARALLAX_UPDATE_GOLDEN=1 writes it)";
  std::stringstream golden;
  golden << in.rdbuf();
  EXPECT_EQ(golden.str(), text) << "differs from " << path;
}

TEST(DotQuote, EscapesQuotesBackslashesAndNewlines) {
  EXPECT_EQ(dot_quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
}

TEST(XmlEscape, EscapesMarkup) {
  EXPECT_EQ(xml_escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&apos;");
}

TEST(DotCheck, RejectsMalformedDotWithGraphvizMessage) {
  EXPECT_NO_THROW(dot_check("digraph g { a -> b; }"));
  try {
    dot_check("digraph g { a -> ; }", "broken.dot");
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), "broken.dot");
    EXPECT_NE(std::string(e.what()).find("syntax"), std::string::npos) << e.what();
  }
}

// How many times `what` occurs in `text`.
std::size_t occurrences(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) {
    ++n;
  }
  return n;
}

TEST(LayerGraphDot, CollapsedBlocksParseAndRenderWithExpectedCounts) {
  const LoadedModel model = model_load("gpt-tiny");
  const std::string dot = layer_graph_dot(model.graph, plan_222());
  const std::string svg = dot_to_svg(dot);
  XmlSummary x = parse_xml(svg);
  ASSERT_EQ(x.error, "");
  // embedding, one block group per stage, final norm, LM head, loss; a chain of five edges.
  EXPECT_EQ(x.classes["node"], 6);
  EXPECT_EQ(x.classes["edge"], 5);
  EXPECT_EQ(x.classes["cluster"], 2); // one per stage
}

TEST(LayerGraphDot, MoeLayersShowTheirExpertsPerRank) {
  const LoadedModel model = model_load("moe-tiny");
  Plan p;
  p.dp = 4;
  p.ep = 2;
  p.global_batch_size = 8;
  const std::string dot = layer_graph_dot(model.graph, p, {.expand_blocks = true});
  // Three MoE layers, each with an up and a down expert GEMM layer.
  EXPECT_EQ(occurrences(dot, "4 of 8 experts per rank (top-2)"), 6u);
  XmlSummary x = parse_xml(dot_to_svg(dot));
  ASSERT_EQ(x.error, "");
  EXPECT_EQ(x.classes["node"], static_cast<int>(model.graph.num_layers()));
}

TEST(LayerGraphDot, ExpandedDrawsEveryLayerAndEdge) {
  const LoadedModel model = model_load("gpt-tiny");
  const std::string svg =
      dot_to_svg(layer_graph_dot(model.graph, plan_222(), {.expand_blocks = true}));
  XmlSummary x = parse_xml(svg);
  ASSERT_EQ(x.error, "");
  EXPECT_EQ(x.classes["node"], static_cast<int>(model.graph.num_layers()));
  EXPECT_EQ(x.classes["edge"], static_cast<int>(model.graph.num_edges()));
  EXPECT_EQ(x.classes["cluster"], 2 + model.graph.info().num_layers); // stages + blocks
}

TEST(LayerGraphDot, LargeModelStaysSmallWhenCollapsed) {
  const LoadedModel model = model_load("gpt3-175b");
  Plan p;
  p.dp = 8;
  p.tp = 8;
  p.pp = 16;
  p.global_batch_size = 1536;
  p.stages = stages_even(model.graph.num_units(), 16);
  XmlSummary x = parse_xml(dot_to_svg(layer_graph_dot(model.graph, p)));
  ASSERT_EQ(x.error, "");
  EXPECT_EQ(x.classes["node"], 16 + 4); // 16 block groups + embedding, norm, head, loss
}

TEST(LayerGraphDot, MemoryAnnotationFollowsZeroAndTensorParallelism) {
  Layer l;
  l.params = 1000;
  l.tp_split = TpSplit::column;
  Plan p = plan_222();
  p.precision = Precision::bf16;
  p.zero_stage = 0;
  LayerMemory m0 = layer_memory(l, p);
  EXPECT_DOUBLE_EQ(m0.params, 500);
  EXPECT_DOUBLE_EQ(m0.state_bytes, 500 * 16.0); // 2 + 2 + 12 bytes per parameter
  p.zero_stage = 3;
  EXPECT_DOUBLE_EQ(layer_memory(l, p).state_bytes, 500 * 16.0 / 2);
}

// One recomputation rule: the layer graph's memory labels keep, under full recomputation, the
// activations of the layers outside transformer blocks, as the simulator does.
TEST(LayerGraphDot, FullRecomputationKeepsLayersOutsideBlocksLikeTheSimulator) {
  const LoadedModel model = model_load("gpt-tiny");
  Plan p = plan_222();
  p.recompute = Recompute::full;
  const UnitCostKey key{p.tp, p.sequence_parallel, p.micro_batch_size, p.precision};
  int outside = 0;
  for (std::size_t v = 0; v < model.graph.num_layers(); ++v) {
    const Layer& l = model.graph.layer(v);
    const double shown = layer_memory(l, p).activation_bytes;
    EXPECT_DOUBLE_EQ(shown, layer_kept_act_bytes(l, key, Recompute::full, true)) << l.name;
    if (l.block >= 0) {
      EXPECT_EQ(shown, 0.0) << l.name; // rebuilt from the block's input
    } else if (l.saved_act_elems > 0) {
      EXPECT_GT(shown, 0.0) << l.name;
      ++outside;
    }
  }
  EXPECT_GE(outside, 2); // embedding, head or loss
}

TEST(LayerGraphDot, GoldenPlan222) {
  const LoadedModel model = model_load("gpt-tiny");
  expect_golden("gpt-tiny-222-graph.dot", layer_graph_dot(model.graph, plan_222()));
}

TEST(LayerGraphDot, GoldenPlan222Expanded) {
  const LoadedModel model = model_load("gpt-tiny");
  expect_golden("gpt-tiny-222-graph-expanded.dot",
                layer_graph_dot(model.graph, plan_222(), {.expand_blocks = true}));
}

TEST(MeshDot, ExpandedHasEveryGpuAndGroupEdge) {
  const Cluster cluster = cluster_load("dgx-a100-80g").with_devices(8);
  XmlSummary x = parse_xml(dot_to_svg(mesh_dot(plan_222(), cluster)));
  ASSERT_EQ(x.error, "");
  // 8 GPUs + 6 legend points; TP, PP and DP chains of one edge each per group (4 groups each)
  // + 3 legend edges.
  EXPECT_EQ(x.classes["node"], 8 + 6);
  EXPECT_EQ(x.classes["edge"], 12 + 3);
  EXPECT_EQ(x.classes["cluster"], 1 + 1); // one cluster node + the legend
}

TEST(MeshDot, ExpertParallelGroupsAreDrawn) {
  const Cluster cluster = cluster_load("dgx-a100-80g").with_devices(4);
  Plan p;
  p.dp = 4;
  p.ep = 2;
  p.global_batch_size = 8;
  const std::string dot = mesh_dot(p, cluster);
  // Replicas 0–1 and 2–3 each split the experts: two EP edges (dotted purple), the DP edge
  // between the groups, and the legend's EP entry.
  EXPECT_EQ(occurrences(dot, "#756bb1"), 2u + 1u);
  EXPECT_EQ(occurrences(dot, "#31a354"), 1u + 1u);
  EXPECT_NE(dot.find("experts 2/2 of EP group 1"), std::string::npos);
  XmlSummary x = parse_xml(dot_to_svg(dot));
  ASSERT_EQ(x.error, "");
  EXPECT_EQ(x.classes["node"], 4 + 8);
  EXPECT_EQ(x.classes["edge"], 3 + 4);
}

TEST(MeshDot, ContextParallelRingsAreDrawn) {
  const Cluster cluster = cluster_load("dgx-a100-80g").with_devices(16);
  Plan p;
  p.dp = 2;
  p.cp = 4;
  p.tp = 2;
  p.global_batch_size = 8;
  const std::string dot = mesh_dot(p, cluster);
  // Each of the 2 × 2 CP rings (one per dp replica and tp rank) closes over its 4 ranks: 4 ring
  // edges each, and the legend's entry. CP peers sit at stride tp: rank 0's next is rank 2.
  EXPECT_EQ(occurrences(dot, "#d6616b"), 4u * 4u + 1u);
  EXPECT_NE(dot.find("rank0 -> rank2 [color=\"#d6616b\""), std::string::npos);
  EXPECT_NE(dot.find("rank6 -> rank0 [color=\"#d6616b\""), std::string::npos);
  EXPECT_NE(dot.find("dp1 cp3 pp0 tp1"), std::string::npos); // rank 15
  XmlSummary x = parse_xml(dot_to_svg(dot));
  ASSERT_EQ(x.error, "");
  // Folded, a replica box holds its TP group × CP ring.
  const std::string folded = mesh_dot(p, cluster, {.expand = false, .fold_above = 4});
  EXPECT_NE(folded.find("ranks 0–7 (TP group of 2 × CP ring of 4)"), std::string::npos);
}

TEST(MeshDot, GoldenPlan222) {
  const Cluster cluster = cluster_load("dgx-a100-80g").with_devices(8);
  expect_golden("gpt-tiny-222-mesh.dot", mesh_dot(plan_222(), cluster));
}

TEST(MeshDot, ThousandsOfGpusFoldIntoGroups) {
  const Cluster cluster = cluster_load("dgx-a100-80g").with_devices(1024);
  Plan p;
  p.dp = 32;
  p.tp = 8;
  p.pp = 4;
  p.global_batch_size = 1024;
  p.stages = stages_even(96, 4);
  XmlSummary x = parse_xml(dot_to_svg(mesh_dot(p, cluster)));
  ASSERT_EQ(x.error, "");
  // Replicas 0 and 31 with one TP-group box per stage, one folded node per stage, legend.
  EXPECT_EQ(x.classes["node"], 2 * 4 + 4 + 6);
  // PP chains in both replicas (2 × 3), DP 0 → folded → 31 per stage (2 × 4), legend.
  EXPECT_EQ(x.classes["edge"], 6 + 8 + 3);
  // --expand draws all 1024.
  XmlSummary all = parse_xml(dot_to_svg(mesh_dot(p, cluster, {.expand = true})));
  EXPECT_EQ(all.classes["node"], 1024 + 6);
}

Timeline hand_timeline() {
  Timeline t;
  for (int rank = 0; rank < 2; ++rank) {
    for (int mb = 0; mb < 3; ++mb) {
      const double s = 0.01 * (mb + rank);
      t.events.push_back({.rank = rank,
                          .stream = Stream::compute,
                          .category = Category::forward,
                          .name = "fwd",
                          .layer = 0,
                          .micro_batch = mb,
                          .start_s = s,
                          .end_s = s + 0.008});
    }
    t.events.push_back({.rank = rank,
                        .stream = Stream::dp_comm,
                        .category = Category::dp_comm,
                        .name = "allreduce <grads>",
                        .start_s = 0.05,
                        .end_s = 0.06});
  }
  return t;
}

TEST(TimelineSvg, OneBarPerEventAndRowPerRankStream) {
  const std::string svg = timeline_svg(hand_timeline(), {.title = "a & b"});
  XmlSummary x = parse_xml(svg);
  ASSERT_EQ(x.error, "");
  EXPECT_EQ(x.classes["bar"], 8);
  EXPECT_NE(svg.find("rank 1 dp-comm"), std::string::npos);
  EXPECT_NE(svg.find("allreduce &lt;grads&gt;"), std::string::npos); // tooltips escaped
  EXPECT_EQ(svg.find("peak "), std::string::npos); // no peaks recorded, none drawn

  // Each rank's peak memory is written beside its rows.
  Timeline with_peaks = hand_timeline();
  with_peaks.peak_memory_bytes = {3LL << 30, 5LL << 20};
  const std::string peaks = timeline_svg(with_peaks, {});
  EXPECT_EQ(parse_xml(peaks).error, "");
  EXPECT_NE(peaks.find("peak " + format_bytes(3.0 * (1 << 30))), std::string::npos);
  EXPECT_NE(peaks.find("peak " + format_bytes(5.0 * (1 << 20))), std::string::npos);
}

TEST(TimelineSvg, NarrowBarsOfOneColourMerge) {
  Timeline t;
  for (int i = 0; i < 1000; ++i) {
    t.events.push_back({.rank = 0,
                        .stream = Stream::tp_comm,
                        .category = Category::tp_comm,
                        .name = "ar",
                        .start_s = i * 1e-6,
                        .end_s = (i + 0.5) * 1e-6});
  }
  t.events.push_back({.rank = 0,
                      .stream = Stream::compute,
                      .category = Category::optimizer,
                      .name = "optimizer",
                      .start_s = 0,
                      .end_s = 1.0});
  XmlSummary x = parse_xml(timeline_svg(t, {.width_px = 1200}));
  ASSERT_EQ(x.error, "");
  EXPECT_LE(x.classes["bar"], 5); // 1000 sub-pixel bars in the first millisecond merge
}

TEST(TimelineSvg, AtMostMaxRanksAreDrawn) {
  Timeline t;
  for (int r = 0; r < 100; ++r) {
    t.events.push_back({.rank = r,
                        .stream = Stream::compute,
                        .category = Category::forward,
                        .name = "f",
                        .micro_batch = 0,
                        .start_s = 0,
                        .end_s = 1});
  }
  const std::string svg = timeline_svg(t, {.max_ranks = 10});
  EXPECT_EQ(parse_xml(svg).classes["bar"], 10);
  EXPECT_NE(svg.find("rank 99 compute"), std::string::npos); // first and last always shown
  EXPECT_NE(svg.find("10 of 100 ranks shown"), std::string::npos);
}

TEST(ParetoFront, KeepsOnlyUndominatedPoints) {
  const std::vector<CandidatePoint> pts = {{.tokens_per_s = 100, .memory_bytes = 10},
                                           {.tokens_per_s = 90, .memory_bytes = 20},
                                           {.tokens_per_s = 200, .memory_bytes = 30},
                                           {.tokens_per_s = 150, .memory_bytes = 5},
                                           {.tokens_per_s = 200, .memory_bytes = 40}};
  // By memory: 5 (150) front, 10 (100) dominated, 20 dominated, 30 (200) front, 40 dominated.
  EXPECT_EQ(pareto_front(pts), (std::vector<std::size_t>{3, 2}));
}

TEST(CandidatesScatter, SamplesLargeSearchesButKeepsTheFront) {
  std::vector<CandidatePoint> pts;
  for (int i = 0; i < 20000; ++i) {
    pts.push_back({.tokens_per_s = (i * 7919) % 1000 + 1.0, .memory_bytes = (i % 977) * 1e8});
  }
  pts[5].chosen = true;
  pts[6].rank_in_table = 1;
  XmlSummary x = parse_xml(candidates_scatter_svg(pts, 80e9, 500));
  ASSERT_EQ(x.error, "");
  EXPECT_EQ(static_cast<std::size_t>(x.classes["pareto"]), pareto_front(pts).size());
  EXPECT_LE(x.classes["candidate"] + x.classes["pareto"], 502);
}

TEST(ReportHtml, IsOneWellFormedDocumentWithEverySection) {
  const LoadedModel model = model_load("gpt-tiny");
  const Cluster cluster = cluster_load("dgx-a100-80g").with_devices(8);
  ReportInput in;
  in.title = "report <test>";
  PlanEstimate e;
  e.plan = plan_222();
  e.iteration_time_s = 0.5;
  e.tokens_per_s = 1000;
  e.memory.params = 1e9;
  in.plans.push_back({.estimate = e, .gpus = 8, .chosen = true});
  in.candidates = {{.tokens_per_s = 1000, .memory_bytes = 1e9, .rank_in_table = 1, .chosen = true}};
  in.memory_capacity_bytes = 80e9;
  in.chosen = e;
  in.timelines.emplace_back("simulated", timeline_svg(hand_timeline()));
  in.layer_graph_svg = dot_to_svg(layer_graph_dot(model.graph, plan_222()));
  in.mesh_svg = dot_to_svg(mesh_dot(plan_222(), cluster));
  in.compared.push_back({.plan = plan_222(), .measured_step_s = 0.1, .simulated_step_s = 0.11});
  in.mape = 0.1;
  in.kendall_tau = 1.0;
  const std::string html = report_html(in);
  XmlSummary x = parse_xml(html);
  ASSERT_EQ(x.error, "");
  EXPECT_EQ(x.tags["section"], 7);
  // compare bars, per-op error histogram, scatter, memory, timeline, graph, mesh
  EXPECT_EQ(x.tags["svg"], 7);
  EXPECT_EQ(x.tags["script"], 0);
  EXPECT_EQ(html.find("http://www.w3.org/Graphics"), std::string::npos); // no DOCTYPE per SVG
  EXPECT_EQ(html.find("src=\"http"), std::string::npos);                 // nothing fetched
}

TEST(ReportHtml, IntervalsAndWhatIfsBesideTheHealthyPlan) {
  ReportInput in;
  PlanEstimate e;
  e.plan = plan_222();
  e.iteration_time_s = 0.5;
  e.bottleneck = "compute";
  in.plans.push_back(
      {.estimate = e, .gpus = 8, .chosen = true, .p10_s = 0.45, .p90_s = 0.56, .p_best = 0.8});
  in.chosen = e;
  PlanEstimate slow = e;
  slow.iteration_time_s = 0.75;
  in.what_ifs.push_back({.label = "rank 3 1.5x slower", .estimate = slow});
  const std::string html = report_html(in);
  ASSERT_EQ(parse_xml(html).error, "");
  EXPECT_NE(html.find("80% interval s"), std::string::npos);
  EXPECT_NE(html.find("0.4500–0.5600</td><td>80%"), std::string::npos);
  EXPECT_NE(html.find("rank 3 1.5x slower</td><td>0.7500</td><td>1.50×"), std::string::npos);
}

} // namespace
} // namespace parallax::viz
