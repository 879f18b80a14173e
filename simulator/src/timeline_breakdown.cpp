#include "parallax/simulator/timeline_breakdown.hpp"

#include "parallax/core/error.hpp"

#include <algorithm>
#include <cmath>
#include <map>

namespace parallax {

double spans_overlap_s(const Spans& a, const Spans& b) {
  double total = 0;
  std::size_t j = 0;
  for (const auto& [a0, a1] : a) {
    while (j < b.size() && b[j].second <= a0) {
      ++j;
    }
    for (std::size_t k = j; k < b.size() && b[k].first < a1; ++k) {
      total += std::max(0.0, std::min(a1, b[k].second) - std::max(a0, b[k].first));
    }
  }
  return total;
}

TimeBreakdown sweep_breakdown(const Spans& compute, const Spans& optimizer,
                              const std::array<Spans, 3>& comm, double end) {
  struct Edge {
    double t;
    int kind; // 0 compute, 1 optimizer, 2..4 tp/pp/dp
    int delta;
  };
  std::vector<Edge> edges;
  auto add = [&](const Spans& spans, int kind) {
    for (const auto& [a, b] : spans) {
      if (b > a) {
        edges.push_back({a, kind, +1});
        edges.push_back({b, kind, -1});
      }
    }
  };
  add(compute, 0);
  add(optimizer, 1);
  for (int k = 0; k < 3; ++k) {
    add(comm[static_cast<std::size_t>(k)], k + 2);
  }
  std::sort(edges.begin(), edges.end(), [](const Edge& x, const Edge& y) { return x.t < y.t; });
  std::array<int, 5> active{};
  TimeBreakdown b;
  double t = 0;
  auto charge = [&](double dt) {
    if (dt <= 0) {
      return;
    }
    // A tensor-parallel collective blocks the compute stream that issued it (the simulator
    // never overlaps them; the executor records them inside the layer's compute span).
    if (active[2] > 0) {
      b.tp_comm += dt;
    } else if (active[0] > 0) {
      b.compute += dt;
    } else if (active[1] > 0) {
      b.optimizer += dt;
    } else if (active[3] > 0) {
      b.pp_comm += dt;
    } else if (active[4] > 0) {
      b.dp_comm += dt;
    } else {
      b.bubble += dt;
    }
  };
  for (const Edge& e : edges) {
    charge(e.t - t);
    t = e.t;
    active[static_cast<std::size_t>(e.kind)] += e.delta;
  }
  charge(end - t);
  return b;
}

TimeBreakdown timeline_breakdown(const Timeline& timeline) {
  struct RankSpans {
    Spans compute, optimizer;
    std::array<Spans, 3> comm;
    double busy = 0;
  };
  std::map<int, RankSpans> ranks;
  double end = 0;
  for (const Event& e : timeline.events) {
    RankSpans& r = ranks[e.rank];
    const std::pair<double, double> span{e.start_s, e.end_s};
    end = std::max(end, e.end_s);
    switch (e.stream) {
    case Stream::compute:
      if (e.category == Category::optimizer) {
        r.optimizer.push_back(span);
      } else {
        r.compute.push_back(span);
        r.busy += e.end_s - e.start_s;
      }
      break;
    case Stream::tp_comm:
      r.comm[0].push_back(span);
      break;
    case Stream::pp_comm:
      r.comm[1].push_back(span);
      break;
    case Stream::dp_comm:
      r.comm[2].push_back(span);
      break;
    }
  }
  if (ranks.empty())
    return {};
  const RankSpans* critical = &ranks.begin()->second;
  for (const auto& [rank, r] : ranks) {
    if (r.busy > critical->busy + 1e-12)
      critical = &r;
  }
  return sweep_breakdown(critical->compute, critical->optimizer, critical->comm, end);
}

double mean_absolute_percentage_error(const std::vector<double>& measured,
                                      const std::vector<double>& predicted) {
  PARALLAX_CHECK(measured.size() == predicted.size() && !measured.empty(),
                 "MAPE needs two equally long, non-empty series");
  double sum = 0;
  for (std::size_t i = 0; i < measured.size(); ++i) {
    PARALLAX_CHECK(measured[i] > 0, "MAPE needs positive measurements");
    sum += std::abs(predicted[i] - measured[i]) / measured[i];
  }
  return sum / static_cast<double>(measured.size());
}

double kendall_tau(const std::vector<double>& a, const std::vector<double>& b) {
  PARALLAX_CHECK(a.size() == b.size() && a.size() >= 2,
                 "Kendall's tau needs two equally long series of at least two values");
  double concordant = 0;
  double discordant = 0;
  double ties_a = 0;
  double ties_b = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    for (std::size_t j = i + 1; j < a.size(); ++j) {
      const double da = a[i] - a[j];
      const double db = b[i] - b[j];
      if (da == 0 && db == 0)
        continue;
      if (da == 0) {
        ties_a += 1;
      } else if (db == 0) {
        ties_b += 1;
      } else if ((da > 0) == (db > 0)) {
        concordant += 1;
      } else {
        discordant += 1;
      }
    }
  }
  const double denom =
      std::sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b));
  return denom > 0 ? (concordant - discordant) / denom : 0.0;
}

} // namespace parallax
