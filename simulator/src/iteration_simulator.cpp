#include "parallax/simulator/iteration_simulator.hpp"

#include "parallax/simulator/compute_model.hpp"

#include "parallax/core/error.hpp"
#include "parallax/core/pipeline_schedule.hpp"
#include "parallax/simulator/collectives.hpp"
#include "parallax/simulator/event_engine.hpp"
#include "parallax/simulator/timeline_breakdown.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <unordered_map>

namespace parallax {

namespace {

using Id = EventEngine::Id;

// What a task means, for the timeline and the breakdown.
struct TaskInfo {
  int rank = 0;
  Stream stream = Stream::compute;
  Category category = Category::forward;
  int unit = -1;
  int micro_batch = -1;
  double flops = 0;
  double bytes = 0;
};

struct RankSim {
  int rank = 0; // global rank this simulated rank stands for
  int pp_rank = 0;
  int dp = 0;
  int tp = 0;
  Id compute = 0, tp_stream = 0, pp_stream = 0, dp_stream = 0;
  Id gather_stream = 0; // ZeRO-3 parameter all-gathers (FSDP runs them beside reductions)
  Id nvlink = 0;
  Id network = 0;            // the uplink of this rank's node, shared with the node's other ranks
  double network_weight = 1; // ranks on the node this rank's network flows stand for
  std::vector<Id> dp_tasks;  // gradient synchronisation the optimizer waits for
  std::vector<std::pair<int, int>>
      deferred_reductions;                  // (unit, micro-batch), stacks without overlap
  std::vector<std::pair<Id, bool>> op_ends; // last task of each schedule op, forward?
  std::vector<int> op_chunks;
};

// Collective instances in the unreduced simulation: members synchronise through a barrier.
struct GroupKey {
  int kind; // 0 TP, 1 DP
  int group;
  int sequence;
  auto operator<=>(const GroupKey&) const = default;
};

class IterationBuilder {
public:
  IterationBuilder(CostModel& model, const Plan& plan, const SimulationOptions& options)
      : model_(model), plan_(plan), options_(options), cluster_(model.cluster()),
        stages_(plan.stages.empty()
                    ? stages_even(model.graph().num_units(), plan.pp * plan.virtual_stages)
                    : plan.stages),
        units_(
            model.units({plan.tp, plan.sequence_parallel, plan.micro_batch_size, plan.precision})),
        w_bytes_(precision_storage_bytes(plan.precision)) {}

  SimulationResult run();

private:
  Id add_compute(RankSim& r, double duration, Category cat, int unit, int mb, double flops);
  Id add_comm(RankSim& r, Stream stream, Category cat, const CollectiveCost& cost, double bytes,
              int unit, int mb, bool gather = false);
  void chain(Id task);
  void record_group(int kind, int group, RankSim& r, Id trigger, Id task);
  void build_rank(RankSim& r);
  Id node_link(int node);
  double replicas_on_node(const RankSim& r) const;
  void forward_op(RankSim& r, const PipelineOp& op);
  void backward_op(RankSim& r, const PipelineOp& op);
  Id zero3_gather(RankSim& r, int unit, int mb);
  Id grad_reduction(RankSim& r, int unit, int mb);
  void flush_deferred_reductions(RankSim& r);
  void finish_rank(RankSim& r);
  void wire_groups();
  PlanEstimate estimate_from(const std::vector<RankSim>& ranks,
                             std::vector<double>& stage_peaks) const;
  Timeline timeline_from() const;

