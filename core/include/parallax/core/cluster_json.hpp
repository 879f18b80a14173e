// Cluster ⇄ JSON (the contract in ARCHITECTURE.md). Loaders validate every field.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/json_reader.hpp"

namespace parallax {

Cluster cluster_from_json(const Json& doc, const std::string& source);
Json cluster_to_json(const Cluster& cluster);

} // namespace parallax
