// A discrete-event engine for task graphs on streams and shared links.
//
// Streams are in-order queues (like CUDA streams): a task starts when it reaches the head of its
// stream, the stream is idle and all its dependencies have finished. A task either takes a fixed
// time on its stream, or moves bytes over a link after a fixed latency. Links are shared fairly
// (processor sharing): n concurrent flows each get capacity / n, so two equal flows started
// together on one link take twice as long as one alone. A link may also cap each flow's rate
// (a node's uplink shared by its GPUs, each behind its own NIC): then every flow moves at
// min(cap, capacity / n). A flow of weight w stands for w identical flows (the replicas a
// simulation reduced by symmetry leaves out): it counts w times in n and moves at the rate of
// one of them. A link may also group its flows (a node's uplink, grouped by the GPU whose NIC
// each flow leaves through) and give every group a capacity of its own: then rates are max-min
// fair over both levels — the flows of one group share its capacity equally, and the groups
// share the link's capacity by water-filling (a group that needs less than the level gets what
// it needs). A weighted flow counts w times on the link but once in its group (its replicas
// leave through NICs of their own). Tasks without a stream are barriers: they finish as soon as
// their dependencies do.
//
//   EventEngine e;
//   auto s = e.add_stream();                 auto link = e.add_link(25e9);
//   auto a = e.add_compute(s, 1e-3);         auto b = e.add_flow(s, link, 5e-6, 1e6);
//   e.add_dependency(a, b);                  e.run();   // e.task(b).end_s == 1e-3 + 5e-6 + 4e-5
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace parallax {

class EventEngine {
public:
  using Id = std::int32_t;
  static constexpr Id kNoStream = -1;
  static constexpr Id kNoLink = -1;

  struct Task {
    Id stream = kNoStream;
    Id link = kNoLink;
    double duration_s = 0; // compute time, or the latency before a flow starts
    double bytes = 0;      // flow size on `link`
    double weight = 1;     // identical flows this one stands for
    double start_s = -1;
    double end_s = -1;
    std::int32_t pending = 0; // unfinished dependencies
    std::int32_t tag = -1;    // caller's index (e.g. into a table of event descriptions)
    std::int32_t group = -1;  // the flow's group on a grouped link (-1: a group of its own)
    Id first_successor = -1;  // into the engine's edge list, in the order they were added
    Id last_successor = -1;
  };

  Id add_stream();
  Id add_link(double capacity_bytes_per_s,
              double flow_cap_bytes_per_s = std::numeric_limits<double>::infinity(),
              double group_capacity_bytes_per_s = std::numeric_limits<double>::infinity());
  Id add_compute(Id stream, double duration_s, std::int32_t tag = -1);
  Id add_flow(Id stream, Id link, double latency_s, double bytes, std::int32_t tag = -1,
              double weight = 1.0, std::int32_t group = -1);
  Id add_barrier(std::int32_t tag = -1);
  // Optional: room for this many tasks and dependencies, to build without regrowing.
  void reserve(std::size_t tasks, std::size_t dependencies);
  // `after` starts only once `before` has finished.
  void add_dependency(Id before, Id after);

  // Runs to completion; returns the makespan. Throws CheckError if tasks remain unfinished
  // (a dependency cycle or a task queued behind one that can never start).
  double run();

  const Task& task(Id id) const { return tasks_[static_cast<std::size_t>(id)]; }
  std::size_t num_tasks() const { return tasks_.size(); }
  std::int64_t events_processed() const { return events_; }

private:
  struct Edge {
    Id to;
    Id next; // the next successor of the same task, or -1
  };
  struct Stream {
    std::vector<Id> queue;
    std::size_t head = 0;
    bool busy = false;
  };
  struct Flow {
    Id task;
    double remaining;
    double rate = 0; // bytes per second, set by link_set_rates
  };
  struct Link {
    double capacity = 0;
    double flow_cap = 0;
    double group_capacity = std::numeric_limits<double>::infinity();
    double weight = 0; // of the flows on the link
    double last_update = 0;
    std::uint32_t version = 0;
    std::vector<Flow> flows;
  };
  enum class Kind : std::uint8_t { task_end, flow_start, link_check };
  struct Event {
    double time;
    std::uint64_t seq;
    Kind kind;
    Id id;
    std::uint32_t version;
    bool operator>(const Event& o) const { return time != o.time ? time > o.time : seq > o.seq; }
  };

  void push(double time, Kind kind, Id id, std::uint32_t version = 0);
  void try_start_stream(Id stream, double now);
  void start(Id task, double now);
  void finish(Id task, double now);
  void link_set_rates(Link& link);
  void link_advance(Link& link, double now);
  void link_schedule(Id link, double now);

  std::vector<Task> tasks_;
  std::vector<Edge> edges_;
  std::vector<Stream> streams_;
  std::vector<Link> links_;
  std::vector<Event> heap_;
  std::vector<Id> done_; // scratch: the flows of one link finishing at one instant
  struct GroupShare {
    std::int32_t group;
    double flows = 0;  // flows in the group (each counts once against its capacity)
    double weight = 0; // their weight on the link
    double cap = 0;    // the most each of its flows can move: min(flow cap, capacity / flows)
    double rate = 0;
  };
  std::vector<GroupShare> groups_; // scratch for link_set_rates
  std::uint64_t seq_ = 0;
  std::int64_t events_ = 0;
  std::size_t finished_ = 0;
};

} // namespace parallax
