#include "parallax/viz/report_plots.hpp"

#include "parallax/viz/palette.hpp"
#include "parallax/viz/svg_writer.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <set>

namespace parallax::viz {

namespace {

// Round-number axis: ticks at axis_tick_step multiples covering [0, max].
struct Axis {
  double max = 1;
  double step = 1;
};

Axis nice_axis(double max_value, int ticks = 6) {
  max_value = std::max(max_value, 1e-30);
  const double step = axis_tick_step(max_value, ticks);
  return {std::ceil(max_value / step - 1e-9) * step, step};
}

std::string short_number(double v) {
  if (v == 0) {
    return "0";
  }
  return format_count(v);
}

struct BreakdownPart {
  const char* name;
  Category category;
  double TimeBreakdown::*field;
};

constexpr std::array<BreakdownPart, 6> kParts = {{
    {"compute", Category::backward, &TimeBreakdown::compute},
    {"TP comm", Category::tp_comm, &TimeBreakdown::tp_comm},
    {"PP comm", Category::pp_comm, &TimeBreakdown::pp_comm},
    {"DP comm", Category::dp_comm, &TimeBreakdown::dp_comm},
    {"bubble", Category::idle, &TimeBreakdown::bubble},
    {"optimizer", Category::optimizer, &TimeBreakdown::optimizer},
}};

std::string part_colour(const BreakdownPart& p) {
  return p.category == Category::idle ? std::string("#d9d9d9") : category_colour(p.category);
}

} // namespace

std::vector<std::size_t> pareto_front(const std::vector<CandidatePoint>& points) {
  std::vector<std::size_t> order(points.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    if (points[a].memory_bytes != points[b].memory_bytes) {
      return points[a].memory_bytes < points[b].memory_bytes;
    }
    return points[a].tokens_per_s > points[b].tokens_per_s;
  });
  std::vector<std::size_t> front;
  double best = -1;
  for (std::size_t i : order) {
    if (points[i].tokens_per_s > best) {
      front.push_back(i);
      best = points[i].tokens_per_s;
    }
  }
  return front;
}

