#include "parallax/planner/goodput.hpp"

#include "parallax/core/error.hpp"
#include "parallax/core/precision.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace parallax {

double young_interval_s(double checkpoint_s, double mtbf_s) {
  return std::sqrt(2.0 * checkpoint_s * mtbf_s);
}

double daly_interval_s(double checkpoint_s, double mtbf_s) {
  if (checkpoint_s >= 2.0 * mtbf_s) {
    return mtbf_s;
  }
  const double r = checkpoint_s / (2.0 * mtbf_s);
  return young_interval_s(checkpoint_s, mtbf_s) * (1.0 + std::sqrt(r) / 3.0 + r / 9.0) -
         checkpoint_s;
}

double checkpoint_efficiency(double interval_s, double checkpoint_s, double restart_s,
                             double mtbf_s) {
  PARALLAX_CHECK(interval_s > 0 && mtbf_s > 0, "checkpoint efficiency: positive times");
  const double period = interval_s + checkpoint_s;
  const double useful = interval_s / period * (1.0 - (restart_s + period / 2.0) / mtbf_s);
  return std::clamp(useful, 0.0, 1.0);
}

CheckpointCost checkpoint_cost(double params, const Plan& plan, const Cluster& cluster,
                               const Stack& stack, int gpus) {
  // Weights in their storage precision, plus AdamW's moments and (mixed precision) the fp32
  // master copy: what a resume needs.
  const bool mixed = precision_is_mixed(plan.precision);
  const double per_param = precision_storage_bytes(plan.precision) + (mixed ? 12.0 : 8.0);
  CheckpointCost c;
  c.bytes = params * per_param;
  const Storage& s = cluster.storage;
  const int dpn = std::max(1, cluster.node.devices_per_node);
  const double nodes = std::max(1.0, std::ceil(static_cast<double>(gpus) / dpn));
  const double writers = stack.checkpoint.sharded ? nodes : 1.0;
  const auto capped = [&](double per_node_gbps) {
    double bw = writers * per_node_gbps * 1e9;
    if (s.aggregate_gbps > 0) {
      bw = std::min(bw, s.aggregate_gbps * 1e9);
    }
    return bw;
  };
  c.write_s = c.bytes / capped(s.write_gbps_per_node);
  // Every node reads its shards back (a sharded load); one reader otherwise.
  c.load_s = c.bytes / capped(s.read_gbps_per_node);
  // Asynchronous: each device copies an equal share of the state to host memory (a fully
  // parallel save spreads replicated state over its replicas), then trains on.
  const double per_device = c.bytes / std::max(1, gpus);
  c.blocking_s = stack.checkpoint.async ? per_device / (s.host_copy_gbps * 1e9) : c.write_s;
  c.restart_s = s.restart_s + c.load_s;
  return c;
}

Goodput goodput_of(double params, const Plan& plan, const Cluster& cluster, const Stack& stack,
                   int gpus, double step_s, double tokens_per_s, double gpu_mtbf_hours) {
  PARALLAX_CHECK(gpu_mtbf_hours > 0 && step_s > 0, "goodput: positive MTBF and step time");
  Goodput g;
  g.checkpoint = checkpoint_cost(params, plan, cluster, stack, gpus);
  g.job_mtbf_s = gpu_mtbf_hours * 3600.0 / std::max(1, gpus);
  const CheckpointCost& c = g.checkpoint;
  // Daly's interval in whole steps; an asynchronous write must finish before the next starts.
  double interval = daly_interval_s(c.blocking_s, g.job_mtbf_s);
  if (stack.checkpoint.async) {
    interval = std::max(interval, c.write_s);
  }
  const double steps = std::max(1.0, std::round(interval / step_s));
  g.interval_s = steps * step_s;
  g.efficiency = checkpoint_efficiency(g.interval_s, c.blocking_s, c.restart_s, g.job_mtbf_s);
  g.goodput_tokens_per_s = tokens_per_s * g.efficiency;
  g.lost_per_failure_s = c.restart_s + (g.interval_s + c.blocking_s) / 2.0;
  return g;
}

std::string goodput_explain(const Goodput& g, double tokens_per_s) {
  const CheckpointCost& c = g.checkpoint;
  const double failures_per_day = 86400.0 / g.job_mtbf_s;
  return fmt::format(
      "  failures: the job fails every {:.2f} h ({:.1f} a day); its {:.1f} GiB checkpoint takes "
      "{:.1f} s to write ({:.1f} s stalls training) and {:.1f} s to load, every {:.0f} s "
      "(Daly's interval, whole steps); each failure loses {:.0f} s (restart {:.0f} s with the "
      "load, half an interval); goodput {:.0f} tokens/s, {:.1f}% of {:.0f}\n",
      g.job_mtbf_s / 3600.0, failures_per_day, c.bytes / (1 << 30), c.write_s, c.blocking_s,
      c.load_s, g.interval_s, g.lost_per_failure_s, c.restart_s, g.goodput_tokens_per_s,
      100.0 * g.efficiency, tokens_per_s);
}

} // namespace parallax
