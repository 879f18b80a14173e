// A Timeline (simulated or measured) as an SVG Gantt chart: one row per rank and stream, compute
// coloured by micro-batch (forward light, backward dark, recomputation pale), communication and
// the optimizer by category, each bar with a tooltip. Micro-batch numbers are written on bars
// wide enough to hold them.
//
// Big timelines stay small: at most `max_ranks` ranks are drawn (spread evenly over the ranks
// present), and neighbouring bars of one colour narrower than `merge_below_px` merge into one.
#pragma once

#include "parallax/core/timeline.hpp"

#include <string>

namespace parallax::viz {

struct TimelineSvgOptions {
  std::string title;
  double width_px = 1200;
  int max_ranks = 16;
  double merge_below_px = 0.75;
};

std::string timeline_svg(const Timeline& timeline, const TimelineSvgOptions& options = {});

} // namespace parallax::viz
