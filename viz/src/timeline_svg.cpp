#include "parallax/viz/timeline_svg.hpp"

#include "parallax/viz/palette.hpp"
#include "parallax/viz/svg_writer.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

namespace parallax::viz {

namespace {

constexpr double kLeftPx = 130;
constexpr double kRightPx = 84; // room for each rank's peak memory
constexpr double kTopPx = 56;
constexpr double kRowPx = 18;
constexpr double kRankGapPx = 8;
constexpr double kAxisPx = 36;

bool is_compute(Category c) {
  return c == Category::forward || c == Category::backward || c == Category::recompute;
}

std::string bar_colour(const Event& e) {
  return is_compute(e.category) ? micro_batch_colour(e.micro_batch, e.category)
                                : category_colour(e.category);
}

std::string event_tooltip(const Event& e) {
  std::string t = fmt::format("rank {} · {} · {}", e.rank, category_name(e.category), e.name);
  if (e.micro_batch >= 0) {
    t += fmt::format(" · micro-batch {}", e.micro_batch);
  }
  t += fmt::format("\n{} → {} ({})", format_seconds(e.start_s), format_seconds(e.end_s),
                   format_seconds(e.duration_s()));
  if (e.flops > 0) {
    t += fmt::format(" · {} FLOP", format_count(e.flops));
  }
  if (e.bytes > 0) {
    t += fmt::format(" · {}", format_bytes(e.bytes));
  }
  return t;
}

// Ranks to draw: all when few, else `max` spread evenly, always the first and the last.
std::vector<int> ranks_to_draw(const std::set<int>& present, int max) {
  std::vector<int> all(present.begin(), present.end());
  if (static_cast<int>(all.size()) <= max || max < 2) {
    return all;
  }
  std::vector<int> out;
  for (int i = 0; i < max; ++i) {
    const auto idx = static_cast<std::size_t>(
        std::lround(static_cast<double>(i) * static_cast<double>(all.size() - 1) / (max - 1)));
    if (out.empty() || out.back() != all[idx]) {
      out.push_back(all[idx]);
    }
  }
  return out;
}

void draw_legend(SvgWriter& svg, double y) {
  double x = kLeftPx;
  auto item = [&](const std::string& fill, const std::string& label) {
    svg.rect(x, y - 9, 12, 10, fill);
    svg.text(x + 16, y, label, 10);
    x += 22 + 6.2 * static_cast<double>(label.size());
  };
  item(micro_batch_colour(0, Category::forward), "forward (hue: micro-batch)");
  item(micro_batch_colour(0, Category::backward), "backward");
  item(micro_batch_colour(0, Category::recompute), "recompute");
  item(category_colour(Category::tp_comm), "TP comm");
  item(category_colour(Category::pp_comm), "PP comm");
  item(category_colour(Category::dp_comm), "DP comm");
  item(category_colour(Category::optimizer), "optimizer");
}

} // namespace

std::string timeline_svg(const Timeline& timeline, const TimelineSvgOptions& options) {
  // Rows: (rank, stream) pairs that have events, for the ranks drawn.
  std::set<int> present;
  double t0 = 0;
  double t1 = 0;
  bool first = true;
  for (const Event& e : timeline.events) {
    present.insert(e.rank);
    t0 = first ? e.start_s : std::min(t0, e.start_s);
    t1 = first ? e.end_s : std::max(t1, e.end_s);
    first = false;
  }
  const std::vector<int> ranks = ranks_to_draw(present, options.max_ranks);
  std::map<std::pair<int, Stream>, std::vector<const Event*>> rows;
  const std::set<int> drawn(ranks.begin(), ranks.end());
  for (const Event& e : timeline.events) {
    if (drawn.contains(e.rank)) {
      rows[{e.rank, e.stream}].push_back(&e);
    }
  }
  const double span = std::max(t1 - t0, 1e-12);
  const double plot_w = std::max(options.width_px - kLeftPx - kRightPx, 100.0);
  const double scale = plot_w / span;
  double height = kTopPx + kAxisPx + static_cast<double>(rows.size()) * kRowPx +
                  static_cast<double>(ranks.size()) * kRankGapPx;
  SvgWriter svg(options.width_px, height);
  svg.text(kLeftPx, 18, options.title.empty() ? std::string("timeline") : options.title, 14,
           "start", R"(font-weight="bold")");
  std::string subtitle =
      fmt::format("{} events, makespan {}", timeline.events.size(), format_seconds(span));
  if (ranks.size() < present.size()) {
    subtitle += fmt::format("; {} of {} ranks shown", ranks.size(), present.size());
  }
  svg.text(kLeftPx, 33, subtitle, 10, "start", R"(fill="#555555")");
  draw_legend(svg, 50);

  double y = kTopPx + 4;
  int previous_rank = -1;
  for (const auto& [key, events] : rows) {
    const auto& [rank, stream] = key;
    if (rank != previous_rank) {
      y += kRankGapPx;
      previous_rank = rank;
      if (static_cast<std::size_t>(rank) < timeline.peak_memory_bytes.size()) {
        svg.text(kLeftPx + plot_w + 6, y + kRowPx * 0.7,
                 "peak " + format_bytes(static_cast<double>(
                               timeline.peak_memory_bytes[static_cast<std::size_t>(rank)])),
                 10, "start", R"(fill="#555555")");
      }
    }
    svg.text(kLeftPx - 6, y + kRowPx * 0.7, fmt::format("rank {} {}", rank, stream_name(stream)),
             10, "end");
    svg.rect(kLeftPx, y, plot_w, kRowPx - 2, "#f7f7f7");
    std::vector<const Event*> sorted = events;
    std::sort(sorted.begin(), sorted.end(),
              [](const Event* a, const Event* b) { return a->start_s < b->start_s; });
    // Merge runs of narrow bars of one colour.
    std::size_t i = 0;
    while (i < sorted.size()) {
      const Event& e = *sorted[i];
      const std::string fill = bar_colour(e);
      double x0 = kLeftPx + (e.start_s - t0) * scale;
      double x1 = kLeftPx + (e.end_s - t0) * scale;
      std::size_t j = i + 1;
      while (x1 - x0 < options.merge_below_px && j < sorted.size()) {
        const Event& n = *sorted[j];
        const double nx0 = kLeftPx + (n.start_s - t0) * scale;
        if (bar_colour(n) != fill || nx0 - x1 > options.merge_below_px) {
          break;
        }
        x1 = std::max(x1, kLeftPx + (n.end_s - t0) * scale);
        ++j;
      }
      const std::string tooltip =
          j == i + 1 ? event_tooltip(e)
                     : fmt::format("{} events from \"{}\" to \"{}\"\n{} → {}", j - i, e.name,
                                   sorted[j - 1]->name, format_seconds(e.start_s),
                                   format_seconds(sorted[j - 1]->end_s));
      const double w = std::max(x1 - x0, 0.3);
      svg.rect(x0, y, w, kRowPx - 2, fill, tooltip, R"(class="bar")");
      if (j == i + 1 && e.micro_batch >= 0 && is_compute(e.category) && w >= 14) {
        svg.text(x0 + w / 2, y + kRowPx * 0.65, std::to_string(e.micro_batch), 9, "middle",
                 R"(pointer-events="none")");
      }
      i = j;
    }
    y += kRowPx;
  }
  // Time axis.
  const double axis_y = y + 6;
  svg.line(kLeftPx, axis_y, kLeftPx + plot_w, axis_y, "#333333");
  const double step = axis_tick_step(span, 10);
  for (double t = 0; t <= span * (1 + 1e-9); t += step) {
    const double x = kLeftPx + t * scale;
    svg.line(x, axis_y, x, axis_y + 4, "#333333");
    svg.text(x, axis_y + 16, format_seconds(t), 9, "middle");
  }
  return svg.finish();
}

} // namespace parallax::viz
