#include "parallax/core/timeline.hpp"

#include "parallax/core/enum_names.hpp"

#include <algorithm>
#include <array>
#include <tuple>

namespace parallax {

std::string_view stream_name(Stream s) { return enum_name(kStreamNames, s); }
std::string_view category_name(Category c) { return enum_name(kCategoryNames, c); }

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
