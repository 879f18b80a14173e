#include "parallax/viz/mesh_dot.hpp"

#include "parallax/viz/graphviz_render.hpp"
#include "parallax/viz/palette.hpp"

#include <fmt/format.h>

#include <map>
#include <vector>

namespace parallax::viz {

namespace {

constexpr const char* kTpEdge = "[dir=none, color=\"#e6550d\", penwidth=2.5, constraint=false]";
constexpr const char* kPpEdge = "[color=\"#1f4e9c\", penwidth=1.6]";
constexpr const char* kDpEdge =
    "[dir=none, color=\"#31a354\", style=dashed, penwidth=1.4, constraint=false]";
// Data-parallel neighbours inside one expert-parallel group (they hold different experts).
constexpr const char* kEpEdge =
    "[dir=none, color=\"#756bb1\", style=dotted, penwidth=2.2, constraint=false]";
// Context-parallel ring neighbours (K/V pass from each to the next, the last back to the first).
constexpr const char* kCpEdge = "[color=\"#d6616b\", style=bold, penwidth=1.8, constraint=false]";

// Units of every pipeline rank ("units 0–5", or "chunks 0, 2" when interleaved).
std::string stage_text(const Plan& plan, int pp_rank) {
  if (plan.stages.empty()) {
    return fmt::format("stage {}", pp_rank);
  }
  std::string units;
  for (std::size_t c = 0; c < plan.stages.size(); ++c) {
    if (chunk_pp_rank(plan, static_cast<int>(c)) == pp_rank) {
      const auto [first, last] = plan.stages[c];
      units += last - first == 1
                   ? fmt::format("{}{}", units.empty() ? "" : ", ", first)
                   : fmt::format("{}{}–{}", units.empty() ? "" : ", ", first, last - 1);
    }
  }
  return fmt::format("stage {}: unit{} {}", pp_rank,
                     units.find_first_of(",–") == std::string::npos ? "" : "s", units);
}

std::string legend(bool ep, bool cp) {
  std::string ep_entry =
      ep ? "    legend_g [shape=point, width=0.05]; legend_h [shape=point, width=0.05];\n"
           "    legend_g -> legend_h [dir=none, color=\"#756bb1\", style=dotted, penwidth=2.2, "
           "label=\"EP\"];\n"
         : "";
  if (cp) {
    ep_entry += "    legend_i [shape=point, width=0.05]; legend_j [shape=point, width=0.05];\n"
                "    legend_i -> legend_j [color=\"#d6616b\", style=bold, penwidth=1.8, "
                "label=\"CP ring\"];\n";
  }
  return "  subgraph cluster_legend {\n    label=\"legend\"; style=rounded; color=\"#aaaaaa\";\n"
         "    edge [fontname=\"Helvetica\", fontsize=10];\n"
         "    legend_a [shape=point, width=0.05]; legend_b [shape=point, width=0.05];\n"
         "    legend_c [shape=point, width=0.05]; legend_d [shape=point, width=0.05];\n"
         "    legend_e [shape=point, width=0.05]; legend_f [shape=point, width=0.05];\n"
         "    legend_a -> legend_b [dir=none, color=\"#e6550d\", penwidth=2.5, label=\"TP\"];\n"
         "    legend_c -> legend_d [color=\"#1f4e9c\", penwidth=1.6, label=\"PP\"];\n"
         "    legend_e -> legend_f [dir=none, color=\"#31a354\", style=dashed, label=\"DP\"];\n" +
         ep_entry + "  }\n";
}

std::string mesh_expanded(const Plan& plan, const Cluster& cluster) {
  const int per_node = cluster.node.devices_per_node;
  std::map<int, std::vector<int>> ranks_by_node;
  for (int r = 0; r < plan.world_size(); ++r) {
    ranks_by_node[rank_device(r, per_node).node].push_back(r);
  }
  std::string out;
  for (const auto& [node, ranks] : ranks_by_node) {
    out += fmt::format("  subgraph cluster_node{} {{\n    label={}; style=rounded; "
                       "color=\"#444444\";\n",
                       node, dot_quote(fmt::format("node {}", node)));
    for (int r : ranks) {
      const RankCoords c = rank_coords(plan, r);
      out += fmt::format(
          "    rank{} [fillcolor={}, label={}];\n", r, dot_quote(stage_colour(c.pp)),
          dot_quote(fmt::format(
              "rank {} · GPU {}\ndp{}{} pp{} tp{}{}\n{}", r, rank_device(r, per_node).device, c.dp,
              plan.cp > 1 ? fmt::format(" cp{}", c.cp) : std::string(), c.pp, c.tp,
              plan.ep > 1 ? fmt::format("\nexperts {}/{} of EP group {}",
                                        expert_rank_index(plan, r) % plan.ep + 1, plan.ep,
                                        expert_rank_index(plan, r) / plan.ep)
                          : std::string(),
              stage_text(plan, c.pp))));
    }
    out += "  }\n";
  }
  for (int r = 0; r < plan.world_size(); ++r) {
    const RankCoords c = rank_coords(plan, r);
    if (c.tp + 1 < plan.tp) {
      out += fmt::format("  rank{} -> rank{} {};\n", r, rank_of(plan, {c.dp, c.pp, c.tp + 1, c.cp}),
                         kTpEdge);
    }
    if (c.pp + 1 < plan.pp) {
      out += fmt::format("  rank{} -> rank{} {};\n", r, rank_of(plan, {c.dp, c.pp + 1, c.tp, c.cp}),
                         kPpEdge);
    }
    if (plan.cp > 1 && (c.cp + 1 < plan.cp || plan.cp > 2)) {
      out += fmt::format("  rank{} -> rank{} {};\n", r,
                         rank_of(plan, {c.dp, c.pp, c.tp, (c.cp + 1) % plan.cp}), kCpEdge);
    }
    if (c.dp + 1 < plan.dp) {
      // Inside an expert-parallel group the neighbours hold different experts.
      const int next = rank_of(plan, {c.dp + 1, c.pp, c.tp, c.cp});
      const bool ep_peer = plan.ep > 1 && expert_rank_index(plan, r) / plan.ep ==
                                              expert_rank_index(plan, next) / plan.ep;
      out += fmt::format("  rank{} -> rank{} {};\n", r, next, ep_peer ? kEpEdge : kDpEdge);
    }
  }
  return out;
}

std::string node_span(int per_node, int first_rank, int last_rank) {
  const int a = rank_device(first_rank, per_node).node;
  const int b = rank_device(last_rank, per_node).node;
  return a == b ? fmt::format("node {}", a) : fmt::format("nodes {}–{}", a, b);
}

// One box per tensor-parallel group; replicas 1 … d−2 folded into one node per stage.
std::string mesh_folded(const Plan& plan, const Cluster& cluster) {
  const int per_node = cluster.node.devices_per_node;
  std::vector<int> shown_dp = {0};
  if (plan.dp > 1) {
    shown_dp.push_back(plan.dp - 1);
  }
  const bool fold_middle = plan.dp > 2;
  std::string out;
  auto group_id = [](int dp, int pp) { return fmt::format("tp_d{}_p{}", dp, pp); };
  for (int dp : shown_dp) {
    out += fmt::format("  subgraph cluster_replica{} {{\n    label={}; style=rounded; "
                       "color=\"#444444\";\n",
                       dp, dot_quote(fmt::format("data-parallel replica {}", dp)));
    for (int pp = 0; pp < plan.pp; ++pp) {
      const int first = rank_of(plan, {dp, pp, 0, 0});
      const int last = rank_of(plan, {dp, pp, plan.tp - 1, plan.cp - 1});
      const std::string group =
          plan.cp > 1 ? fmt::format("TP group of {} × CP ring of {}", plan.tp, plan.cp)
                      : fmt::format("TP group of {}", plan.tp);
      out += fmt::format(
          "    {} [fillcolor={}, label={}];\n", group_id(dp, pp), dot_quote(stage_colour(pp)),
          dot_quote(fmt::format("ranks {}–{} ({})\n{}, GPUs {}–{}\n{}", first, last, group,
                                node_span(per_node, first, last),
                                rank_device(first, per_node).device,
                                rank_device(last, per_node).device, stage_text(plan, pp))));
    }
    out += "  }\n";
  }
  if (fold_middle) {
    for (int pp = 0; pp < plan.pp; ++pp) {
      const int replicas = plan.dp - 2;
      out += fmt::format(
          "  folded_p{} [shape=box3d, fillcolor={}, label={}];\n", pp, dot_quote(stage_colour(pp)),
          dot_quote(fmt::format("replicas 1–{} of stage {}\n(×{}, {} GPUs)", plan.dp - 2, pp,
                                replicas, replicas * plan.tp * plan.cp)));
    }
  }
  for (int dp : shown_dp) {
    for (int pp = 0; pp + 1 < plan.pp; ++pp) {
      out += fmt::format("  {} -> {} {};\n", group_id(dp, pp), group_id(dp, pp + 1), kPpEdge);
    }
  }
  for (int pp = 0; pp < plan.pp && plan.dp > 1; ++pp) {
    if (fold_middle) {
      out += fmt::format("  {} -> folded_p{} {};\n", group_id(0, pp), pp, kDpEdge);
      out += fmt::format("  folded_p{} -> {} {};\n", pp, group_id(plan.dp - 1, pp), kDpEdge);
    } else {
      out += fmt::format("  {} -> {} {};\n", group_id(0, pp), group_id(plan.dp - 1, pp), kDpEdge);
    }
  }
  return out;
}

} // namespace

std::string mesh_dot(const Plan& plan, const Cluster& cluster, const MeshDotOptions& options) {
  const bool fold = !options.expand && plan.world_size() > options.fold_above;
  std::string out = "digraph mesh {\n";
  out += fmt::format(
      "  graph [label={}, labelloc=t, fontname=\"Helvetica\", fontsize=14, "
      "rankdir=LR, nodesep=0.2, ranksep=0.6, newrank=true];\n",
      dot_quote(fmt::format("{} GPUs of {} ({} per node) — {}{}", plan.world_size(), cluster.name,
                            cluster.node.devices_per_node, plan_label(plan),
                            fold ? "\nfolded: one box per TP group, middle "
                                   "data-parallel replicas counted"
                                 : "")));
  out += "  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=10];\n";
  out += fold ? mesh_folded(plan, cluster) : mesh_expanded(plan, cluster);
  out += legend(plan.ep > 1, plan.cp > 1);
  out += "}\n";
  return out;
}

} // namespace parallax::viz
