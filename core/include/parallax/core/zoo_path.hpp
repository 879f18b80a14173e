// Resolving zoo names ("gpt3-175b", "dgx-a100-80g") and paths to files, from any directory.
//
// A name is looked up, in order, under $PARALLAX_SHARE_DIR, the installed share directory and
// the source tree fixed at build time: <root>/models/zoo/NAME.json,
// <root>/hardware_profiles/zoo/NAME.json or <root>/hardware_profiles/stacks/NAME.json. Anything
// containing '/' or ending in ".json" is a path.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace parallax {

enum class ZooKind { models, clusters, stacks };

std::filesystem::path zoo_resolve(ZooKind kind, const std::string& name_or_path);
// Names in the first zoo directory found, sorted.
std::vector<std::string> zoo_list(ZooKind kind);
std::filesystem::path zoo_directory(ZooKind kind);

} // namespace parallax
