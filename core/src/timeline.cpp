#include "parallax/core/timeline.hpp"

#include <algorithm>
#include <array>
#include <tuple>

namespace parallax {

namespace {
constexpr std::array<std::string_view, 4> kStreamNames = {"compute", "tp-comm", "pp-comm",
                                                          "dp-comm"};
constexpr std::array<std::string_view, 8> kCategoryNames = {
    "forward", "backward", "recompute", "optimizer", "tp_comm", "pp_comm", "dp_comm", "idle"};
} // namespace

std::string_view stream_name(Stream s) { return kStreamNames.at(static_cast<int>(s)); }
std::string_view category_name(Category c) { return kCategoryNames.at(static_cast<int>(c)); }

double Timeline::makespan_s() const {
  double end = 0;
  for (const Event& e : events) {
    end = std::max(end, e.end_s);
  }
  return end;
}

void Timeline::sort() {
  std::stable_sort(events.begin(), events.end(), [](const Event& a, const Event& b) {
    return std::tie(a.rank, a.stream, a.start_s, a.name) <
           std::tie(b.rank, b.stream, b.start_s, b.name);
  });
}

} // namespace parallax
