#include "parallax/simulator/event_engine.hpp"

#include "parallax/core/error.hpp"

#include <algorithm>
#include <functional>

namespace parallax {

namespace {
// Relative slack when deciding that a flow has no bytes left (floating-point residue).
constexpr double kFlowEpsilon = 1e-9;
} // namespace

EventEngine::Id EventEngine::add_stream() {
  streams_.emplace_back();
  return static_cast<Id>(streams_.size() - 1);
}

EventEngine::Id EventEngine::add_link(double capacity_bytes_per_s, double flow_cap_bytes_per_s,
                                      double group_capacity_bytes_per_s) {
  PARALLAX_CHECK(capacity_bytes_per_s > 0 && flow_cap_bytes_per_s > 0 &&
                     group_capacity_bytes_per_s > 0,
                 "link capacity, flow cap and group capacity must be positive");
  Link l;
  l.capacity = capacity_bytes_per_s;
  l.flow_cap = flow_cap_bytes_per_s;
  l.group_capacity = group_capacity_bytes_per_s;
  links_.push_back(l);
  return static_cast<Id>(links_.size() - 1);
}

EventEngine::Id EventEngine::add_compute(Id stream, double duration_s, std::int32_t tag) {
  PARALLAX_CHECK(stream >= 0 && stream < static_cast<Id>(streams_.size()), "unknown stream");
  Task t;
  t.stream = stream;
  t.duration_s = std::max(0.0, duration_s);
  t.tag = tag;
  tasks_.push_back(t);
  const Id id = static_cast<Id>(tasks_.size() - 1);
  streams_[static_cast<std::size_t>(stream)].queue.push_back(id);
  return id;
}

EventEngine::Id EventEngine::add_flow(Id stream, Id link, double latency_s, double bytes,
                                      std::int32_t tag, double weight, std::int32_t group) {
  PARALLAX_CHECK(link >= 0 && link < static_cast<Id>(links_.size()), "unknown link");
  PARALLAX_CHECK(weight >= 1, "a flow stands for at least itself");
  const Id id = add_compute(stream, latency_s, tag);
  Task& t = tasks_[static_cast<std::size_t>(id)];
  t.link = link;
  t.bytes = std::max(0.0, bytes);
  t.weight = weight;
  t.group = group;
  return id;
}

EventEngine::Id EventEngine::add_barrier(std::int32_t tag) {
  Task t;
  t.tag = tag;
  tasks_.push_back(t);
  return static_cast<Id>(tasks_.size() - 1);
}

void EventEngine::reserve(std::size_t tasks, std::size_t dependencies) {
  tasks_.reserve(tasks);
  edges_.reserve(dependencies);
}

void EventEngine::add_dependency(Id before, Id after) {
  PARALLAX_CHECK(before >= 0 && after >= 0 && before < static_cast<Id>(tasks_.size()) &&
                     after < static_cast<Id>(tasks_.size()) && before != after,
                 "bad dependency");
  const Id edge = static_cast<Id>(edges_.size());
  edges_.push_back({after, -1});
  Task& b = tasks_[static_cast<std::size_t>(before)];
  if (b.last_successor < 0) {
    b.first_successor = edge;
  } else {
    edges_[static_cast<std::size_t>(b.last_successor)].next = edge;
  }
  b.last_successor = edge;
  tasks_[static_cast<std::size_t>(after)].pending += 1;
}

void EventEngine::push(double time, Kind kind, Id id, std::uint32_t version) {
  heap_.push_back({time, seq_++, kind, id, version});
  std::push_heap(heap_.begin(), heap_.end(), std::greater<>());
}

void EventEngine::try_start_stream(Id stream, double now) {
  Stream& s = streams_[static_cast<std::size_t>(stream)];
  if (s.busy || s.head >= s.queue.size()) {
    return;
  }
  const Id next = s.queue[s.head];
  if (tasks_[static_cast<std::size_t>(next)].pending == 0) {
    s.busy = true;
    start(next, now);
  }
}

void EventEngine::start(Id id, double now) {
  Task& t = tasks_[static_cast<std::size_t>(id)];
  t.start_s = now;
  if (t.stream == kNoStream) {
    finish(id, now);
    return;
  }
  push(now + t.duration_s, t.link == kNoLink ? Kind::task_end : Kind::flow_start, id);
}

void EventEngine::finish(Id id, double now) {
  Task& t = tasks_[static_cast<std::size_t>(id)];
  t.end_s = now;
  ++finished_;
  if (t.stream != kNoStream) {
    Stream& s = streams_[static_cast<std::size_t>(t.stream)];
    s.busy = false;
    s.head += 1;
  }
  for (Id e = t.first_successor; e >= 0; e = edges_[static_cast<std::size_t>(e)].next) {
    const Id succ = edges_[static_cast<std::size_t>(e)].to;
    Task& n = tasks_[static_cast<std::size_t>(succ)];
    if (--n.pending == 0) {
      if (n.stream == kNoStream) {
        start(succ, now);
      } else {
        try_start_stream(n.stream, now);
      }
    }
  }
  if (t.stream != kNoStream) {
    try_start_stream(t.stream, now);
  }
}

// The rate of every flow on the link (see the header): one level, or two when the link groups
// its flows.
void EventEngine::link_set_rates(Link& link) {
  if (link.flows.empty())
    return;
  if (link.group_capacity == std::numeric_limits<double>::infinity()) {
    const double rate = std::min(link.flow_cap, link.capacity / link.weight);
    for (Flow& f : link.flows)
      f.rate = rate;
    return;
  }
  // Each group's flows move alike: min(level, its own cap). Water-fill the link's capacity:
  // groups whose cap lies below the level get their cap, the rest share what is left.
  groups_.clear();
  for (const Flow& f : link.flows) {
    const Task& t = tasks_[static_cast<std::size_t>(f.task)];
    auto it = t.group < 0 ? groups_.end()
                          : std::find_if(groups_.begin(), groups_.end(),
                                         [&](const GroupShare& g) { return g.group == t.group; });
    if (it == groups_.end()) {
      groups_.push_back({t.group, 0, 0, 0, 0});
      it = groups_.end() - 1;
    }
    it->flows += 1;
    it->weight += t.weight;
  }
  for (GroupShare& g : groups_) {
    const double own =
        g.group < 0 ? std::numeric_limits<double>::infinity() : link.group_capacity / g.flows;
    g.cap = std::min(link.flow_cap, own);
  }
  std::sort(groups_.begin(), groups_.end(),
            [](const GroupShare& a, const GroupShare& b) { return a.cap < b.cap; });
  double left = link.capacity;
  double weight_left = link.weight;
  double level = std::numeric_limits<double>::infinity();
  for (GroupShare& g : groups_) {
    if (level == std::numeric_limits<double>::infinity() && g.cap * weight_left > left) {
      level = left / weight_left; // this group and every later one is held at the level
    }
    g.rate = std::min(g.cap, level);
    left -= g.rate * g.weight;
    weight_left -= g.weight;
  }
  for (Flow& f : link.flows) {
    const Task& t = tasks_[static_cast<std::size_t>(f.task)];
    if (t.group < 0) {
      f.rate = std::min(link.flow_cap, level); // a group of its own, capped by the flow cap
      continue;
    }
    for (const GroupShare& g : groups_) {
      if (g.group == t.group) {
        f.rate = g.rate;
        break;
      }
    }
  }
}

void EventEngine::link_advance(Link& link, double now) {
  const double dt = now - link.last_update;
  for (Flow& f : link.flows) {
    f.remaining -= dt * f.rate;
  }
  link.last_update = now;
}

void EventEngine::link_schedule(Id id, double now) {
  Link& link = links_[static_cast<std::size_t>(id)];
  link.version += 1;
  if (link.flows.empty()) {
    return;
  }
  link_set_rates(link);
  double least = std::numeric_limits<double>::infinity();
  for (const Flow& f : link.flows) {
    least = std::min(least, std::max(0.0, f.remaining) / f.rate);
  }
  push(now + least, Kind::link_check, id, link.version);
}

double EventEngine::run() {
  for (std::size_t s = 0; s < streams_.size(); ++s) {
    try_start_stream(static_cast<Id>(s), 0.0);
  }
  for (std::size_t i = 0; i < tasks_.size(); ++i) {
    if (tasks_[i].stream == kNoStream && tasks_[i].pending == 0 && tasks_[i].start_s < 0) {
      start(static_cast<Id>(i), 0.0);
    }
  }
  double now = 0;
  while (!heap_.empty()) {
    std::pop_heap(heap_.begin(), heap_.end(), std::greater<>());
    const Event ev = heap_.back();
    heap_.pop_back();
    now = ev.time;
    ++events_;
    switch (ev.kind) {
    case Kind::task_end:
      finish(ev.id, now);
      break;
    case Kind::flow_start: {
      const Task& t = tasks_[static_cast<std::size_t>(ev.id)];
      if (t.bytes <= 0) {
        finish(ev.id, now);
        break;
      }
      Link& link = links_[static_cast<std::size_t>(t.link)];
      link_advance(link, now);
      link.flows.push_back({ev.id, t.bytes, 0.0});
      link.weight += t.weight;
      link_schedule(t.link, now);
      break;
    }
    case Kind::link_check: {
      Link& link = links_[static_cast<std::size_t>(ev.id)];
      if (ev.version != link.version) {
        break; // superseded by a later change on this link
      }
      link_advance(link, now);
      std::vector<Id>& done = done_; // finish() below never refills it: only link_check does
      done.clear();
      auto keep = std::remove_if(link.flows.begin(), link.flows.end(), [&](const Flow& f) {
        const Task& t = tasks_[static_cast<std::size_t>(f.task)];
        // Done when (almost) nothing is left, or when what is left would not move the clock.
        if (f.remaining <= kFlowEpsilon * t.bytes || now + f.remaining / f.rate <= now) {
          done.push_back(f.task);
          link.weight -= t.weight;
          return true;
        }
        return false;
      });
      link.flows.erase(keep, link.flows.end());
      if (link.flows.empty()) {
        link.weight = 0; // no residue from adding and removing weights
      }
      link_schedule(ev.id, now);
      for (Id task : done) {
        finish(task, now);
      }
      break;
    }
    }
  }
  PARALLAX_CHECK(finished_ == tasks_.size(),
                 "simulation stalled: a dependency cycle or an unreachable stream order");
  return now;
}

} // namespace parallax
