#include "parallax/hardware_profiles/stack_loader.hpp"

#include "parallax/core/stack_json.hpp"
#include "parallax/core/zoo_path.hpp"

namespace parallax {

Stack stack_load(const std::string& name_or_path) {
  auto path = zoo_resolve(ZooKind::stacks, name_or_path);
  return stack_from_json(json_load_file(path), path.string());
}

std::string stack_default_name(const Cluster& cluster) {
  return cluster.device.kind == "cpu" ? "parallax" : "megatron-core";
}

} // namespace parallax
