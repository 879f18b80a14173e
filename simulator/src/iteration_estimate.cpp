// Reads the simulated step back from the engine: the estimate (step time, breakdown on the
// critical rank, compute slowdown under overlapped communication, memory over the schedule's
// live activations) and the timeline.
#include "iteration_builder.hpp"

#include "parallax/simulator/collectives.hpp"
#include "parallax/simulator/compute_model.hpp"
#include "parallax/simulator/timeline_breakdown.hpp"

#include <algorithm>
#include <array>
#include <map>

namespace parallax::detail {

PlanEstimate IterationBuilder::estimate_from(const std::vector<RankSim>& ranks,
                                             std::vector<double>& stage_peaks) const {
  PlanEstimate e;
  e.plan = plan_;
  e.stack = model_.stack().name;
  e.plan.stages = stages_;
  double makespan = 0;
  for (std::size_t i = 0; i < engine_.num_tasks(); ++i) {
    makespan = std::max(makespan, engine_.task(static_cast<Id>(i)).end_s);
  }
  e.iteration_time_s = makespan;
  // Breakdown on the rank that is busiest on compute (the critical pipeline stage).
  const int n_ranks = static_cast<int>(ranks.size());
  std::vector<std::vector<std::pair<double, double>>> compute(n_ranks), optimizer(n_ranks);
  std::vector<std::array<std::vector<std::pair<double, double>>, 3>> comm(n_ranks);
  std::map<int, int> slot;
  for (int i = 0; i < n_ranks; ++i) {
    slot[ranks[static_cast<std::size_t>(i)].rank] = i;
  }
  for (std::size_t i = 0; i < engine_.num_tasks(); ++i) {
    const auto& task = engine_.task(static_cast<Id>(i));
    if (task.tag < 0) {
      continue;
    }
    const TaskInfo& info = info_[static_cast<std::size_t>(task.tag)];
    const int s = slot.at(info.rank);
    const std::pair<double, double> span{task.start_s, task.end_s};
    switch (info.stream) {
    case Stream::compute:
      (info.category == Category::optimizer ? optimizer : compute)[static_cast<std::size_t>(s)]
          .push_back(span);
      break;
    case Stream::tp_comm:
      comm[static_cast<std::size_t>(s)][0].push_back(span);
      break;
    case Stream::pp_comm:
      comm[static_cast<std::size_t>(s)][1].push_back(span);
      break;
    case Stream::dp_comm:
      comm[static_cast<std::size_t>(s)][2].push_back(span);
      break;
    }
  }
  int critical = 0;
  double busiest = -1;
  for (int i = 0; i < n_ranks; ++i) {
    double busy = 0;
    for (const auto& [a, b] : compute[static_cast<std::size_t>(i)]) {
      busy += b - a;
    }
    if (busy > busiest + 1e-12) {
      busiest = busy;
      critical = i;
    }
  }
  // Compute overlapped by data-parallel collectives runs slower (NCCL kernels take SMs and
  // memory bandwidth): each rank's step grows by the stack's slowdown times its overlapped
  // compute time, and the slowest rank sets the iteration. The engine's task times stay those
  // without interference, so the recorded timeline shows the schedule, not the slowdown.
  double interference = 0;
  if (device_overlaps_communication(cluster_.device)) {
    const double slowdown = model_.stack().overlap_compute_slowdown;
    double latest = makespan;
    for (int i = 0; i < n_ranks; ++i) {
      const auto& busy = compute[static_cast<std::size_t>(i)];
      const auto& dp = comm[static_cast<std::size_t>(i)][2];
      double end = 0;
      for (const auto& span : busy) {
        end = std::max(end, span.second);
      }
      for (const auto& span : optimizer[static_cast<std::size_t>(i)]) {
        end = std::max(end, span.second);
      }
      latest = std::max(latest, end + slowdown * spans_overlap_s(busy, dp));
    }
    interference = latest - makespan;
    makespan = latest;
    e.iteration_time_s = makespan;
  }
  e.breakdown = sweep_breakdown(compute[static_cast<std::size_t>(critical)],
                                optimizer[static_cast<std::size_t>(critical)],
                                comm[static_cast<std::size_t>(critical)], makespan - interference);
  e.breakdown.dp_comm += interference;
  if (plan_.async_ps()) {
    // The simulated step is the compute alone; the round trip of the gradients to the servers
    // and back sets the pace only when k steps of compute cannot hide it.
    const AsyncServerStep a = async_server_step(
        makespan, model_.server_round_trip_s(plan_, loads_.front()), plan_.max_staleness);
    e.breakdown.dp_comm += a.step_s - makespan;
    makespan = a.step_s;
    e.iteration_time_s = makespan;
    e.staleness = a.staleness;
  }
  std::array<std::pair<double, const char*>, 6> parts = {{{e.breakdown.compute, "compute"},
                                                          {e.breakdown.tp_comm, "tp_comm"},
                                                          {e.breakdown.pp_comm, "pp_comm"},
                                                          {e.breakdown.dp_comm, "dp_comm"},
                                                          {e.breakdown.bubble, "bubble"},
                                                          {e.breakdown.optimizer, "optimizer"}}};
  e.bottleneck = std::max_element(parts.begin(), parts.end())->second;

  const GraphInfo& g = model_.graph().info();
  const double tokens = static_cast<double>(plan_.global_batch_size * g.seq_length);
  e.tokens_per_s = tokens / makespan;
  const auto sequences = static_cast<double>(plan_.global_batch_size);
  e.tflops_per_gpu = model_flops_utilization(model_.model_flops_per_sequence(), sequences, makespan,
                                             plan_.world_size(), 1e12);
  e.mfu = model_flops_utilization(model_.model_flops_per_sequence(), sequences, makespan,
                                  plan_.world_size(), cluster_.mean_peak_flops(plan_.precision));

  // Memory: the analytic static state plus the activations the simulated schedule kept alive.
  stage_peaks.assign(static_cast<std::size_t>(plan_.pp), 0.0);
  const auto analytic = model_.memory_per_stage(plan_);
  std::vector<double> chunk_act(stages_.size(), 0.0);
  for (std::size_t c = 0; c < stages_.size(); ++c) {
    for (int u = stages_[c].first; u < stages_[c].second; ++u) {
      const UnitCost& uc = units_[static_cast<std::size_t>(u)];
      chunk_act[c] += uc.kept_act_bytes(plan_.recompute);
    }
  }
  for (const RankSim& r : ranks) {
    std::vector<std::pair<double, double>> changes;
    for (std::size_t i = 0; i < r.op_ends.size(); ++i) {
      const double act = chunk_act[static_cast<std::size_t>(r.op_chunks[i])];
      changes.emplace_back(engine_.task(r.op_ends[i].first).end_s,
                           r.op_ends[i].second ? act : -act);
    }
    std::stable_sort(changes.begin(), changes.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first < b.first : a.second < b.second;
    });
    double live = 0;
    double peak = 0;
    for (const auto& [t, delta] : changes) {
      live += delta;
      peak = std::max(peak, live);
    }
    const MemoryBreakdown& a = analytic[static_cast<std::size_t>(r.pp_rank)];
    MemoryBreakdown m = a;
    const CostModel::RankLoad& load = loads_[static_cast<std::size_t>(r.pp_rank)];
    m.activations = peak + load.recompute_working_bytes() + load.act_transient;
    m.allocator =
        model_.allocator_slack_bytes({a.params, a.grads, a.optimizer, a.buffers}, m.activations);
    double& stage = stage_peaks[static_cast<std::size_t>(r.pp_rank)];
    stage = std::max(stage, m.total());
    if (m.total() > e.memory.total()) {
      e.memory = m;
    }
  }
  e.memory_capacity_bytes = model_.memory_capacity_bytes();
  e.fits = e.memory.total() <= e.memory_capacity_bytes;
  return e;
}

