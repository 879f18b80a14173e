// Builds the LayerGraph of a transformer from its ModelConfig.
//
// Per block (B = 1; s, h, a, g kv heads, d = h/a, f ffn): norm → QKV (column) → attention core
// (heads) → output projection (row) → residual → norm → MLP up (column) → activation → MLP down
// (row) → residual. Saved activations follow Korthikanti et al. 2022 (34·s·h + 5·a·s² bytes per
// GPT block in 16-bit). The embedding sits in unit 0; final norm, LM head and loss in unit L-1.
#pragma once

#include "parallax/core/layer_graph.hpp"
#include "parallax/models/model_config.hpp"

namespace parallax {

LayerGraph transformer_build_graph(const ModelConfig& config);

} // namespace parallax
