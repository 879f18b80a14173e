// Loading a cluster profile from a zoo name or a path.
#pragma once

#include "parallax/core/cluster.hpp"

#include <string>

namespace parallax {

Cluster cluster_load(const std::string& name_or_path);

} // namespace parallax