  CostModel& model_;
  const Plan& plan_;
  const SimulationOptions& options_;
  const Cluster& cluster_;
  std::vector<StageRange> stages_;
  const std::vector<UnitCost>& units_;
  double w_bytes_;
  EventEngine engine_;
  std::vector<TaskInfo> info_;
  Id prev_ = -1;                   // last task of the current rank's critical chain
  std::vector<Id> recent_compute_; // compute tasks of the current rank, for ZeRO-3 prefetch
  // Pipeline sends by (direction, chunk, micro-batch, dp, tp), packed into one index.
  std::int64_t send_key(bool forward, int chunk, int mb, int dp, int tp) const {
    const auto chunks = static_cast<std::int64_t>(stages_.size());
    return (((static_cast<std::int64_t>(forward) * chunks + chunk) * plan_.num_microbatches() +
             mb) *
                plan_.dp +
            dp) *
               plan_.tp +
           tp;
  }
  std::unordered_map<std::int64_t, Id> sends_;
  std::vector<std::pair<std::int64_t, Id>> receives_;
  std::map<GroupKey, std::vector<std::pair<Id, Id>>> groups_; // trigger, task
  std::unordered_map<int, Id> node_links_;
  std::map<std::pair<int, int>, int> group_sequence_;
};

Id IterationBuilder::add_compute(RankSim& r, double duration, Category cat, int unit, int mb,
                                 double flops) {
  const Id id = engine_.add_compute(r.compute, duration, static_cast<std::int32_t>(info_.size()));
  info_.push_back({r.rank, Stream::compute, cat, unit, mb, flops, 0});
  chain(id);
  return id;
}

Id IterationBuilder::add_comm(RankSim& r, Stream stream, Category cat, const CollectiveCost& cost,
                              double bytes, int unit, int mb, bool gather) {
  const Id link = cost.network ? r.network : r.nvlink;
  const double capacity =
      cost.network ? network_link_bandwidth(cluster_) : intra_link_bandwidth(cluster_);
  Id stream_id = gather                      ? r.gather_stream
                 : stream == Stream::tp_comm ? r.tp_stream
                 : stream == Stream::pp_comm ? r.pp_stream
                                             : r.dp_stream;
  if (stream == Stream::dp_comm && !device_overlaps_communication(cluster_.device)) {
    stream_id = r.compute; // the cores that compute also move the data (CPU ranks)
  }
  // On the uplink a flow is grouped by the GPU it leaves from: that GPU's flows share its NIC.
  const Id id = engine_.add_flow(
      stream_id, link, cost.latency_s, cost.transfer_s * capacity,
      static_cast<std::int32_t>(info_.size()), cost.network ? r.network_weight : 1.0,
      cost.network ? rank_device(r.rank, cluster_.node.devices_per_node).device : -1);
  info_.push_back({r.rank, stream, cat, unit, mb, 0, bytes});
  return id;
}

void IterationBuilder::chain(Id task) {
  if (prev_ >= 0) {
    engine_.add_dependency(prev_, task);
  }
  prev_ = task;
}

void IterationBuilder::record_group(int kind, int group, RankSim& r, Id trigger, Id task) {
  if (options_.symmetric) {
    return;
  }
  int& seq = group_sequence_[{kind, r.rank}];
  groups_[{kind, group, seq++}].emplace_back(trigger, task);
}

Id IterationBuilder::zero3_gather(RankSim& r, int unit, int mb) {
  const UnitCost& u = units_[static_cast<std::size_t>(unit)];
  const double bytes = u.params * w_bytes_;
  CollectiveCost cost =
      collective_cost(cluster_, Collective::all_gather, bytes, dp_span(plan_, cluster_));
  const Id ag = add_comm(r, Stream::dp_comm, Category::dp_comm, cost, bytes, unit, mb, true);
  // Prefetch one unit ahead: the gather may start once the compute before the previous one ended.
  const Id trigger = recent_compute_.size() >= 2 ? recent_compute_[recent_compute_.size() - 2] : -1;
  if (trigger >= 0) {
    engine_.add_dependency(trigger, ag);
  }
  record_group(1, rank_of(plan_, {0, r.pp_rank, r.tp}), r, trigger, ag);
  return ag;
}

void IterationBuilder::forward_op(RankSim& r, const PipelineOp& op) {
  const auto [first, last] = stages_[static_cast<std::size_t>(op.chunk)];
  const bool zero3 = plan_.zero_stage == 3 && plan_.dp > 1;
  for (int u = first; u < last; ++u) {
    const UnitCost& cost = units_[static_cast<std::size_t>(u)];
    const Id ag = zero3 ? zero3_gather(r, u, op.micro_batch) : -1;
    const Id c =
        add_compute(r, cost.fwd_s, Category::forward, u, op.micro_batch, cost.model_flops / 3.0);
    recent_compute_.push_back(c);
    if (ag >= 0) {
      engine_.add_dependency(ag, c);
    }
    if (u == first && op.chunk > 0) {
      receives_.emplace_back(send_key(true, op.chunk - 1, op.micro_batch, r.dp, r.tp), c);
    }
    if (plan_.tp > 1 && cost.tp_fwd_s > 0) {
      const Id t = add_comm(r, Stream::tp_comm, Category::tp_comm, {0.0, cost.tp_fwd_s, false}, 0,
                            u, op.micro_batch);
      chain(t);
      record_group(0, rank_of(plan_, {r.dp, r.pp_rank, 0}), r, c, t);
    }
  }
  if (op.chunk + 1 < static_cast<int>(stages_.size())) {
    const double bytes = p2p_bytes(plan_, model_.graph());
    const CollectiveCost cost =
        collective_cost(cluster_, Collective::send_recv, bytes, pp_hop_span(plan_, cluster_));
    const Id s =
        add_comm(r, Stream::pp_comm, Category::pp_comm, cost, bytes, last - 1, op.micro_batch);
    chain(s); // blocking send, as in Megatron-LM's schedules
    sends_[send_key(true, op.chunk, op.micro_batch, r.dp, r.tp)] = s;
  }
  r.op_ends.emplace_back(prev_, true);
  r.op_chunks.push_back(op.chunk);
}

void IterationBuilder::backward_op(RankSim& r, const PipelineOp& op) {
  const auto [first, last] = stages_[static_cast<std::size_t>(op.chunk)];
  // A stack that keeps the forward's gathered layers for the backward does not gather again.
  const bool zero3 =
      plan_.zero_stage == 3 && plan_.dp > 1 && model_.stack().sharding.reshard_after_forward;
  const bool last_mb = op.micro_batch == plan_.num_microbatches() - 1;
  const int dp_group = rank_of(plan_, {0, r.pp_rank, r.tp});
  for (int u = last - 1; u >= first; --u) {
    const UnitCost& cost = units_[static_cast<std::size_t>(u)];
    const Id ag = zero3 ? zero3_gather(r, u, op.micro_batch) : -1;
    Id start = -1;
    if (plan_.recompute == Recompute::full) {
      start = add_compute(r, cost.full_recompute_s, Category::recompute, u, op.micro_batch, 0);
      recent_compute_.push_back(start);
      if (plan_.tp > 1 && cost.full_recompute_tp_s > 0) {
        const Id t = add_comm(r, Stream::tp_comm, Category::tp_comm,
                              {0.0, cost.full_recompute_tp_s, false}, 0, u, op.micro_batch);
        chain(t);
        record_group(0, rank_of(plan_, {r.dp, r.pp_rank, 0}), r, start, t);
      }
    }
    const double extra = (plan_.recompute == Recompute::selective ? cost.selective_s : 0.0) +
                         model_.grad_accumulation_s(plan_, cost.params);
    const Id b = add_compute(r, cost.bwd_s + extra, Category::backward, u, op.micro_batch,
                             cost.model_flops * 2.0 / 3.0);
    recent_compute_.push_back(b);
    if (start < 0) {
      start = b;
    }
    if (ag >= 0) {
      engine_.add_dependency(ag, start);
    }
    if (u == last - 1 && op.chunk + 1 < static_cast<int>(stages_.size())) {
      receives_.emplace_back(send_key(false, op.chunk + 1, op.micro_batch, r.dp, r.tp), start);
    }
    Id done = b;
    if (plan_.tp > 1 && cost.tp_bwd_s > 0) {
      done = add_comm(r, Stream::tp_comm, Category::tp_comm, {0.0, cost.tp_bwd_s, false}, 0, u,
                      op.micro_batch);
      chain(done);
      record_group(0, rank_of(plan_, {r.dp, r.pp_rank, 0}), r, b, done);
    }
    // Gradient synchronisation of this unit's parameters, launched as its backward finishes
    // (or, on stacks that do not overlap it, after the backward pass).
    if (plan_.dp > 1 && cost.params > 0 && (plan_.zero_stage >= 2 || last_mb)) {
      if (plan_.overlap_grad_reduce) {
        const Id g = grad_reduction(r, u, op.micro_batch);
        engine_.add_dependency(b, g);
        record_group(1, dp_group, r, b, g);
      } else {
        r.deferred_reductions.emplace_back(u, op.micro_batch);
      }
    }
  }
  if (op.chunk > 0) {
    const double bytes = p2p_bytes(plan_, model_.graph());
    const CollectiveCost cost =
        collective_cost(cluster_, Collective::send_recv, bytes, pp_hop_span(plan_, cluster_));
    const Id s =
        add_comm(r, Stream::pp_comm, Category::pp_comm, cost, bytes, first, op.micro_batch);
    chain(s);
    sends_[send_key(false, op.chunk, op.micro_batch, r.dp, r.tp)] = s;
  }
  if (plan_.zero_stage >= 2) { // reduce-scattered after every micro-batch's backward
    flush_deferred_reductions(r);
  }
  r.op_ends.emplace_back(prev_, false);
  r.op_chunks.push_back(op.chunk);
}

Id IterationBuilder::grad_reduction(RankSim& r, int unit, int mb) {
  const double bytes =
      units_[static_cast<std::size_t>(unit)].params * grad_element_bytes(plan_, model_.stack());
  const Collective kind =
      plan_.zero_stage == 0 ? Collective::all_reduce : Collective::reduce_scatter;
  const CollectiveCost cc =
      collective_cost(cluster_, kind, bytes, dp_span(plan_, cluster_), plan_.grad_sync);
  const Id g = add_comm(r, Stream::dp_comm, Category::dp_comm, cc, bytes, unit, mb);
  r.dp_tasks.push_back(g);
  return g;
}

// Reductions of a stack that does not overlap them: after the backward, on the rank's critical
// chain, so the next compute waits for them.
void IterationBuilder::flush_deferred_reductions(RankSim& r) {
  const int dp_group = rank_of(plan_, {0, r.pp_rank, r.tp});
  for (const auto& [unit, mb] : r.deferred_reductions) {
    const Id trigger = prev_;
    const Id g = grad_reduction(r, unit, mb);
    chain(g);
    record_group(1, dp_group, r, trigger, g);
  }
  r.deferred_reductions.clear();
}

void IterationBuilder::finish_rank(RankSim& r) {
  flush_deferred_reductions(r);
  std::vector<StageRange> mine;
  for (int c = r.pp_rank; c < static_cast<int>(stages_.size()); c += plan_.pp) {
    mine.push_back(stages_[static_cast<std::size_t>(c)]);
  }
  const auto loads = model_.rank_loads(plan_, stages_);
  const CostModel::RankLoad& load = loads[static_cast<std::size_t>(r.pp_rank)];
  const Id opt =
      add_compute(r, model_.optimizer_time_s(plan_, load), Category::optimizer, -1, -1, 0);
  for (Id g : r.dp_tasks) {
    engine_.add_dependency(g, opt);
  }
  if (plan_.dp > 1 && (plan_.zero_stage == 1 || plan_.zero_stage == 2)) {
    const double bytes = load.params * w_bytes_;
    const CollectiveCost cc =
        collective_cost(cluster_, Collective::all_gather, bytes, dp_span(plan_, cluster_));
    const Id ag = add_comm(r, Stream::dp_comm, Category::dp_comm, cc, bytes, -1, -1);
    engine_.add_dependency(opt, ag);
    record_group(1, rank_of(plan_, {0, r.pp_rank, r.tp}), r, opt, ag);
  }
}

// A node's uplink: its GPUs' NICs together, divided by the fabric's oversubscription, with the
// flows grouped by GPU and each GPU's flows sharing one NIC. Flows from every rank on the node
// share it, whatever their stage, so one GPU sending alone is not slowed by an oversubscribed
// fabric while a node whose GPUs all send at once is, and two flows leaving one GPU together
// (a pipeline send beside a gradient reduction) split its NIC.
Id IterationBuilder::node_link(int node) {
  auto it = node_links_.find(node);
  if (it == node_links_.end()) {
    const double nic = network_link_bandwidth(cluster_); // per GPU, after oversubscription
    it = node_links_
             .emplace(node, engine_.add_link(cluster_.node.devices_per_node * nic,
                                             nic * cluster_.network.oversubscription,
                                             nic * cluster_.network.oversubscription))
             .first;
  }
  return it->second;
}

// In a simulation reduced by symmetry one rank stands for its stage's data- and tensor-parallel
// replicas, which run the same flows at the same times: those on its node load the uplink too.
double IterationBuilder::replicas_on_node(const RankSim& r) const {
  const int per_node = cluster_.node.devices_per_node;
  const int stage_size = plan_.tp * plan_.dp;
  const int stage_first = r.pp_rank * stage_size;
  const int node_first = (r.rank / per_node) * per_node;
  const int overlap =
      std::min(stage_first + stage_size, node_first + per_node) - std::max(stage_first, node_first);
  return std::max(1, overlap);
}

void IterationBuilder::build_rank(RankSim& r) {
  r.compute = engine_.add_stream();
  r.tp_stream = engine_.add_stream();
  r.pp_stream = engine_.add_stream();
  r.dp_stream = engine_.add_stream();
  r.gather_stream = engine_.add_stream();
  r.nvlink = engine_.add_link(intra_link_bandwidth(cluster_));
  r.network = node_link(rank_device(r.rank, cluster_.node.devices_per_node).node);
  r.network_weight = options_.symmetric ? replicas_on_node(r) : 1.0;
  prev_ = -1;
  recent_compute_.clear();
  for (const PipelineOp& op : pipeline_schedule(plan_, r.pp_rank)) {
    if (op.forward) {
      forward_op(r, op);
    } else {
      backward_op(r, op);
    }
  }
  finish_rank(r);
}

void IterationBuilder::wire_groups() {
  for (const auto& [key, task] : receives_) {
    auto it = sends_.find(key);
    PARALLAX_CHECK(it != sends_.end(), "a receive without its send");
    engine_.add_dependency(it->second, task);
  }
  for (const auto& [key, members] : groups_) {
    if (members.size() < 2) {
      continue;
    }
    const Id barrier = engine_.add_barrier();
    for (const auto& [trigger, task] : members) {
      if (trigger >= 0) {
        engine_.add_dependency(trigger, barrier);
      }
      engine_.add_dependency(barrier, task);
    }
  }
}

SimulationResult IterationBuilder::run() {
  std::vector<RankSim> ranks;
  for (int pp = 0; pp < plan_.pp; ++pp) {
    const int dps = options_.symmetric ? 1 : plan_.dp;
    const int tps = options_.symmetric ? 1 : plan_.tp;
    for (int d = 0; d < dps; ++d) {
      for (int t = 0; t < tps; ++t) {
        RankSim r;
        r.pp_rank = pp;
        r.dp = d;
        r.tp = t;
        r.rank = rank_of(plan_, {d, pp, t});
        ranks.push_back(r);
      }
    }
  }
  for (RankSim& r : ranks) {
    build_rank(r);
  }
  wire_groups();
  engine_.run();
  SimulationResult result;
  result.estimate = estimate_from(ranks, result.stage_peak_bytes);
  if (options_.record_timeline) {
    result.timeline = timeline_from();
    // Replicas of a stage (data- and tensor-parallel peers) hold the same memory.
    result.timeline.peak_memory_bytes.resize(static_cast<std::size_t>(plan_.world_size()));
    for (int rank = 0; rank < plan_.world_size(); ++rank) {
      result.timeline.peak_memory_bytes[static_cast<std::size_t>(rank)] = static_cast<std::int64_t>(
          result.stage_peak_bytes[static_cast<std::size_t>(rank_coords(plan_, rank).pp)]);
    }
  }
  result.events = engine_.events_processed();
  result.tasks = static_cast<std::int64_t>(engine_.num_tasks());
  result.simulated_ranks = static_cast<int>(ranks.size());
  return result;
}

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
  const double flops =
      static_cast<double>(plan_.global_batch_size) * model_.model_flops_per_sequence();
  e.tflops_per_gpu = flops / (makespan * plan_.world_size()) / 1e12;
  e.mfu = e.tflops_per_gpu * 1e12 / cluster_.peak_flops(plan_.precision);

