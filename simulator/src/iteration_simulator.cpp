// Builds the simulated step: every simulated rank's step program (core/step_program) as engine
// tasks — compute on the rank's compute stream, collectives as flows on its links — linked
// across ranks by pipeline sends and collective groups. The figures are read back in
// iteration_estimate.cpp.
#include "iteration_builder.hpp"

#include "parallax/core/error.hpp"
#include "parallax/simulator/collectives.hpp"
#include "parallax/simulator/compute_model.hpp"
#include "parallax/simulator/grad_compression_cost.hpp"

#include <algorithm>

namespace parallax {

namespace detail {

IterationBuilder::IterationBuilder(CostModel& model, const Plan& plan,
                                   const SimulationOptions& options, int replica)
    : model_(model), plan_(plan), options_(options), cluster_(model.cluster()),
      stages_(plan.stages.empty()
                  ? stages_even(model.graph().num_units(), plan.pp * plan.virtual_stages)
                  : plan.stages),
      units_(model.units(unit_cost_key(plan))), w_bytes_(precision_storage_bytes(plan.precision)),
      loads_(model.rank_loads(plan, stages_, replica)) {
  for (const CostModel::RankLoad& load : loads_) {
    stage_units_.push_back(&model.units(unit_cost_key(plan), load.group));
  }
  shape_.units = model.graph().num_units();
  shape_.unit_has_params.reserve(units_.size());
  for (const UnitCost& u : units_) {
    shape_.unit_has_params.push_back(u.params > 0);
  }
  shape_.tied_embeddings = model.graph().info().tied_embeddings;
  shape_.reshard_after_forward = model.stack().sharding.reshard_after_forward;
}

Id IterationBuilder::add_compute(RankSim& r, double duration, const StepOp& op, int op_index,
                                 double flops) {
  const Id id = engine_.add_compute(r.compute, duration, static_cast<std::int32_t>(info_.size()));
  info_.push_back({.rank = r.rank,
                   .slot = r.slot,
                   .stream = Stream::compute,
                   .category = op.category(),
                   .unit = op.unit,
                   .micro_batch = op.micro_batch,
                   .op = op_index,
                   .flops = flops});
  chain(id);
  return id;
}

Id IterationBuilder::add_comm(RankSim& r, const StepOp& op, int op_index,
                              const CollectiveCost& cost, double bytes, bool tp_part) {
  const Stream stream = tp_part ? Stream::tp_comm : op.stream();
  const Id link = cost.network ? r.network : r.nvlink;
  const double capacity =
      cost.network ? network_link_bandwidth(cluster_) : intra_link_bandwidth(cluster_);
  Id stream_id = op.kind == StepOpKind::gather ? r.gather_stream
                 : stream == Stream::tp_comm   ? r.tp_stream
                 : stream == Stream::pp_comm   ? r.pp_stream
                                               : r.dp_stream;
  if (stream == Stream::dp_comm && !device_overlaps_communication(cluster_.device)) {
    stream_id = r.compute; // the cores that compute also move the data (CPU ranks)
  }
  // On the uplink a flow is grouped by the GPU it leaves from: that GPU's flows share its NIC.
  const Id id = engine_.add_flow(
      stream_id, link, cost.latency_s, cost.transfer_s * capacity,
      static_cast<std::int32_t>(info_.size()), cost.network ? r.network_weight : 1.0,
      cost.network ? rank_device(r.rank, cluster_.node.devices_per_node).device : -1);
  info_.push_back({.rank = r.rank,
                   .slot = r.slot,
                   .stream = stream,
                   .category = tp_part ? Category::tp_comm : op.category(),
                   .unit = op.unit,
                   .micro_batch = op.micro_batch,
                   .op = op_index,
                   .tp_part = tp_part,
                   .bytes = bytes});
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

// `task` starts once the ops `op` waits for have finished: a receive waits for its sender.
void IterationBuilder::wait_for(RankSim& r, const StepOp& op, Id task) {
  for (int a : op.after) {
    const StepOp& before = r.program.ops[static_cast<std::size_t>(a)];
    if (before.kind == StepOpKind::recv) {
      receives_.emplace_back(
          send_key(before.activation(), before.peer_chunk, before.micro_batch, r.dp, r.tp), task);
      r.receives.push_back({a, r.anchor[static_cast<std::size_t>(a)], task});
    } else {
      engine_.add_dependency(r.anchor[static_cast<std::size_t>(a)], task);
    }
  }
}

// A compute op's tensor-parallel collectives, after it on the rank's chain.
Id IterationBuilder::tp_collective(RankSim& r, const StepOp& op, int i, double seconds, Id trigger,
                                   double ep_s) {
  // With tp = 1 there is still the expert-parallel all-to-all and the context-parallel K/V
  // exchange (both costed inside the layer's collectives).
  const bool ep_network = ep_s > 0 && ep_span(plan_, cluster_).nodes > 1;
  const double local = ep_network ? seconds - ep_s : seconds;
  Id last = trigger;
  if (local > 0) {
    last = add_comm(r, op, i, {0.0, local, false}, 0, true);
    chain(last);
    record_group(0, rank_of(plan_, {r.dp, r.pp_rank, 0}), r, trigger, last);
  }
  if (ep_network) {
    last = add_comm(r, op, i, {0.0, ep_s, true}, 0, true);
    chain(last);
  }
  return last;
}

double IterationBuilder::unit_reduction_bytes(int unit) const {
  return units_[static_cast<std::size_t>(unit)].params * grad_element_bytes(plan_, model_.stack());
}

void IterationBuilder::run_op(RankSim& r, int i) {
  const StepOp& op = r.program.ops[static_cast<std::size_t>(i)];
  const int dp_group = rank_of(plan_, {0, r.pp_rank, r.tp});
  const std::vector<UnitCost>& units = *stage_units_[static_cast<std::size_t>(r.pp_rank)];
  const UnitCost* cost = op.unit >= 0 ? &units[static_cast<std::size_t>(op.unit)] : nullptr;
  Id& anchor = r.anchor[static_cast<std::size_t>(i)];
  if (plan_.async_ps() && (op.kind == StepOpKind::reduce || op.kind == StepOpKind::optimizer ||
                           op.kind == StepOpKind::publish)) {
    // The asynchronous server's round trip runs beside the next steps (estimate_from).
    anchor = prev_;
    return;
  }
  switch (op.kind) {
  case StepOpKind::gather: {
    const double bytes = cost->params * w_bytes_;
    const CollectiveCost cc = data_parallel_cost(cluster_, plan_, Collective::all_gather, bytes,
                                                 cost->expert_params * w_bytes_);
    anchor = add_comm(r, op, i, cc, bytes);
    const Id trigger = op.after.empty() ? -1 : r.anchor[static_cast<std::size_t>(op.after[0])];
    wait_for(r, op, anchor);
    record_group(1, dp_group, r, trigger, anchor);
    break;
  }
  case StepOpKind::forward:
    anchor = add_compute(r, cost->fwd_s, op, i, cost->model_flops / 3.0);
    wait_for(r, op, anchor);
    tp_collective(r, op, i, cost->tp_fwd_s, anchor, cost->ep_fwd_s);
    break;
  case StepOpKind::recompute:
    anchor = add_compute(r, cost->full_recompute_s, op, i, 0);
    wait_for(r, op, anchor);
    tp_collective(r, op, i, cost->full_recompute_tp_s, anchor);
    break;
  case StepOpKind::backward: {
    // Selective recomputation runs inside the backward; full has its own op.
    const double extra =
        (plan_.recompute == Recompute::full ? 0.0 : cost->recompute_s(plan_.recompute)) +
        model_.grad_accumulation_s(plan_, cost->params,
                                   loads_[static_cast<std::size_t>(r.pp_rank)].group);
    anchor = add_compute(r, cost->bwd_s + extra, op, i, cost->model_flops * 2.0 / 3.0);
    wait_for(r, op, anchor);
    tp_collective(r, op, i, cost->tp_bwd_s, anchor, cost->ep_bwd_s);
    break;
  }
  case StepOpKind::send: {
    const double bytes = p2p_bytes(plan_, model_.graph());
    const CollectiveCost cc =
        collective_cost(cluster_, Collective::send_recv, bytes, pp_hop_span(plan_, cluster_));
    anchor = add_comm(r, op, i, cc, bytes);
    chain(anchor); // blocking send, as in Megatron-LM's schedules
    sends_[send_key(op.activation(), op.chunk, op.micro_batch, r.dp, r.tp)] = anchor;
    break;
  }
  case StepOpKind::recv:
    anchor = prev_; // no task of its own: its consumer waits for the sender
    break;
  case StepOpKind::reduce: {
    const double bytes = unit_reduction_bytes(op.unit);
    const double g_bytes = grad_element_bytes(plan_, model_.stack());
    const CollectiveCost cc =
        op.collective == StepCollective::all_reduce
            ? gradient_all_reduce_cost(cluster_, plan_,
                                       {cost->params, cost->matrix_params, cost->matrix_dims},
                                       g_bytes, cost->expert_params)
            : data_parallel_cost(cluster_, plan_, collective_of(op.collective), bytes,
                                 cost->expert_params * g_bytes, plan_.grad_sync);
    const Id trigger = op.async ? r.anchor[static_cast<std::size_t>(op.after[0])] : prev_;
    anchor = add_comm(r, op, i, cc, bytes);
    if (op.async) {
      wait_for(r, op, anchor);
    } else {
      chain(anchor);
    }
    record_group(1, dp_group, r, trigger, anchor);
    break;
  }
  case StepOpKind::embedding_sync: {
    // The embedding's gradient, summed between the first and the last stage's copy.
    const GraphInfo& g = model_.graph().info();
    const double bytes = static_cast<double>(g.vocab_size * g.hidden_size) / plan_.tp *
                         grad_element_bytes(plan_, model_.stack());
    const GroupSpan span = group_span(2, (plan_.pp - 1) * plan_.dp * plan_.cp * plan_.tp,
                                      cluster_.node.devices_per_node);
    const Id trigger = prev_;
    anchor =
        add_comm(r, op, i, collective_cost(cluster_, Collective::all_reduce, bytes, span), bytes);
    chain(anchor);
    wait_for(r, op, anchor);
    record_group(2, rank_of(plan_, {r.dp, 0, r.tp}), r, trigger, anchor);
    break;
  }
  case StepOpKind::sp_sync: {
    double params = 0;
    for (std::size_t c = static_cast<std::size_t>(r.pp_rank); c < stages_.size();
         c += static_cast<std::size_t>(plan_.pp)) {
      for (int u = stages_[c].first; u < stages_[c].second; ++u) {
        params += units_[static_cast<std::size_t>(u)].replicated_params;
      }
    }
    const double bytes = params * grad_element_bytes(plan_, model_.stack());
    const Id trigger = prev_;
    anchor = add_comm(
        r, op, i,
        collective_cost(cluster_, Collective::all_reduce, bytes, tp_span(plan_, cluster_)), bytes);
    chain(anchor);
    wait_for(r, op, anchor);
    record_group(0, rank_of(plan_, {r.dp, r.pp_rank, 0}), r, trigger, anchor);
    break;
  }
  case StepOpKind::optimizer: {
    const CostModel::RankLoad& load = loads_[static_cast<std::size_t>(r.pp_rank)];
    anchor = add_compute(r, model_.optimizer_time_s(plan_, load), op, i, 0);
    wait_for(r, op, anchor);
    break;
  }
  case StepOpKind::publish: {
    // ZeRO-1/2 all-gather the updated parameters; a parameter server's pull is costed with
    // its push in the reduction (collective_cost), so its broadcast takes no time of its own.
    const CostModel::RankLoad& load = loads_[static_cast<std::size_t>(r.pp_rank)];
    const double bytes = load.params * w_bytes_;
    const CollectiveCost cc = op.collective == StepCollective::all_gather
                                  ? data_parallel_cost(cluster_, plan_, Collective::all_gather,
                                                       bytes, load.expert_params * w_bytes_)
                                  : CollectiveCost{};
    anchor = add_comm(r, op, i, cc, bytes);
    wait_for(r, op, anchor);
    record_group(1, dp_group, r, r.anchor[static_cast<std::size_t>(op.after[0])], anchor);
    break;
  }
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

// In a simulation reduced by symmetry one rank stands for its stage's data-, context- and
// tensor-parallel replicas, which run the same flows at the same times: those on its node load
// the uplink too. Without the reduction a rank still stands for its context-parallel peers
// (which do the same work under causal load balancing).
double IterationBuilder::replicas_on_node(const RankSim& r) const {
  const int per_node = cluster_.node.devices_per_node;
  if (!options_.symmetric) {
    const int node = r.rank / per_node;
    int peers = 0;
    for (const int member : cp_group(plan_, r.rank)) {
      peers += member / per_node == node ? 1 : 0;
    }
    return peers;
  }
  const int stage_size = plan_.tp * plan_.cp * plan_.dp;
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
  r.network_weight = replicas_on_node(r);
  prev_ = -1;
  r.program = step_program(plan_, shape_, r.rank);
  r.anchor.assign(r.program.ops.size(), -1);
  std::size_t phase = 0;
  for (int i = 0; i < static_cast<int>(r.program.ops.size()); ++i) {
    run_op(r, i);
    // Where a schedule op ends, the activations it keeps (forward) or frees (backward) change.
    for (; phase < r.program.phases.size() && r.program.phases[phase].last_op == i; ++phase) {
      r.op_ends.emplace_back(prev_, r.program.phases[phase].forward);
      r.op_chunks.push_back(r.program.phases[phase].chunk);
    }
  }
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
  // Context-parallel ranks do equal work (causal load balancing): cp rank 0 stands for them.
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
        r.slot = static_cast<int>(ranks.size());
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
    result.timeline = timeline_from(ranks);
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

} // namespace detail

SimulationResult simulate_iteration(CostModel& model, const Plan& plan,
                                    const SimulationOptions& options) {
  if (plan.dp_shares.empty()) {
    detail::IterationBuilder builder(model, plan, options);
    return builder.run();
  }
  // Uneven data parallelism: every replica on its own devices with its own micro-batches; the
  // slowest sets the step (the gradient reduction waits for it).
  SimulationResult slowest;
  for (int d = 0; d < plan.dp; ++d) {
    const Plan view = replica_plan(plan, d);
    detail::IterationBuilder builder(model, view, options, d);
    SimulationResult r = builder.run();
    if (r.estimate.iteration_time_s > slowest.estimate.iteration_time_s) {
      slowest = std::move(r);
    }
  }
  PlanEstimate& e = slowest.estimate;
  const double ratio =
      static_cast<double>(plan.global_batch_size) / static_cast<double>(e.plan.global_batch_size);
  std::vector<StageRange> stages = e.plan.stages;
  e.plan = plan;
  e.plan.stages = std::move(stages);
  e.tokens_per_s *= ratio;
  e.tflops_per_gpu *= ratio;
  e.mfu *= ratio;
  return slowest;
}

} // namespace parallax