std::string candidates_scatter_svg(const std::vector<CandidatePoint>& points,
                                   double memory_capacity_bytes, std::size_t max_points) {
  constexpr double W = 720, H = 420, L = 70, R = 20, T = 30, B = 50;
  SvgWriter svg(W, H);
  const std::vector<std::size_t> front = pareto_front(points);
  const std::set<std::size_t> on_front(front.begin(), front.end());
  std::vector<std::size_t> drawn;
  std::size_t others = 0;
  for (std::size_t i = 0; i < points.size(); ++i) {
    if (!on_front.contains(i) && points[i].rank_in_table < 0 && !points[i].chosen) {
      ++others;
    }
  }
  const std::size_t budget = max_points > front.size() ? max_points - front.size() : 0;
  const std::size_t stride = others > budget && budget > 0 ? (others + budget - 1) / budget : 1;
  std::size_t seen = 0;
  std::size_t sampled = 0;
  for (std::size_t i = 0; i < points.size(); ++i) {
    const bool special = on_front.contains(i) || points[i].rank_in_table >= 0 || points[i].chosen;
    if (special) {
      drawn.push_back(i);
    } else if (budget > 0 && seen++ % stride == 0) {
      drawn.push_back(i);
      ++sampled;
    }
  }
  double max_mem = 0;
  double max_tps = 0;
  for (std::size_t i : drawn) {
    max_mem = std::max(max_mem, points[i].memory_bytes);
    max_tps = std::max(max_tps, points[i].tokens_per_s);
  }
  // The device's memory is drawn when it is on the scale of the plans; far above them it would
  // squeeze every point against the axis, so the caption gives it instead.
  const bool capacity_drawn = memory_capacity_bytes > 0 && memory_capacity_bytes < 2 * max_mem;
  if (capacity_drawn) {
    max_mem = std::max(max_mem, memory_capacity_bytes);
  }
  // Memory axis in the binary unit that keeps its numbers ≥ 1.
  double unit = 1;
  std::string unit_name = "B";
  for (const char* name : {"KiB", "MiB", "GiB", "TiB"}) {
    if (max_mem < unit * 1024 * 2) {
      break;
    }
    unit *= 1024;
    unit_name = name;
  }
  const double gib = unit;
  const Axis ax = nice_axis(max_mem / gib);
  const Axis ay = nice_axis(max_tps);
  auto px = [&](double mem) { return L + (mem / gib) / ax.max * (W - L - R); };
  auto py = [&](double tps) { return H - B - tps / ay.max * (H - T - B); };
  // Axes and grid.
  for (double v = 0; v <= ax.max + 1e-9; v += ax.step) {
    svg.line(px(v * gib), T, px(v * gib), H - B, "#eeeeee");
    svg.text(px(v * gib), H - B + 14, fmt::format("{:g}", v), 10, "middle");
  }
  for (double v = 0; v <= ay.max * (1 + 1e-9); v += ay.step) {
    svg.line(L, py(v), W - R, py(v), "#eeeeee");
    svg.text(L - 6, py(v) + 3, short_number(v), 10, "end");
  }
  svg.line(L, H - B, W - R, H - B, "#333333");
  svg.line(L, T, L, H - B, "#333333");
  svg.text((L + W - R) / 2, H - 12, fmt::format("memory per GPU ({})", unit_name), 11, "middle");
  svg.text(14, (T + H - B) / 2, "tokens/s", 11, "middle",
           fmt::format("transform=\"rotate(-90 14 {:.1f})\"", (T + H - B) / 2));
  if (capacity_drawn) {
    svg.line(px(memory_capacity_bytes), T, px(memory_capacity_bytes), H - B, "#cb181d", 1.2,
             R"(stroke-dasharray="5,4")");
    svg.text(px(memory_capacity_bytes) - 4, T + 10, "device memory", 10, "end",
             R"(fill="#cb181d")");
  }
  // Pareto front as a step line.
  std::string path;
  for (std::size_t k = 0; k < front.size(); ++k) {
    const auto& p = points[front[k]];
    path +=
        fmt::format("{}{:.2f},{:.2f} ", k == 0 ? "M" : "L", px(p.memory_bytes), py(p.tokens_per_s));
  }
  if (!path.empty()) {
    svg.raw(fmt::format(R"(<path d="{}" fill="none" stroke="#cb181d" stroke-width="1.2"/>)", path) +
            "\n");
  }
  for (std::size_t i : drawn) {
    const auto& p = points[i];
    const std::string tip = fmt::format(
        "{}{:.0f} tokens/s, {}{}", p.rank_in_table > 0 ? fmt::format("#{}: ", p.rank_in_table) : "",
        p.tokens_per_s, format_bytes(p.memory_bytes),
        on_front.contains(i) ? " (Pareto front)" : "");
    if (on_front.contains(i)) {
      svg.circle(px(p.memory_bytes), py(p.tokens_per_s), 3.6, "#cb181d", tip, R"(class="pareto")");
    } else {
      svg.circle(px(p.memory_bytes), py(p.tokens_per_s), 2.2, "#6baed6", tip,
                 R"(fill-opacity="0.55" class="candidate")");
    }
    if (p.chosen) {
      svg.circle(px(p.memory_bytes), py(p.tokens_per_s), 7, "none", "chosen plan",
                 R"(stroke="#000000" stroke-width="1.5")");
    }
    if (p.rank_in_table > 0 && p.rank_in_table <= 5) {
      svg.text(px(p.memory_bytes) + 6, py(p.tokens_per_s) - 5, std::to_string(p.rank_in_table), 10);
    }
  }
  svg.text(L, 18,
           fmt::format(
               "{} timed plans; {} on the Pareto front (red){}{}", points.size(), front.size(),
               sampled < others ? fmt::format("; {} of the other {} drawn", sampled, others) : "",
               capacity_drawn || memory_capacity_bytes <= 0
                   ? ""
                   : fmt::format("; device memory {} is off the scale",
                                 format_bytes(memory_capacity_bytes))),
           11);
  return svg.finish();
}

std::string memory_breakdown_svg(const MemoryBreakdown& m, double capacity) {
  constexpr double W = 720, H = 110, L = 20, R = 20;
  SvgWriter svg(W, H);
  const std::array<std::pair<const char*, double>, 5> parts = {{{"params", m.params},
                                                                {"grads", m.grads},
                                                                {"optimizer", m.optimizer},
                                                                {"activations", m.activations},
                                                                {"buffers", m.buffers}}};
  const std::array<const char*, 5> colours = {"#6baed6", "#fd8d3c", "#74c476", "#9e9ac8",
                                              "#bdbdbd"};
  // Scaled to the device when the plan fills a fair part of it, else to the plan alone.
  const bool capacity_drawn = capacity > 0 && capacity < 4 * m.total();
  const double full = capacity_drawn ? std::max(m.total(), capacity) : m.total();
  const double scale = (W - L - R) / std::max(full, 1.0);
  double x = L;
  double legend_x = L;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const double w = parts[i].second * scale;
    svg.rect(x, 30, w, 28, colours[i],
             fmt::format("{}: {}", parts[i].first, format_bytes(parts[i].second)));
    x += w;
    const std::string label = fmt::format("{} {}", parts[i].first, format_bytes(parts[i].second));
    svg.rect(legend_x, 72, 10, 10, colours[i]);
    svg.text(legend_x + 14, 81, label, 10);
    legend_x += 24 + 6.0 * static_cast<double>(label.size());
  }
  if (capacity_drawn) {
    svg.line(L + capacity * scale, 24, L + capacity * scale, 64, "#cb181d", 1.5);
  }
  svg.text(L, 18,
           fmt::format("{} of {} per GPU (most loaded rank, {:.1f}% of the device)",
                       format_bytes(m.total()), format_bytes(capacity),
                       capacity > 0 ? 100 * m.total() / capacity : 0.0),
           11);
  return svg.finish();
}

std::string compare_bars_svg(const std::vector<ComparedPlan>& plans) {
  constexpr double W = 900, L = 300, R = 90, T = 40, kBar = 12, kGroup = 34;
  const double H = T + kGroup * static_cast<double>(plans.size()) + 30;
  SvgWriter svg(W, H);
  double longest = 1e-12;
  for (const auto& p : plans) {
    longest = std::max(
        {longest, p.measured_step_s, p.simulated_step_s, p.measured.total(), p.simulated.total()});
  }
  const Axis ax = nice_axis(longest);
  const double scale = (W - L - R) / ax.max;
  double legend_x = L;
  for (const auto& part : kParts) {
    svg.rect(legend_x, 10, 10, 10, part_colour(part));
    svg.text(legend_x + 14, 19, part.name, 10);
    legend_x += 30 + 6.0 * static_cast<double>(std::string_view(part.name).size());
  }
  svg.text(L - 6, 19, "M = measured, S = simulated", 10, "end");
  for (std::size_t i = 0; i < plans.size(); ++i) {
    const auto& p = plans[i];
    const double y = T + kGroup * static_cast<double>(i);
    svg.text(L - 24, y + kBar + 2, fmt::format("{} {}", i + 1, plan_label(p.plan)), 10, "end");
    const std::array<std::tuple<const char*, const TimeBreakdown*, double>, 2> bars = {
        {{"M", &p.measured, p.measured_step_s}, {"S", &p.simulated, p.simulated_step_s}}};
    for (std::size_t b = 0; b < bars.size(); ++b) {
      const auto& [tag, breakdown, step] = bars[b];
      const double by = y + static_cast<double>(b) * (kBar + 2);
      svg.text(L - 8, by + kBar - 2, tag, 9, "end");
      double x = L;
      for (const auto& part : kParts) {
        const double v = breakdown->*part.field;
        if (v <= 0) {
          continue;
        }
        svg.rect(x, by, v * scale, kBar, part_colour(part),
                 fmt::format("{} {}: {}", tag[0] == 'M' ? "measured" : "simulated", part.name,
                             format_seconds(v)));
        x += v * scale;
      }
      // The step time itself (the breakdown may not sum to it exactly for measured runs).
      svg.line(L + step * scale, by - 1, L + step * scale, by + kBar + 1, "#000000", 1.5);
    }
    const double err = p.measured_step_s > 0 ? p.simulated_step_s / p.measured_step_s - 1 : 0;
    svg.text(W - R + 6, y + kBar + 2, fmt::format("{:+.1f}%", 100 * err), 11, "start",
             std::abs(err) > 0.1 ? R"(fill="#cb181d")" : "");
  }
  const double axis_y = T + kGroup * static_cast<double>(plans.size());
  svg.line(L, axis_y, W - R, axis_y, "#333333");
  for (double v = 0; v <= ax.max * (1 + 1e-9); v += ax.step) {
    svg.line(L + v * scale, axis_y, L + v * scale, axis_y + 4, "#333333");
    svg.text(L + v * scale, axis_y + 15, format_seconds(v), 9, "middle");
  }
  return svg.finish();
}

std::string op_error_histogram_svg(const std::vector<ComparedPlan>& plans) {
  // Bins of 10 points of error from −100% to +100%, the outer ones open.
  constexpr int kBins = 21;
  constexpr double W = 900, H = 260, L = 50, R = 20, T = 40, B = 40;
  const std::array<std::pair<const char*, const char*>, 4> kinds = {{{"compute", "#3182bd"},
                                                                     {"tp_comm", "#e6550d"},
                                                                     {"pp_comm", "#31a354"},
                                                                     {"dp_comm", "#756bb1"}}};
  std::vector<std::array<int, 4>> counts(kBins, std::array<int, 4>{});
  int total = 0;
  for (const ComparedPlan& p : plans) {
    for (const ComparedOp& op : p.ops) {
      if (!op.simulated_s || !op.measured_s || *op.measured_s <= 0)
        continue;
      const double err = *op.simulated_s / *op.measured_s - 1;
      const int bin = std::clamp(static_cast<int>(std::floor(err * 10 + 0.5)) + 10, 0, kBins - 1);
      std::size_t kind = 0;
      for (std::size_t k = 1; k < kinds.size(); ++k) {
        if (op.category == kinds[k].first)
          kind = k;
      }
      ++counts[static_cast<std::size_t>(bin)][kind];
      ++total;
    }
  }
  int tallest = 1;
  for (const auto& c : counts)
    tallest = std::max(tallest, c[0] + c[1] + c[2] + c[3]);
  SvgWriter svg(W, H);
  double legend_x = L;
  for (const auto& [name, colour] : kinds) {
    svg.rect(legend_x, 10, 10, 10, colour);
    svg.text(legend_x + 14, 19, name, 10);
    legend_x += 90;
  }
  svg.text(W - R, 19, fmt::format("{} ops with both times", total), 10, "end");
  const double bw = (W - L - R) / kBins;
  const double scale = (H - T - B) / tallest;
  for (int b = 0; b < kBins; ++b) {
    double y = H - B;
    for (std::size_t k = 0; k < kinds.size(); ++k) {
      const int n = counts[static_cast<std::size_t>(b)][k];
      if (n == 0)
        continue;
      const double h = n * scale;
      y -= h;
      svg.rect(L + b * bw + 1, y, bw - 2, h, kinds[k].second,
               fmt::format("{} ops ({}) with error in this bin", n, kinds[k].first));
    }
    if (b % 5 == 0) {
      svg.text(L + (b + 0.5) * bw, H - B + 15,
               b == 0           ? "≤ −100%"
               : b == kBins - 1 ? "≥ +100%"
                                : fmt::format("{:+d}%", (b - 10) * 10),
               9, "middle");
    }
  }
  svg.line(L, H - B, W - R, H - B, "#333333");
  svg.text(L + (W - L - R) / 2, H - 6, "per-op error: simulated / measured − 1", 10, "middle");
  return svg.finish();
}

} // namespace parallax::viz
