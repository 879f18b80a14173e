// The layer graph of a plan as Graphviz DOT: each layer coloured by the pipeline stage that runs
// it, annotated with its tensor-parallel split and the memory it costs one rank.
//
// By default the transformer blocks of each stage chunk collapse into one node with a count (a
// 96-layer model stays a picture of a dozen boxes); `expand_blocks` draws every layer, each
// block as its own cluster inside its stage. Layers outside blocks (embedding, final norm, head,
// loss) are always drawn. Edges that cross stages are the pipeline sends and are drawn bold.
#pragma once

#include "parallax/core/layer_graph.hpp"
#include "parallax/core/plan.hpp"

#include <string>

namespace parallax::viz {

struct LayerGraphDotOptions {
  bool expand_blocks = false;
};

// Memory one rank spends on a layer under `plan`.
struct LayerMemory {
  double params = 0;           // parameters held by one rank (after the TP split)
  double state_bytes = 0;      // weights + gradients + optimizer state, ZeRO-divided
  double activation_bytes = 0; // kept for backward per micro-batch, after recomputation
};

LayerMemory layer_memory(const Layer& layer, const Plan& plan);

std::string layer_graph_dot(const LayerGraph& graph, const Plan& plan,
                            const LayerGraphDotOptions& options = {});

} // namespace parallax::viz
