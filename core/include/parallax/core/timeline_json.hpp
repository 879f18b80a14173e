// Timeline ⇄ Chrome-trace JSON (opens in Perfetto and chrome://tracing): one process per rank,
// one thread per stream. Exact start/end seconds ride in each event's args so the round trip is
// exact; ts/dur (microseconds) are for viewers.
#pragma once

#include "parallax/core/json_reader.hpp"
#include "parallax/core/timeline.hpp"

namespace parallax {

Json timeline_to_chrome_trace(const Timeline& timeline);
Timeline timeline_from_chrome_trace(const Json& doc, const std::string& source);

} // namespace parallax
