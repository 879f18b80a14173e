#include "parallax/hardware_profiles/cluster_loader.hpp"

#include "parallax/core/cluster_json.hpp"
#include "parallax/core/zoo_path.hpp"

namespace parallax {

Cluster cluster_load(const std::string& name_or_path) {
  auto path = zoo_resolve(ZooKind::clusters, name_or_path);
  return cluster_from_json(json_load_file(path), path.string());
}

} // namespace parallax
