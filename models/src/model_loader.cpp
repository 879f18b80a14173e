#include "parallax/models/model_loader.hpp"

#include "parallax/core/error.hpp"
#include "parallax/core/layer_graph_json.hpp"
#include "parallax/core/zoo_path.hpp"
#include "parallax/models/transformer_builder.hpp"

namespace parallax {

LoadedModel model_from_json(const Json& doc, const std::string& source) {
  if (!doc.is_object()) {
    throw InputError(source, "", "a JSON object (a model, HF config or layer graph)",
                     json_describe(doc));
  }
  if (doc.contains("layers")) {
    return {layer_graph_from_json(doc, source), std::nullopt, source};
  }
  ModelConfig config =
      is_hf_config(doc) ? model_config_from_hf(doc, source) : model_config_from_json(doc, source);
  return {transformer_build_graph(config), config, source};
}

void model_apply_stack(LoadedModel& model, const Stack& stack) {
  if (!model.config) {
    return;
  }
  ModelConfig& c = *model.config;
  const ModelConfig before = c;
  if (!c.attention_impl_stated) {
    c.attention_impl = std::string(attention_kernel_name(stack.attention));
  }
  if (!c.loss_impl_stated) {
    c.loss_impl = std::string(loss_kernel_name(stack.loss));
  }
  if (!(c == before)) {
    model.graph = transformer_build_graph(c);
  }
}

LoadedModel model_load(const std::string& name_or_path) {
  auto path = zoo_resolve(ZooKind::models, name_or_path);
  return model_from_json(json_load_file(path), path.string());
}

} // namespace parallax
