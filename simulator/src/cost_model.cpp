#include "parallax/simulator/cost_model.hpp"
#include "parallax/simulator/grad_compression_cost.hpp"

#include "parallax/core/error.hpp"
#include "parallax/simulator/collectives.hpp"
#include "parallax/simulator/compute_model.hpp"

#include <algorithm>
#include <array>
#include <cmath>

namespace parallax {

namespace {

// Bytes the optimizer step moves per local parameter: mixed-precision Adam reads the gradient,
// the fp32 master weight and both moments and writes them back plus the 16-bit weight copy.
constexpr double kAdamBytesMixed = 30.0;
constexpr double kAdamBytesFp32 = 28.0;
// Gradient accumulation across micro-batches: each backward adds its weight gradients into the
// accumulation buffer (fp32 main gradients under mixed precision: read 4 + read 2 + write 4
// bytes per parameter; fp32 training: 4 + 4 + 4), a memory-bound pass per micro-batch.
constexpr double kGradAccumBytesMixed = 10.0;
constexpr double kGradAccumBytesFp32 = 12.0;

using RankLoad = CostModel::RankLoad;

void add_unit(RankLoad& r, const UnitCost& u, Recompute recompute) {
  r.compute_s += u.fwd_s + u.bwd_s + u.recompute_s(recompute);
  r.tp_s += u.tp_fwd_s + u.tp_bwd_s + u.recompute_tp_s(recompute);
  r.act_per_mb += u.kept_act_bytes(recompute);
  if (recompute == Recompute::full) {
    r.act_working = std::max(r.act_working, u.act_bytes - u.act_outside_blocks_bytes);
    r.act_outside_blocks += u.act_outside_blocks_bytes;
  }
  r.bwd_s += u.bwd_s + u.tp_bwd_s;
  r.act_transient = std::max(r.act_transient, u.act_transient_bytes);
  r.params += u.params;
  r.expert_params += u.expert_params;
  r.max_layer_params = std::max(r.max_layer_params, u.max_layer_params);
  r.matrix_params += u.matrix_params;
  r.matrix_dims += u.matrix_dims;
}

// Per-micro-batch ZeRO communication that must overlap that micro-batch's compute.
struct ZeroMicrobatchComm {
  double reduce_s = 0; // gradient reduce-scatter (ZeRO-2/3)
  double gather_s = 0; // parameter all-gathers (ZeRO-3)
};

// The step's data-parallel communication, costed from the rule the step program emits
// (core data_parallel_comm). A recomputed forward runs inside the backward of its unit and
// reuses that unit's backward gather (as PyTorch FSDP does).
ZeroMicrobatchComm zero_per_microbatch(const Plan& p, const Cluster& c, const Stack& stack,
                                       const RankLoad& r) {
  const DataParallelComm rule = data_parallel_comm(p, stack.sharding.reshard_after_forward);
  if (!rule.per_micro_batch) {
    return {};
  }
  const double g_bytes = grad_element_bytes(p, stack);
  const double w_bytes = precision_storage_bytes(p.precision);
  ZeroMicrobatchComm comm;
  comm.reduce_s = data_parallel_cost(c, p, collective_of(rule.gradients), r.params * g_bytes,
                                     r.expert_params * g_bytes, p.grad_sync)
                      .total_s();
  comm.gather_s = rule.gathers_per_micro_batch * data_parallel_cost(c, p, Collective::all_gather,
                                                                    r.params * w_bytes,
                                                                    r.expert_params * w_bytes)
                                                     .total_s();
  return comm;
}

// Data-parallel communication once per iteration: the reductions after the last micro-batch
// and the publish of the updated parameters (a parameter server's pull is costed with its push).
double dp_iteration_comm_s(const Plan& p, const Cluster& c, const Stack& stack, const RankLoad& r) {
  const DataParallelComm rule = data_parallel_comm(p, stack.sharding.reshard_after_forward);
  const double g_bytes = grad_element_bytes(p, stack);
  const double w_bytes = precision_storage_bytes(p.precision);
  double t = 0;
  if (rule.gradients == StepCollective::all_reduce) {
    t += gradient_all_reduce_cost(c, p, {r.params, r.matrix_params, r.matrix_dims}, g_bytes,
                                  r.expert_params)
             .total_s();
  } else if (rule.gradients != StepCollective::none && !rule.per_micro_batch) {
    t += data_parallel_cost(c, p, collective_of(rule.gradients), r.params * g_bytes,
                            r.expert_params * g_bytes, p.grad_sync)
             .total_s();
  }
  if (rule.publish == StepCollective::all_gather) {
    t += data_parallel_cost(c, p, Collective::all_gather, r.params * w_bytes,
                            r.expert_params * w_bytes)
             .total_s();
  }
  return t;
}

double p2p_time_s(const Plan& p, const Cluster& c, const LayerGraph& g) {
  if (p.pp <= 1) {
    return 0;
  }
  return collective_time_s(c, Collective::send_recv, p2p_bytes(p, g), pp_hop_span(p, c));
}

double pipeline_time_s(const Plan& p, const std::vector<RankLoad>& ranks, double t_max) {
  const auto m = static_cast<double>(p.num_microbatches());
  double sum = 0;
  for (const auto& r : ranks) {
    sum += r.step_s();
  }
  if (p.pp == 1) {
    return m * t_max;
  }
  if (p.schedule == Schedule::interleaved) {
    const double v = p.virtual_stages;
    return (m - 1) * t_max + sum / v + (1 - 1 / v) * t_max;
  }
  return (m - 1) * t_max + sum;
}

} // namespace

double grad_element_bytes(const Plan& p, const Stack& stack) {
  const bool fp32_main = stack.data_parallel.fp32_grad_reduce &&
                         (p.precision == Precision::bf16 || p.precision == Precision::fp8);
  return fp32_main ? 4.0 : precision_storage_bytes(p.precision);
}

ParamStateBytes param_state_bytes(const Plan& p, const Stack& stack) {
  const double d = p.dp_cp();
  const double w_bytes = precision_storage_bytes(p.precision);
  return {
      .params = w_bytes / (p.zero_stage >= 3 ? d : 1),
      .grads = grad_element_bytes(p, stack) / (p.zero_stage >= 2 ? d : 1),
      // The asynchronous server's shards hold 1/(dp·cp) of the optimizer state each (its
      // master copy and staging buffers live in host memory, as a server's do).
      // Dedicated servers hold all of it: the workers none.
      .optimizer =
          p.parameter_servers > 0
              ? 0.0
              : (precision_is_mixed(p.precision) ? 12.0 : 8.0) /
                    (p.zero_stage >= 1 || p.grad_sync == GradSync::parameter_server_async ? d : 1)};
}

MemoryBreakdown CostModel::rank_memory(const Plan& p, const RankLoad& r, int pp_rank) const {
  const double w_bytes = precision_storage_bytes(p.precision);
  const ParamStateBytes per_param = param_state_bytes(p, stack_);
  MemoryBreakdown m;
  // ZeRO shards a routed expert's state over the dp·cp / ep ranks holding that expert, not over
  // dp·cp: as if the rank held ep times its experts, sharded over dp·cp.
  // With whole experts per TP rank (etp 1) that group also spans the TP ranks.
  const double expert_scale = static_cast<double>(p.ep) * p.expert_tp() / p.tp;
  const auto zero_sharded = [&](int from_stage) {
    return p.zero_stage >= from_stage ? r.params + r.expert_params * (expert_scale - 1.0)
                                      : r.params;
  };
  m.params = zero_sharded(3) * per_param.params;
  m.grads = zero_sharded(2) * per_param.grads;
  m.optimizer = zero_sharded(1) * per_param.optimizer;
  // The transient (the loss's working copies) runs while the rank holds its activations in
  // flight: on top of them.
  m.activations = r.act_per_mb * activations_in_flight(p, pp_rank) + r.recompute_working_bytes() +
                  r.act_transient;
  // Gradient buckets are views of the flat gradient buffer, reduced in place (Megatron-LM's
  // contiguous buffer, Parallax's executor): no extra bucket memory.
  double buffers = 0;
  const bool sharded = p.dp_cp() > 1 && p.zero_stage == 3;
  // Under ZeRO-3 the gathered layers: the one in use, those prefetched and those the stack's
  // allocator has not reused yet; or, when the forward keeps them for the backward, all of the
  // rank's layers.
  const double gathered_layers =
      1.0 + stack_.sharding.prefetch_layers + stack_.sharding.retained_layers;
  const double gathered_params =
      stack_.sharding.reshard_after_forward ? gathered_layers * r.max_layer_params : r.params;
  if (sharded) {
    buffers += gathered_params * w_bytes;
  }
  if (p.precision == Precision::fp8) {
    // FP8 training keeps each weight's FP8 copy and its transpose between micro-batches
    // (Transformer Engine's weight workspaces): 2 bytes per parameter, an upper bound since the
    // embeddings and norms have none. Under ZeRO-3 only the gathered layers have them.
    buffers += 2.0 * (sharded ? gathered_params : r.params);
  }
  m.buffers = buffers;
  m.allocator = allocator_slack_bytes({m.params, m.grads, m.optimizer, m.buffers}, m.activations);
  if (cluster_->device.kind == "gpu") {
    // Communicators a rank joins: its TP, DP·CP, CP, EP and expert-DP, and pipeline groups, and
    // the tied-embedding group between the first and last stages.
    const int communicators = (p.tp > 1 ? 1 : 0) + (p.dp_cp() > 1 ? 1 : 0) + (p.cp > 1 ? 1 : 0) +
                              (p.ep > 1 ? 2 : 0) + (p.pp > 1 ? 1 : 0) +
                              (p.pp > 1 && graph_->info().tied_embeddings ? 1 : 0);
    m.runtime = stack_.memory.context_bytes + communicators * stack_.memory.communicator_bytes;
  }
  return m;
}

double CostModel::allocator_slack_bytes(std::initializer_list<double> static_buffers,
                                        double activations) const {
  // Long-lived buffers are a few large allocations (the contiguous weight, gradient and
  // optimizer buffers): their rounding is each one's remainder to the segment granularity.
  // Activations are allocated and freed every micro-batch in varying sizes: slack.
  const std::span<const double> buffers(static_buffers.begin(), static_buffers.size());
  double live = 0;
  for (const double b : buffers) {
    live += b;
  }
  return allocator_reserved_bytes(stack_, buffers) - live +
         stack_.memory.fragmentation * activations;
}

namespace {

std::string largest_share(const TimeBreakdown& b) {
  const std::array<std::pair<double, const char*>, 6> parts = {{{b.compute, "compute"},
                                                                {b.tp_comm, "tp_comm"},
                                                                {b.pp_comm, "pp_comm"},
                                                                {b.dp_comm, "dp_comm"},
                                                                {b.bubble, "bubble"},
                                                                {b.optimizer, "optimizer"}}};
  return std::max_element(parts.begin(), parts.end())->second;
}

} // namespace

double p2p_bytes(const Plan& p, const LayerGraph& g) {
  // Activations (s / cp, h) of B sequences, split across the TP ranks (scatter/gather
  // optimisation).
  return static_cast<double>(g.info().seq_length * g.info().hidden_size) *
         static_cast<double>(p.micro_batch_size) * precision_storage_bytes(p.precision) /
         (static_cast<double>(p.tp) * p.cp);
}

double activations_in_flight(const Plan& p, int pp_rank) {
  const auto m = static_cast<double>(p.num_microbatches());
  switch (p.schedule) {
  case Schedule::gpipe:
    return m;
  case Schedule::one_f_one_b:
    return std::min(static_cast<double>(p.pp - pp_rank), m);
  case Schedule::interleaved: {
    // Megatron-LM's warm-up: 2·(p − r − 1) + (v − 1)·p chunk forwards, plus the one running;
    // each chunk holds 1/v of the rank's activations.
    const double v = p.virtual_stages;
    const double chunks = 2.0 * (p.pp - pp_rank - 1) + (v - 1) * p.pp + 1;
    return std::min(chunks, m * v) / v;
  }
  }
  return m;
}

CostModel::CostModel(const LayerGraph& graph, const Cluster& cluster, Stack stack)
    : graph_(&graph), cluster_(&cluster), stack_(std::move(stack)),
      model_flops_per_sequence_(graph.model_flops_per_sequence()) {
  for (int g = 0; g < cluster.num_groups(); ++g) {
    groups_.push_back(cluster.group_view(g));
  }
}

const std::vector<UnitCost>& CostModel::units(const UnitCostKey& key, int group) {
  auto it = cache_.find({key, group});
  if (it == cache_.end()) {
    it = cache_
             .emplace(std::make_pair(key, group),
                      unit_costs(*graph_, group_cluster(group), key, stack_))
             .first;
  }
  return it->second;
}

int CostModel::stage_group(const Plan& plan, int pp_rank, int replica) const {
  if (!cluster_->heterogeneous()) {
    return 0;
  }
  // Ranks are tp-cp-dp-pp ordered: a stage's (or one replica's part of it) are contiguous.
  const int per_replica = plan.tp * plan.cp;
  const int begin = pp_rank * per_replica * plan.dp + (replica >= 0 ? replica * per_replica : 0);
  const int count = replica >= 0 ? per_replica : per_replica * plan.dp;
  const int first = cluster_->group_of_rank(begin);
  const int last = cluster_->group_of_rank(begin + count - 1);
  int slowest = first;
  const auto peak = [&](int g) {
    const auto& peaks = groups_[static_cast<std::size_t>(g)].device.peak_tflops;
    const auto it = peaks.find(plan.precision);
    return it == peaks.end() ? 0.0 : it->second;
  };
  for (int g = first + 1; g <= last; ++g) {
    if (peak(g) < peak(slowest)) {
      slowest = g;
    }
  }
  return slowest;
}

std::vector<RankLoad> CostModel::rank_loads(const Plan& plan, const std::vector<StageRange>& stages,
                                            int replica) {
  const int chunks = plan.pp * plan.virtual_stages;
  PARALLAX_CHECK(static_cast<int>(stages.size()) == chunks, "one stage range per chunk");
  std::vector<RankLoad> ranks(static_cast<std::size_t>(plan.pp));
  for (int p = 0; p < plan.pp; ++p) {
    ranks[static_cast<std::size_t>(p)].group = stage_group(plan, p, replica);
  }
  for (int chunk = 0; chunk < chunks; ++chunk) {
    RankLoad& r = ranks[static_cast<std::size_t>(chunk_pp_rank(plan, chunk))];
    const auto& units_ref = units(unit_cost_key(plan), r.group);
    for (int u = stages[chunk].first; u < stages[chunk].second; ++u) {
      add_unit(r, units_ref[static_cast<std::size_t>(u)], plan.recompute);
    }
  }
  // Tied embeddings: the last stage keeps its own copy of the embedding for the LM head.
  const GraphInfo& info = graph_->info();
  if (plan.pp > 1 && info.tied_embeddings) {
    ranks.back().params += static_cast<double>(info.vocab_size * info.hidden_size) / plan.tp;
  }
  return ranks;
}

double CostModel::memory_capacity_bytes() const {
  return cluster_->memory_bytes();
}

AsyncServerStep async_server_step(double compute_s, double round_trip_s, int max_staleness) {
  if (max_staleness <= 0) {
    return {compute_s + round_trip_s, 0.0};
  }
  const double step = std::max(compute_s, round_trip_s / max_staleness);
  const double lag = step > 0 ? std::ceil(round_trip_s / step - 1e-9) : 0.0;
  return {step, std::clamp(lag, 0.0, static_cast<double>(max_staleness))};
}

double CostModel::server_round_trip_s(const Plan& plan, const RankLoad& r) const {
  return dp_iteration_comm_s(plan, *cluster_, stack_, r) + optimizer_time_s(plan, r);
}

double CostModel::optimizer_time_s(const Plan& plan, const RankLoad& r) const {
  // ZeRO and the asynchronous server's shards: each rank updates 1/(dp·cp) of the state; each
  // dedicated server its 1/N (at the workers' device rate: a server is modelled as a rank).
  // (ZeRO never comes with dedicated servers, so their shards are the server shards.)
  const bool sharded = plan.zero_stage >= 1 || plan.grad_sync == GradSync::parameter_server_async ||
                       plan.parameter_servers > 0;
  const double local_params = r.params / (sharded ? plan.server_shards() : 1);
  double bytes =
      local_params * (precision_is_mixed(plan.precision) ? kAdamBytesMixed : kAdamBytesFp32);
  if (plan.precision == Precision::fp8) {
    // The updated weights are cast to FP8 (and transposed) once per step for the next forward:
    // every weight the rank computes with, an upper bound since embeddings and norms have none.
    bytes += r.params * kFp8WeightCastBytes;
  }
  const Device& d = group_cluster(r.group).device;
  const double efficiency =
      d.optimizer_efficiency > 0 ? d.optimizer_efficiency : elementwise_efficiency(d);
  return bytes / (d.memory_bandwidth_gbps * 1e9 * efficiency) + kernel_overhead_s(d);
}

double CostModel::grad_accumulation_s(const Plan& plan, double params, int group) const {
  if (plan.num_microbatches() <= 1) {
    return 0;
  }
  // With ZeRO-2/3 each micro-batch's gradients are reduce-scattered: only a shard accumulates.
  const double local = params / (plan.zero_stage >= 2 ? plan.dp_cp() : 1);
  const double bytes_per_param =
      precision_is_mixed(plan.precision) ? kGradAccumBytesMixed : kGradAccumBytesFp32;
  return memory_time_s(group_cluster(group), local * bytes_per_param);
}

std::vector<MemoryBreakdown> CostModel::memory_per_stage(const Plan& plan) {
  const std::vector<StageRange> stages =
      plan.stages.empty() ? stages_even(graph_->num_units(), plan.pp * plan.virtual_stages)
                          : plan.stages;
  auto ranks = rank_loads(plan, stages);
  std::vector<MemoryBreakdown> out;
  for (int r = 0; r < plan.pp; ++r) {
    out.push_back(rank_memory(plan, ranks[static_cast<std::size_t>(r)], r));
  }
  return out;
}

MemoryBreakdown CostModel::memory(const Plan& plan) {
  const std::vector<StageRange> stages =
      plan.stages.empty() ? stages_even(graph_->num_units(), plan.pp * plan.virtual_stages)
                          : plan.stages;
  auto ranks = rank_loads(plan, stages);
  MemoryBreakdown worst;
  for (int r = 0; r < plan.pp; ++r) {
    MemoryBreakdown mem = rank_memory(plan, ranks[static_cast<std::size_t>(r)], r);
    if (mem.total() > worst.total()) {
      worst = mem;
    }
  }
  return worst;
}

PlanEstimate CostModel::estimate(const Plan& plan) {
  if (plan.dp_shares.empty()) {
    return estimate_replica(plan, -1);
  }
  PlanEstimate slowest;
  MemoryBreakdown most;
  bool fits = true;
  for (int d = 0; d < plan.dp; ++d) {
    PlanEstimate e = estimate_replica(replica_plan(plan, d), d);
    fits = fits && e.fits;
    if (e.memory.total() > most.total()) {
      most = e.memory;
    }
    if (e.iteration_time_s > slowest.iteration_time_s) {
      slowest = e;
    }
  }
  slowest.memory = most;
  slowest.fits = fits;
  const double tokens = static_cast<double>(plan.global_batch_size * graph_->info().seq_length);
  const double ratio = static_cast<double>(plan.global_batch_size) /
                       static_cast<double>(slowest.plan.global_batch_size);
  slowest.plan = [&] {
    Plan p = plan;
    p.stages = slowest.plan.stages;
    return p;
  }();
  slowest.tokens_per_s = tokens / slowest.iteration_time_s;
  slowest.tflops_per_gpu *= ratio;
  slowest.mfu *= ratio;
  return slowest;
}

PlanEstimate CostModel::estimate_replica(const Plan& plan, int replica) {
  const Cluster& c = *cluster_;
  const std::vector<StageRange> stages =
      plan.stages.empty() ? stages_even(graph_->num_units(), plan.pp * plan.virtual_stages)
                          : plan.stages;
  std::vector<RankLoad> ranks = rank_loads(plan, stages, replica);
  const double p2p = p2p_time_s(plan, c, *graph_);
  const bool overlap = device_overlaps_communication(c.device);
  for (auto& r : ranks) {
    r.compute_s += grad_accumulation_s(plan, r.params, r.group);
    r.p2p_s = plan.pp > 1 ? 2.0 * plan.virtual_stages * p2p : 0.0;
    // Gathers are prefetched whatever the stack does with gradients; reductions overlap only
    // when the plan's stack overlaps them.
    const ZeroMicrobatchComm zc = zero_per_microbatch(plan, c, stack_, r);
    const double overlappable = zc.gather_s + (plan.overlap_grad_reduce ? zc.reduce_s : 0.0);
    const double hidden = overlap ? std::min(overlappable, r.compute_s) : 0.0;
    r.zero3_exposed_s =
        zc.reduce_s + zc.gather_s - hidden + stack_.overlap_compute_slowdown * hidden;
  }

  double t_max = 0;
  std::size_t slowest = 0;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (ranks[i].step_s() > t_max) {
      t_max = ranks[i].step_s();
      slowest = i;
    }
  }
  const double m = static_cast<double>(plan.num_microbatches());
  const double pipe = pipeline_time_s(plan, ranks, t_max);

