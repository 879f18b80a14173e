#include "parallax/viz/palette.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>

namespace parallax::viz {

namespace {

constexpr std::array<const char*, 12> kStageColours = {"#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6",
                                                       "#fb9a99", "#ffff99", "#8dd3c7", "#bebada",
                                                       "#80b1d3", "#fdb462", "#b3de69", "#fccde5"};

// HSL → "#rrggbb" (h in degrees, s and l in [0, 1]).
std::string hsl(double h, double s, double l) {
  const double c = (1 - std::abs(2 * l - 1)) * s;
  const double hp = std::fmod(h, 360.0) / 60.0;
  const double x = c * (1 - std::abs(std::fmod(hp, 2.0) - 1));
  double r = 0, g = 0, b = 0;
  if (hp < 1) {
    r = c, g = x;
  } else if (hp < 2) {
    r = x, g = c;
  } else if (hp < 3) {
    g = c, b = x;
  } else if (hp < 4) {
    g = x, b = c;
  } else if (hp < 5) {
    r = x, b = c;
  } else {
    r = c, b = x;
  }
  const double m = l - c / 2;
  auto byte = [m](double v) { return static_cast<int>(std::lround(255 * (v + m))); };
  return fmt::format("#{:02x}{:02x}{:02x}", byte(r), byte(g), byte(b));
}

} // namespace

std::string stage_colour(int stage) {
  const auto n = static_cast<int>(kStageColours.size());
  return kStageColours[static_cast<std::size_t>(((stage % n) + n) % n)];
}

std::string micro_batch_colour(int micro_batch, Category category) {
  const int i = micro_batch < 0 ? 0 : micro_batch % 10;
  const double hue = 36.0 * i + 200.0; // start at blue, step around the wheel
  switch (category) {
  case Category::forward:
    return hsl(hue, 0.65, 0.72);
  case Category::backward:
    return hsl(hue, 0.60, 0.50);
  case Category::recompute:
    return hsl(hue, 0.35, 0.82);
  default:
    return category_colour(category);
  }
}

std::string category_colour(Category category) {
  switch (category) {
  case Category::forward:
    return "#9ecae1";
  case Category::backward:
    return "#3182bd";
  case Category::recompute:
    return "#c6dbef";
  case Category::optimizer:
    return "#969696";
  case Category::tp_comm:
    return "#fd8d3c";
  case Category::pp_comm:
    return "#31a354";
  case Category::dp_comm:
    return "#e6550d";
  case Category::idle:
    return "#f0f0f0";
  }
  return "#cccccc";
}

std::string format_bytes(double bytes) {
  constexpr std::array<const char*, 5> units = {"B", "KiB", "MiB", "GiB", "TiB"};
  std::size_t u = 0;
  while (std::abs(bytes) >= 1024 && u + 1 < units.size()) {
    bytes /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, units[u]);
}

std::string format_seconds(double seconds) {
  const double a = std::abs(seconds);
  if (a == 0) {
    return "0";
  }
  if (a >= 1) {
    return fmt::format("{:.3g} s", seconds);
  }
  if (a >= 1e-3) {
    return fmt::format("{:.3g} ms", seconds * 1e3);
  }
  return fmt::format("{:.3g} µs", seconds * 1e6);
}

std::string format_count(double count) {
  const double a = std::abs(count);
  if (a >= 1e12) {
    return fmt::format("{:.1f} T", count / 1e12);
  }
  if (a >= 1e9) {
    return fmt::format("{:.1f} G", count / 1e9);
  }
  if (a >= 1e6) {
    return fmt::format("{:.1f} M", count / 1e6);
  }
  if (a >= 1e3) {
    return fmt::format("{:.1f} k", count / 1e3);
  }
  return fmt::format("{:.0f}", count);
}

double axis_tick_step(double span, int ticks) {
  const double raw = std::max(span, 1e-30) / std::max(ticks, 1);
  const double base = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 2.5, 5.0}) {
    if (m * base >= raw) {
      return m * base;
    }
  }
  return 10 * base;
}

} // namespace parallax::viz
