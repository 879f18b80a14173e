// Straggler detection in `parallax train`: each step, every rank's busy time (the step's wall
// time, including anything run before it, less the time it spent blocked waiting on
// communication) is shared, and ranks busier than 1.1× the median are flagged: a slow GPU or
// host makes the others wait, so its busy time stands out while theirs does not.
#pragma once

#include "parallax/executor/comm.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace parallax {

// Ranks whose busy time exceeds (1 + threshold) × the median of `busy_s`, in rank order.
std::vector<int> find_stragglers(std::span<const double> busy_s, double threshold = 0.10);

class StragglerMonitor {
public:
  explicit StragglerMonitor(Communicator& world) : world_(world) {}
  void begin_step();
  // Collective over the world: the flagged ranks of the step begun last (on every rank).
  std::vector<int> end_step();
  // "rank 1 flagged in 5 of 5 steps (busy up to 3.10× the median)", one per flagged rank;
  // empty when none was.
  std::string summary() const;
  const std::vector<std::int64_t>& flagged_steps() const { return flagged_; }

private:
  Communicator& world_;
  double start_ = 0;
  double blocked_ = 0;
  std::int64_t steps_ = 0;
  std::vector<std::int64_t> flagged_; // per rank
  std::vector<double> worst_ratio_;   // per rank: busy / median at its worst flagged step
};

} // namespace parallax
