#include "parallax/core/timeline_json.hpp"

#include "parallax/core/enum_names.hpp"

#include <fmt/format.h>

#include <array>
#include <set>

namespace parallax {

Json timeline_to_chrome_trace(const Timeline& t) {
  Json events = Json::array();
  // One process per rank with events (a simulation reduced by symmetry has one per stage); every
  // rank's peak memory stays in otherData.
  std::set<int> ranks;
  for (const Event& e : t.events) {
    ranks.insert(e.rank);
  }
  if (t.events.empty()) {
    for (std::size_t r = 0; r < t.peak_memory_bytes.size(); ++r) {
      ranks.insert(static_cast<int>(r));
    }
  }
  for (int rank : ranks) {
    events.push_back({{"name", "process_name"},
                      {"ph", "M"},
                      {"pid", rank},
                      {"args", {{"name", fmt::format("rank {}", rank)}}}});
    if (static_cast<std::size_t>(rank) < t.peak_memory_bytes.size()) {
      // A counter track: Perfetto draws the rank's peak memory above its streams.
      events.push_back(
          {{"name", "peak memory"},
           {"ph", "C"},
           {"pid", rank},
           {"ts", 0},
           {"args",
            {{"GiB", static_cast<double>(t.peak_memory_bytes[static_cast<std::size_t>(rank)]) /
                         (1024.0 * 1024.0 * 1024.0)}}}});
    }
    for (std::size_t s = 0; s < kStreamNames.size(); ++s) {
      events.push_back({{"name", "thread_name"},
                        {"ph", "M"},
                        {"pid", rank},
                        {"tid", s},
                        {"args", {{"name", std::string(kStreamNames[s])}}}});
    }
  }
  for (const Event& e : t.events) {
    events.push_back({{"name", e.name},
                      {"cat", std::string(category_name(e.category))},
                      {"ph", "X"},
                      {"pid", e.rank},
                      {"tid", static_cast<int>(e.stream)},
                      {"ts", e.start_s * 1e6},
                      {"dur", (e.end_s - e.start_s) * 1e6},
                      {"args",
                       {{"stream", std::string(stream_name(e.stream))},
                        {"layer", e.layer},
                        {"micro_batch", e.micro_batch},
                        {"start_s", e.start_s},
                        {"end_s", e.end_s},
                        {"flops", e.flops},
                        {"bytes", e.bytes}}}});
  }
  return {{"traceEvents", events},
          {"displayTimeUnit", "ms"},
          {"otherData", {{"peak_memory_bytes", t.peak_memory_bytes}}}};
}

Timeline timeline_from_chrome_trace(const Json& doc, const std::string& source) {
  JsonReader root(doc, source);
  JsonReader list = root.array("traceEvents");
  Timeline t;
  for (std::size_t i = 0; i < list.array_size(); ++i) {
    JsonReader e = list.element(i);
    if (e.string("ph") != "X") {
      continue;
    }
    JsonReader args = e.child("args");
    Event ev;
    ev.rank = static_cast<int>(e.integer("pid", 0, 1 << 24));
    ev.name = e.string("name");
    ev.category = *enum_from_name<Category>(kCategoryNames, e.choice("cat", kCategoryNames));
    ev.stream = *enum_from_name<Stream>(kStreamNames, args.choice("stream", kStreamNames));
    ev.layer = static_cast<int>(args.integer("layer", -1, 1 << 24));
    ev.micro_batch = static_cast<int>(args.integer("micro_batch", -1, 1 << 30));
    ev.start_s = args.number("start_s");
    ev.end_s = args.number("end_s");
    ev.flops = args.number("flops");
    ev.bytes = args.number("bytes");
    t.events.push_back(std::move(ev));
  }
  if (root.has("otherData")) {
    JsonReader other = root.child("otherData");
    if (other.has("peak_memory_bytes")) {
      JsonReader peaks = other.array("peak_memory_bytes");
      for (std::size_t i = 0; i < peaks.array_size(); ++i) {
        const Json& v = peaks.value()[i];
        if (!v.is_number_integer()) {
          peaks.element(i).fail_here("an integer byte count", json_describe(v));
        }
        t.peak_memory_bytes.push_back(v.get<std::int64_t>());
      }
    }
  }
  return t;
}

} // namespace parallax