// Events named after their step-program op (the measured timeline uses the same names); a
// receive, which has no task, spans from the rank's previous task to its consumer's start.
Timeline IterationBuilder::timeline_from(const std::vector<RankSim>& ranks) const {
  Timeline t;
  t.events.reserve(engine_.num_tasks());
  for (std::size_t i = 0; i < engine_.num_tasks(); ++i) {
    const auto& task = engine_.task(static_cast<Id>(i));
    if (task.tag < 0) {
      continue;
    }
    const TaskInfo& info = info_[static_cast<std::size_t>(task.tag)];
    const StepOp& op =
        ranks[static_cast<std::size_t>(info.slot)].program.ops[static_cast<std::size_t>(info.op)];
    t.events.push_back({info.rank, info.stream, info.category,
                        info.tp_part ? op.name() + " tp" : op.name(), info.unit, info.micro_batch,
                        task.start_s, task.end_s, info.flops, info.bytes});
  }
  const double bytes = p2p_bytes(plan_, model_.graph());
  for (const RankSim& r : ranks) {
    for (const RankSim::Receive& rc : r.receives) {
      const StepOp& op = r.program.ops[static_cast<std::size_t>(rc.op)];
      const double end = engine_.task(rc.consumer).start_s;
      const double start = rc.before >= 0 ? std::min(end, engine_.task(rc.before).end_s) : 0.0;
      t.events.push_back({r.rank, Stream::pp_comm, Category::pp_comm, op.name(), op.unit,
                          op.micro_batch, start, end, 0, bytes});
    }
  }
  t.sort();
  return t;
}

} // namespace parallax::detail
