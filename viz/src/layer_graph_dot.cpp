#include "parallax/viz/layer_graph_dot.hpp"

#include "parallax/simulator/cost_model.hpp"
#include "parallax/simulator/unit_cost.hpp"
#include "parallax/viz/graphviz_render.hpp"
#include "parallax/viz/palette.hpp"

#include <fmt/format.h>

#include <map>
#include <set>

namespace parallax::viz {

namespace {

// Stage chunk of every partition unit (chunk c runs on pipeline rank c % pp).
std::vector<int> unit_chunks(const LayerGraph& graph, const Plan& plan) {
  const int units = graph.num_units();
  std::vector<StageRange> stages = plan.stages;
  if (stages.empty()) {
    stages = stages_even(units, plan.pp * plan.virtual_stages);
  }
  std::vector<int> chunk(static_cast<std::size_t>(std::max(units, 0)), 0);
  for (std::size_t c = 0; c < stages.size(); ++c) {
    for (int u = stages[c].first; u < stages[c].second && u < units; ++u) {
      chunk[static_cast<std::size_t>(u)] = static_cast<int>(c);
    }
  }
  return chunk;
}

std::string split_text(const Layer& layer, int tp) {
  const std::string_view split = tp_split_name(layer.tp_split);
  if (tp == 1 || layer.tp_split == TpSplit::replicated) {
    return std::string(split);
  }
  return fmt::format("{} ÷{}", split, tp);
}

// A layer's label: name, kind and split, routed experts per rank, memory.
std::string layer_label(const Layer& l, const Plan& plan, const std::string& memory) {
  const std::string experts = l.experts > 0
                                  ? fmt::format("\n{} of {} experts per rank (top-{})",
                                                l.experts / plan.ep, l.experts, l.experts_active)
                                  : "";
  return fmt::format("{}\n{} · {}{}{}", l.name, layer_kind_name(l.kind), split_text(l, plan.tp),
                     experts, memory.empty() ? "" : "\n" + memory);
}

std::string memory_text(const LayerMemory& m) {
  std::string out;
  if (m.params > 0) {
    out = fmt::format("{} params · state {}", format_count(m.params), format_bytes(m.state_bytes));
  }
  if (m.activation_bytes > 0) {
    out += fmt::format("{}act {}/mb", out.empty() ? "" : " · ", format_bytes(m.activation_bytes));
  }
  return out;
}

// A collapsed run of transformer blocks on one chunk.
struct BlockGroup {
  int first_block = 1 << 30;
  int last_block = -1;
  std::set<int> blocks;
  std::map<std::string, int> splits; // split text → layers per block
  int layers = 0;
  LayerMemory memory;
};

void add_memory(LayerMemory& into, const LayerMemory& m) {
  into.params += m.params;
  into.state_bytes += m.state_bytes;
  into.activation_bytes += m.activation_bytes;
}

} // namespace

static UnitCostKey unit_key(const Plan& plan) {
  return unit_cost_key(plan);
}

LayerMemory layer_memory(const Layer& layer, const Plan& plan) {
  LayerMemory m;
  m.params = static_cast<double>(layer.params) /
             layer_param_divisor(layer, plan.tp, plan.ep, plan.tp > 1 && plan.expert_tp() == 1);
  m.state_bytes = m.params * param_state_bytes(plan).total();
  // The simulator's rule; under full recomputation each block's input, which the block group
  // shows, is kept beside the layers outside blocks.
  m.activation_bytes = layer_kept_act_bytes(layer, unit_key(plan), plan.recompute, true);
  return m;
}

std::string layer_graph_dot(const LayerGraph& graph, const Plan& plan,
                            const LayerGraphDotOptions& options) {
  const std::vector<int> chunk_of_unit = unit_chunks(graph, plan);
  const auto& g = graph.graph();
  const auto order = graph.topological_order();
  auto chunk_of = [&](LayerGraph::Vertex v) {
    const int u = g[v].unit;
    return u >= 0 && u < static_cast<int>(chunk_of_unit.size())
               ? chunk_of_unit[static_cast<std::size_t>(u)]
               : 0;
  };
  const bool collapse = !options.expand_blocks;
  auto node_id = [&](LayerGraph::Vertex v) {
    if (collapse && g[v].block >= 0) {
      return fmt::format("blocks_c{}", chunk_of(v));
    }
    return fmt::format("layer{}", v);
  };

  std::string out = fmt::format("digraph {} {{\n", dot_quote(graph.info().name));
  out += fmt::format("  graph [label={}, labelloc=t, fontname=\"Helvetica\", fontsize=14, "
                     "rankdir=TB, nodesep=0.25, ranksep=0.3];\n",
                     dot_quote(fmt::format("{} — {}\nmemory per rank; act = activations kept per "
                                           "micro-batch; bold blue edges: pipeline sends",
                                           graph.info().name, plan_label(plan))));
  out += "  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=10];\n";
  out += "  edge [color=\"#555555\", arrowsize=0.6];\n";

  // Vertices by chunk, in topological order; block groups gather their layers.
  const int chunks = plan.pp * plan.virtual_stages;
  std::vector<std::vector<LayerGraph::Vertex>> by_chunk(static_cast<std::size_t>(chunks));
  for (auto v : order) {
    by_chunk[static_cast<std::size_t>(std::min(chunk_of(v), chunks - 1))].push_back(v);
  }
  for (int c = 0; c < chunks; ++c) {
    const int pp_rank = chunk_pp_rank(plan, c);
    const std::string colour = stage_colour(pp_rank);
    const std::string title =
        plan.virtual_stages > 1
            ? fmt::format("stage {} · chunk {} on pipeline rank {}", pp_rank, c, pp_rank)
            : fmt::format("stage {}", pp_rank);
    out += fmt::format("  subgraph cluster_chunk{} {{\n    label={}; style=\"rounded,dashed\"; "
                       "color=\"#777777\"; fontsize=12;\n",
                       c, dot_quote(title));
    BlockGroup group;
    bool group_emitted = false;
    std::size_t group_at = 0; // where the group's node goes: where its first layer is
    std::map<int, std::vector<LayerGraph::Vertex>> expanded_blocks;
    for (auto v : by_chunk[static_cast<std::size_t>(c)]) {
      const Layer& l = g[v];
      const LayerMemory mem = layer_memory(l, plan);
      if (l.block >= 0 && collapse) {
        group.blocks.insert(l.block);
        group.first_block = std::min(group.first_block, l.block);
        group.last_block = std::max(group.last_block, l.block);
        if (l.block == group.first_block) {
          ++group.layers;
          if (l.tp_split != TpSplit::replicated) {
            ++group.splits[split_text(l, plan.tp)];
          }
        }
        add_memory(group.memory, mem);
        if (!group_emitted) {
          group_emitted = true; // its label is complete only after the chunk's last layer
          group_at = out.size();
        }
        continue;
      }
      const std::string label = layer_label(l, plan, memory_text(mem));
      if (l.block >= 0) {
        expanded_blocks[l.block].push_back(v);
        continue;
      }
      out += fmt::format("    layer{} [fillcolor={}, label={}];\n", v, dot_quote(colour),
                         dot_quote(label));
    }
    for (const auto& [block, vertices] : expanded_blocks) {
      out += fmt::format("    subgraph cluster_c{}_block{} {{\n      label={}; style=rounded; "
                         "color=\"#aaaaaa\";\n",
                         c, block, dot_quote(fmt::format("block {}", block)));
      for (auto v : vertices) {
        const Layer& l = g[v];
        const LayerMemory mem = layer_memory(l, plan);
        const std::string label = layer_label(l, plan, memory_text(mem));
        out += fmt::format("      layer{} [fillcolor={}, label={}];\n", v, dot_quote(colour),
                           dot_quote(label));
      }
      out += "    }\n";
    }
    if (group_emitted) {
      std::string splits;
      for (const auto& [text, count] : group.splits) {
        splits += fmt::format("{}{}× {}", splits.empty() ? "" : ", ", count, text);
      }
      const int n = static_cast<int>(group.blocks.size());
      if (plan.recompute == Recompute::full) {
        group.memory.activation_bytes +=
            n * full_recompute_input_bytes(graph.info(), unit_key(plan));
      }
      const std::string blocks = n == 1 ? fmt::format("transformer block {}", group.first_block)
                                        : fmt::format("transformer blocks {}–{} (×{})",
                                                      group.first_block, group.last_block, n);
      std::string label =
          fmt::format("{}\n{} layers per block{}\n{}", blocks, group.layers,
                      splits.empty() ? "" : "; TP: " + splits, memory_text(group.memory));
      out.insert(group_at, fmt::format("    blocks_c{} [fillcolor={}, label={}];\n", c,
                                       dot_quote(colour), dot_quote(label)));
    }
    out += "  }\n";
  }

  // Edges, mapped onto the drawn nodes (deduplicated, no self-loops), in a fixed order.
  std::set<std::pair<std::string, std::string>> drawn;
  std::vector<std::tuple<std::string, std::string, bool>> edges;
  for (const auto& [from, to] : graph.edges()) {
    std::string a = node_id(from);
    std::string b = node_id(to);
    if (a == b || !drawn.insert({a, b}).second) {
      continue;
    }
    edges.emplace_back(std::move(a), std::move(b), chunk_of(from) != chunk_of(to));
  }
  for (const auto& [a, b, crosses] : edges) {
    out += crosses ? fmt::format("  {} -> {} [penwidth=2.2, color=\"#1f4e9c\"];\n", a, b)
                   : fmt::format("  {} -> {};\n", a, b);
  }
  out += "}\n";
  return out;
}

} // namespace parallax::viz
