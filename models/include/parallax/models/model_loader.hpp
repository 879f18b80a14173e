// Loading a model from a zoo name or a file in any supported format.
#pragma once

#include "parallax/core/layer_graph.hpp"
#include "parallax/core/stack.hpp"
#include "parallax/models/model_config.hpp"

#include <optional>
#include <string>

namespace parallax {

struct LoadedModel {
  LayerGraph graph;
  std::optional<ModelConfig> config; // absent for generic layer graphs
  std::string source;                // the file it came from
};

// A zoo name or a path to: Parallax's model JSON, a Hugging Face config.json, or a generic
// layer-graph JSON ("layers" + "edges").
LoadedModel model_load(const std::string& name_or_path);
// The same from a document already in memory.
LoadedModel model_from_json(const Json& doc, const std::string& source);

// Gives the model the stack's attention and cross-entropy kernels where its file states none,
// and rebuilds its layer graph. Generic layer graphs name their kernels per layer: unchanged.
void model_apply_stack(LoadedModel& model, const Stack& stack);

} // namespace parallax
