// Timeline: what happened (measured) or would happen (simulated) during one training iteration.
// Both the simulator and the executor produce it, so comparing them is a diff of two values.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace parallax {

enum class Stream { compute, tp_comm, pp_comm, dp_comm };
enum class Category { forward, backward, recompute, optimizer, tp_comm, pp_comm, dp_comm, idle };

inline constexpr std::array<std::string_view, 4> kStreamNames = {"compute", "tp-comm", "pp-comm",
                                                                 "dp-comm"};
inline constexpr std::array<std::string_view, 8> kCategoryNames = {
    "forward", "backward", "recompute", "optimizer", "tp_comm", "pp_comm", "dp_comm", "idle"};

std::string_view stream_name(Stream s);
std::string_view category_name(Category c);

struct Event {
  int rank = 0;
  Stream stream = Stream::compute;
  Category category = Category::forward;
  std::string name;     // e.g. "block3.mlp.up" or "allreduce grads bucket 2"
  int layer = -1;       // partition unit (transformer block), -1 when not tied to one
  int micro_batch = -1; // -1 when not tied to one
  double start_s = 0;
  double end_s = 0;
  double flops = 0;
  double bytes = 0;
  double duration_s() const { return end_s - start_s; }
  bool operator==(const Event&) const = default;
};

struct Timeline {
  std::vector<Event> events;
  std::vector<std::int64_t> peak_memory_bytes; // per rank

  double makespan_s() const;
  // Sorts events by (rank, stream, start, name) so output is deterministic.
  void sort();
  bool operator==(const Timeline&) const = default;
};

// The time one op took on one rank, as simulated and measured timelines both name ops (core/
// step_program): the union of the spans of its events, less the part its own tensor-parallel
// collectives ("<op> tp", reported as their own op) overlap — so a compute op measured with its
// TP collectives inside and one simulated without them read alike.
struct OpTime {
  int rank = 0;
  std::string name;
  Category category = Category::forward;
  double seconds = 0;
  double start_s = 0; // its first event's start (for ordering)
};

// Every op of `t` on `ranks` (all ranks when empty), by rank then first start.
std::vector<OpTime> timeline_op_times(const Timeline& t, const std::vector<int>& ranks = {});

} // namespace parallax
