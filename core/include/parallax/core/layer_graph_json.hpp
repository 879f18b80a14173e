// LayerGraph ⇄ JSON: the generic layer-graph format, for arbitrary DAGs a builder does not know.
//
// {"name": "...", "family": "generic", "seq_length": 1024, "hidden_size": 768,
//  "num_attention_heads": 12, "num_kv_heads": 12, "vocab_size": 50257, "num_layers": 12,
//  "layers": [{"name": "embed", "kind": "embedding", "tp_split": "vocab", "unit": 0,
//              "params": 38597376, "fwd_flops": 0, "bwd_flops": 0, "gemms": [...], ...}],
//  "edges": [[0, 1], ...]}
// Per-layer figures are per sequence (micro-batch 1); see layer_graph.hpp for each field.
#pragma once

#include "parallax/core/json_reader.hpp"
#include "parallax/core/layer_graph.hpp"

namespace parallax {

LayerGraph layer_graph_from_json(const Json& doc, const std::string& source);
Json layer_graph_to_json(const LayerGraph& graph);

} // namespace parallax