  // Memory: the analytic static state plus the activations the simulated schedule kept alive.
  stage_peaks.assign(static_cast<std::size_t>(plan_.pp), 0.0);
  const auto analytic = model_.memory_per_stage(plan_);
  const auto loads = const_cast<CostModel&>(model_).rank_loads(plan_, stages_);
  std::vector<double> chunk_act(stages_.size(), 0.0);
  for (std::size_t c = 0; c < stages_.size(); ++c) {
    for (int u = stages_[c].first; u < stages_[c].second; ++u) {
      const UnitCost& uc = units_[static_cast<std::size_t>(u)];
      chunk_act[c] += plan_.recompute == Recompute::none        ? uc.act_bytes
                      : plan_.recompute == Recompute::selective ? uc.act_selective_bytes
                                                                : uc.act_full_bytes;
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
    const CostModel::RankLoad& load = loads[static_cast<std::size_t>(r.pp_rank)];
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

Timeline IterationBuilder::timeline_from() const {
  Timeline t;
  t.events.reserve(engine_.num_tasks());
  for (std::size_t i = 0; i < engine_.num_tasks(); ++i) {
    const auto& task = engine_.task(static_cast<Id>(i));
    if (task.tag < 0) {
      continue;
    }
    const TaskInfo& info = info_[static_cast<std::size_t>(task.tag)];
    std::string name = std::string(category_name(info.category));
    if (info.unit >= 0) {
      name += fmt::format(" u{}", info.unit);
    }
    if (info.micro_batch >= 0) {
      name += fmt::format(" mb{}", info.micro_batch);
    }
    t.events.push_back({info.rank, info.stream, info.category, std::move(name), info.unit,
                        info.micro_batch, task.start_s, task.end_s, info.flops, info.bytes});
  }
  t.sort();
  return t;
}

} // namespace

SimulationResult simulate_iteration(CostModel& model, const Plan& plan,
                                    const SimulationOptions& options) {
  IterationBuilder builder(model, plan, options);
  return builder.run();
}

} // namespace parallax
