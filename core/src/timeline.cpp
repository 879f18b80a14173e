#include "parallax/core/timeline.hpp"

#include "parallax/core/enum_names.hpp"

#include <algorithm>
#include <array>
#include <map>
#include <tuple>
#include <utility>

namespace parallax {

std::string_view stream_name(Stream s) {
  return enum_name(kStreamNames, s);
}
std::string_view category_name(Category c) {
  return enum_name(kCategoryNames, c);
}

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

namespace {

using Spans = std::vector<std::pair<double, double>>;

// Sorted, disjoint spans covering the same time.
Spans merged(Spans s) {
  std::sort(s.begin(), s.end());
  Spans out;
  for (const auto& [a, b] : s) {
    if (!out.empty() && a <= out.back().second) {
      out.back().second = std::max(out.back().second, b);
    } else {
      out.emplace_back(a, b);
    }
  }
  return out;
}

double length(const Spans& s) {
  double t = 0;
  for (const auto& [a, b] : s)
    t += b - a;
  return t;
}

// Time covered by both (each sorted and disjoint).
double overlap(const Spans& x, const Spans& y) {
  double t = 0;
  std::size_t i = 0, j = 0;
  while (i < x.size() && j < y.size()) {
    t += std::max(0.0, std::min(x[i].second, y[j].second) - std::max(x[i].first, y[j].first));
    if (x[i].second < y[j].second)
      ++i;
    else
      ++j;
  }
  return t;
}

} // namespace

std::vector<OpTime> timeline_op_times(const Timeline& t, const std::vector<int>& ranks) {
  struct Group {
    Category category = Category::forward;
    Spans spans;
  };
  std::map<std::pair<int, std::string>, Group> groups;
  for (const Event& e : t.events) {
    if (!ranks.empty() && std::find(ranks.begin(), ranks.end(), e.rank) == ranks.end())
      continue;
    Group& g = groups[{e.rank, e.name}];
    g.category = e.category;
    g.spans.emplace_back(e.start_s, e.end_s);
  }
  for (auto& [key, g] : groups)
    g.spans = merged(std::move(g.spans));
  std::vector<OpTime> out;
  for (const auto& [key, g] : groups) {
    double seconds = length(g.spans);
    auto tp = groups.find({key.first, key.second + " tp"});
    if (tp != groups.end())
      seconds -= overlap(g.spans, tp->second.spans);
    out.push_back({.rank = key.first,
                   .name = key.second,
                   .category = g.category,
                   .seconds = seconds,
                   .start_s = g.spans.front().first});
  }
  std::sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) {
    return std::tie(a.rank, a.start_s, a.name) < std::tie(b.rank, b.start_s, b.name);
  });
  return out;
}

} // namespace parallax