  // Gradient reduction overlaps the last backward on each rank (bucket by bucket; the last
  // bucket cannot overlap) when the stack overlaps it; later pipeline ranks also overlap the
  // drain of earlier ones.
  double dp_exposed = 0;
  double optimizer = 0;
  double slack = 0;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    const RankLoad& r = ranks[i];
    const double t_dp = dp_iteration_comm_s(plan, c, stack_, r);
    const double buckets =
        std::max(1.0, std::ceil(r.params * precision_storage_bytes(plan.precision) /
                                MemoryModelConstants::kGradBucketBytes));
    const double own_backward = plan.overlap_grad_reduce && plan.zero_stage <= 1 ? r.bwd_s : 0.0;
    const double window = overlap ? own_backward + slack : 0.0;
    const double exposed = std::max(t_dp / buckets, t_dp - window);
    dp_exposed = std::max(dp_exposed, exposed + stack_.overlap_compute_slowdown * (t_dp - exposed));
    slack += r.bwd_s + r.p2p_s / 2;
    optimizer = std::max(optimizer, optimizer_time_s(plan, r));
  }

  PlanEstimate e;
  e.plan = plan;
  e.plan.stages = stages;
  e.iteration_time_s = pipe + dp_exposed + optimizer;
  if (plan.async_ps()) {
    // No barrier and no overlap with the backward: the round trip runs beside the next steps.
    const AsyncServerStep a =
        async_server_step(pipe, server_round_trip_s(plan, ranks[slowest]), plan.max_staleness);
    e.iteration_time_s = a.step_s;
    e.staleness = a.staleness;
    dp_exposed = a.step_s - pipe;
    optimizer = 0;
  }
  const RankLoad& s = ranks[slowest];
  e.breakdown.compute = m * s.compute_s;
  e.breakdown.tp_comm = m * s.tp_s;
  e.breakdown.pp_comm = m * s.p2p_s;
  e.breakdown.dp_comm = m * s.zero3_exposed_s + dp_exposed;
  e.breakdown.bubble = pipe - m * t_max;
  e.breakdown.optimizer = optimizer;
  e.bottleneck = largest_share(e.breakdown);
  e.stack = stack_.name;

  const double tokens = static_cast<double>(plan.global_batch_size * graph_->info().seq_length);
  e.tokens_per_s = tokens / e.iteration_time_s;
  const auto sequences = static_cast<double>(plan.global_batch_size);
  e.tflops_per_gpu = model_flops_utilization(model_flops_per_sequence_, sequences,
                                             e.iteration_time_s, plan.world_size(), 1e12);
  e.mfu = model_flops_utilization(model_flops_per_sequence_, sequences, e.iteration_time_s,
                                  plan.world_size(), c.mean_peak_flops(plan.precision));

  for (int r = 0; r < plan.pp; ++r) {
    MemoryBreakdown mem = rank_memory(plan, ranks[static_cast<std::size_t>(r)], r);
    if (mem.total() > e.memory.total()) {
      e.memory = mem;
    }
  }
  e.memory_capacity_bytes = memory_capacity_bytes();
  e.fits = e.memory.total() <= e.memory_capacity_bytes;
  return e;
}

} // namespace parallax
