// Colours shared by every picture, so a stage or a category looks the same in the layer graph,
// the device mesh, the timeline and the report.
#pragma once

#include "parallax/core/timeline.hpp"

#include <string>

namespace parallax::viz {

// Fill colour of pipeline stage `stage` (a 12-colour cycle, light enough for black text).
std::string stage_colour(int stage);
// Fill colour of a micro-batch's compute (a 10-hue cycle); backward is darker than forward.
std::string micro_batch_colour(int micro_batch, Category category);
// Fill colour of the timeline categories without a micro-batch (communication, optimizer).
std::string category_colour(Category category);

// Human-readable byte counts ("12.5 MiB") and durations ("3.21 ms").
std::string format_bytes(double bytes);
std::string format_seconds(double seconds);
std::string format_count(double count); // 1.2 k, 3.4 M, 5.6 G

// A round axis step (1, 2, 2.5 or 5 times a power of ten) giving about `ticks` ticks over `span`.
double axis_tick_step(double span, int ticks);

} // namespace parallax::viz
