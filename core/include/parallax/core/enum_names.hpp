// Names of the IR's enumerations, one table per enum (indexed by the enum's value), and the one
// lookup every parser uses.
#pragma once

#include <array>
#include <cstddef>
#include <optional>
#include <string_view>

namespace parallax {

template <class Enum, std::size_t N>
std::optional<Enum> enum_from_name(const std::array<std::string_view, N>& names,
                                   std::string_view value) {
  for (std::size_t i = 0; i < N; ++i) {
    if (names[i] == value) {
      return static_cast<Enum>(i);
    }
  }
  return std::nullopt;
}

template <class Enum, std::size_t N>
std::string_view enum_name(const std::array<std::string_view, N>& names, Enum value) {
  return names.at(static_cast<std::size_t>(value));
}

} // namespace parallax
