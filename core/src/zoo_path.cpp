#include "parallax/core/zoo_path.hpp"

#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>

namespace parallax {

namespace {

std::filesystem::path sub_dir(ZooKind kind) {
  switch (kind) {
  case ZooKind::models:
    return std::filesystem::path("models") / "zoo";
  case ZooKind::clusters:
    return std::filesystem::path("hardware_profiles") / "zoo";
  case ZooKind::stacks:
    break;
  }
  return std::filesystem::path("hardware_profiles") / "stacks";
}

std::vector<std::filesystem::path> roots() {
  std::vector<std::filesystem::path> out;
  if (const char* env = std::getenv("PARALLAX_SHARE_DIR"); env != nullptr && *env != '\0') {
    out.emplace_back(env);
  }
  out.emplace_back(PARALLAX_INSTALL_SHARE_DIR);
  out.emplace_back(PARALLAX_SOURCE_SHARE_DIR);
  return out;
}

} // namespace

std::filesystem::path zoo_directory(ZooKind kind) {
  for (const auto& root : roots()) {
    std::error_code ec;
    auto dir = root / sub_dir(kind);
    if (std::filesystem::is_directory(dir, ec)) {
      return dir;
    }
  }
  return {};
}

std::vector<std::string> zoo_list(ZooKind kind) {
  std::vector<std::string> names;
  auto dir = zoo_directory(kind);
  if (dir.empty()) {
    return names;
  }
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() == ".json") {
      names.push_back(entry.path().stem().string());
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::filesystem::path zoo_resolve(ZooKind kind, const std::string& name_or_path) {
  const char* what = kind == ZooKind::models     ? "--model"
                     : kind == ZooKind::clusters ? "--cluster"
                                                 : "--stack";
  if (name_or_path.empty()) {
    throw InputError("command line", what, "a zoo name or a path", "an empty string");
  }
  const bool looks_like_path =
      name_or_path.find('/') != std::string::npos || name_or_path.ends_with(".json");
  std::error_code ec;
  if (looks_like_path || std::filesystem::exists(name_or_path, ec)) {
    return name_or_path;
  }
  for (const auto& root : roots()) {
    auto candidate = root / sub_dir(kind) / (name_or_path + ".json");
    if (std::filesystem::is_regular_file(candidate, ec)) {
      return candidate;
    }
  }
  std::string names;
  for (const auto& n : zoo_list(kind)) {
    names += fmt::format("{}{}", names.empty() ? "" : ", ", n);
  }
  throw InputError("command line", what, "a zoo name (" + names + ") or a path to a JSON file",
                   fmt::format("\"{}\"", name_or_path),
                   kind == ZooKind::models     ? "`parallax models` lists the model zoo"
                   : kind == ZooKind::clusters ? "`parallax clusters` lists the cluster zoo"
                                               : "`parallax stacks` lists the stack zoo");
}

} // namespace parallax
