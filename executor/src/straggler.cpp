#include "parallax/executor/straggler.hpp"

#include "parallax/executor/model.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace parallax {

namespace {

double median_of(std::vector<double> v) {
  const std::size_t n = v.size();
  std::sort(v.begin(), v.end());
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

} // namespace

std::vector<int> find_stragglers(std::span<const double> busy_s, double threshold) {
  std::vector<int> out;
  if (busy_s.size() < 2) {
    return out;
  }
  const double median = median_of({busy_s.begin(), busy_s.end()});
  for (std::size_t r = 0; r < busy_s.size(); ++r) {
    if (busy_s[r] > (1.0 + threshold) * median) {
      out.push_back(static_cast<int>(r));
    }
  }
  return out;
}

void StragglerMonitor::begin_step() {
  start_ = steady_seconds();
  blocked_ = CommRequest::blocked_seconds();
}

std::vector<int> StragglerMonitor::end_step() {
  const double busy = (steady_seconds() - start_) - (CommRequest::blocked_seconds() - blocked_);
  const auto n = static_cast<std::size_t>(world_.size());
  std::vector<double> all(n, 0.0);
  all[static_cast<std::size_t>(world_.rank())] = busy;
  world_.all_reduce_sum(std::span<double>(all));
  flagged_.resize(n, 0);
  worst_ratio_.resize(n, 0.0);
  ++steps_;
  const std::vector<int> slow = find_stragglers(all);
  const double median = median_of(all);
  for (const int r : slow) {
    const auto i = static_cast<std::size_t>(r);
    ++flagged_[i];
    worst_ratio_[i] = std::max(worst_ratio_[i], median > 0 ? all[i] / median : 0.0);
  }
  return slow;
}

std::string StragglerMonitor::summary() const {
  std::string out;
  for (std::size_t r = 0; r < flagged_.size(); ++r) {
    if (flagged_[r] > 0) {
      out += fmt::format("{}rank {} flagged in {} of {} steps (busy up to {:.2f}x the median)",
                         out.empty() ? "" : "; ", r, flagged_[r], steps_, worst_ratio_[r]);
    }
  }
  return out;
}

} // namespace parallax
