#include "parallax/core/layer_graph.hpp"

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"

#include <boost/graph/topological_sort.hpp>

#include <algorithm>
#include <array>
#include <iterator>

namespace parallax {

std::string_view layer_kind_name(LayerKind k) {
  return enum_name(kLayerKindNames, k);
}
std::string_view tp_split_name(TpSplit s) {
  return enum_name(kTpSplitNames, s);
}

LayerGraph::Vertex LayerGraph::add_layer(Layer layer) {
  return boost::add_vertex(std::move(layer), graph_);
}

void LayerGraph::add_edge(Vertex from, Vertex to) {
  PARALLAX_CHECK(from < num_layers() && to < num_layers(), "edge endpoint out of range");
  boost::add_edge(from, to, graph_);
}

std::vector<std::pair<LayerGraph::Vertex, LayerGraph::Vertex>> LayerGraph::edges() const {
  std::vector<std::pair<Vertex, Vertex>> out;
  for (auto [it, end] = boost::edges(graph_); it != end; ++it) {
    out.emplace_back(boost::source(*it, graph_), boost::target(*it, graph_));
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<LayerGraph::Vertex> LayerGraph::topological_order(std::string_view source) const {
  std::vector<Vertex> reversed;
  try {
    boost::topological_sort(graph_, std::back_inserter(reversed));
  } catch (const boost::not_a_dag&) {
    throw InputError(std::string(source), "/edges", "an acyclic graph", "a cycle");
  }
  std::reverse(reversed.begin(), reversed.end());
  return reversed;
}

int LayerGraph::num_units() const {
  int max_unit = -1;
  for (auto [it, end] = boost::vertices(graph_); it != end; ++it) {
    max_unit = std::max(max_unit, graph_[*it].unit);
  }
  return max_unit + 1;
}

std::int64_t LayerGraph::total_params() const {
  std::int64_t sum = 0;
  for (auto [it, end] = boost::vertices(graph_); it != end; ++it) {
    sum += graph_[*it].params;
  }
  return sum;
}

std::int64_t LayerGraph::active_params() const {
  std::int64_t sum = 0;
  for (auto [it, end] = boost::vertices(graph_); it != end; ++it) {
    const Layer& l = graph_[*it];
    sum += l.experts > 0 ? l.params / l.experts * l.experts_active : l.params;
  }
  return sum;
}

double LayerGraph::total_fwd_flops() const {
  double sum = 0;
  for (auto [it, end] = boost::vertices(graph_); it != end; ++it) {
    sum += graph_[*it].fwd_flops;
  }
  return sum;
}

double LayerGraph::total_bwd_flops() const {
  double sum = 0;
  for (auto [it, end] = boost::vertices(graph_); it != end; ++it) {
    sum += graph_[*it].bwd_flops;
  }
  return sum;
}

double LayerGraph::total_gemm_flops() const {
  double sum = 0;
  for (auto [it, end] = boost::vertices(graph_); it != end; ++it) {
    for (const Gemm& g : graph_[*it].gemms) {
      sum += g.flops();
    }
  }
  return sum;
}

bool LayerGraph::operator==(const LayerGraph& other) const {
  if (!(info_ == other.info_) || num_layers() != other.num_layers()) {
    return false;
  }
  for (std::size_t v = 0; v < num_layers(); ++v) {
    if (!(graph_[v] == other.graph_[v])) {
      return false;
    }
  }
  return edges() == other.edges();
}

} // namespace parallax
