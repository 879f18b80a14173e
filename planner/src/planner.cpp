#include "parallax/planner/planner.hpp"

#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/planner/stage_partition.hpp"
#include "parallax/simulator/iteration_simulator.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <exception>
#include <functional>
#include <map>
#include <numeric>
#include <thread>
#include <tuple>

namespace parallax {

namespace {

std::vector<int> divisors(std::int64_t n, std::int64_t limit) {
  std::vector<int> out;
  for (std::int64_t d = 1; d <= n && d <= limit; ++d) {
    if (n % d == 0) {
      out.push_back(static_cast<int>(d));
    }
  }
  return out;
}

// Expert-parallel sizes to search: the divisors of dp that divide the model's experts (1 for a
// dense model); the feasibility rule (ep_problem) has the last word.
std::vector<int> expert_parallel_sizes(const GraphInfo& info, int dp) {
  if (info.num_experts == 0) {
    return {1};
  }
  std::vector<int> out;
  for (int ep : divisors(dp, dp)) {
    if (info.num_experts % ep == 0) {
      out.push_back(ep);
    }
  }
  return out;
}

// Context-parallel degrees worth trying on `ranks` model-parallel-free ranks: for sequences of
// at least kLongSequence tokens (shorter ones gain nothing a micro-batch of fewer sequences
// would not give, and the search stays as fast as without cp), those whose 2·cp chunks split
// the sequence and leave each rank at least kMinContextTokens of it (below that the K/V
// exchange of a ring step outweighs its attention block on any current device). A pin tries
// any cp.
std::vector<int> context_parallel_sizes(const GraphInfo& info, int ranks) {
  constexpr std::int64_t kLongSequence = 8192;
  constexpr std::int64_t kMinContextTokens = 2048;
  std::vector<int> out;
  for (int cp : divisors(ranks, ranks)) {
    if (cp == 1 || (info.seq_length >= kLongSequence && !cp_problem(info, cp) &&
                    info.seq_length / cp >= kMinContextTokens)) {
      out.push_back(cp);
    }
  }
  return out;
}

template <class T> std::vector<T> pinned_or(const std::optional<T>& pin, std::vector<T> all) {
  if (pin) {
    return {*pin};
  }
  return all;
}

Precision default_precision(const Cluster& c) {
  for (Precision p : {Precision::bf16, Precision::fp16, Precision::tf32, Precision::fp32}) {
    if (c.supports(p)) {
      return p;
    }
  }
  return c.device.peak_tflops.begin()->first;
}

// Min-max stage partitions, cached per (unit costs, recomputation, chunk count).
class StageCache {
public:
  const std::vector<StageRange>& get(CostModel& model, const Plan& plan) {
    const UnitCostKey key = unit_cost_key(plan);
    const int chunks = plan.pp * plan.virtual_stages;
    // Gradient accumulation costs per parameter and micro-batch, so it weighs in the balance.
    const double accum_per_param = model.grad_accumulation_s(plan, 1.0);
    // Each chunk's node group (heterogeneous clusters): a faster group's chunks take more.
    std::vector<int> groups; // empty on a homogeneous cluster (every chunk on group 0)
    if (model.cluster().heterogeneous()) {
      for (int c = 0; c < chunks; ++c) {
        groups.push_back(model.stage_group(plan, chunk_pp_rank(plan, c)));
      }
    }
    auto id = std::make_tuple(key, plan.recompute, chunks, accum_per_param, groups);
    auto it = cache_.find(id);
    if (it != cache_.end()) {
      return it->second;
    }
    const auto weights_on = [&](int group) {
      std::vector<double> weights;
      for (const UnitCost& u : model.units(key, group)) {
        const double recompute = u.recompute_s(plan.recompute) + u.recompute_tp_s(plan.recompute);
        weights.push_back(u.fwd_s + u.bwd_s + u.tp_fwd_s + u.tp_bwd_s + recompute +
                          accum_per_param * u.params);
      }
      return weights;
    };
    const std::vector<double> weights = weights_on(0);
    const double total = std::accumulate(weights.begin(), weights.end(), 0.0);
    std::vector<double> scale(static_cast<std::size_t>(chunks), 1.0);
    for (std::size_t c = 0; c < groups.size(); ++c) {
      const std::vector<double> w = groups[c] == 0 ? weights : weights_on(groups[c]);
      scale[c] = total > 0 ? std::accumulate(w.begin(), w.end(), 0.0) / total : 1.0;
    }
    return cache_.emplace(id, partition_min_max(weights, chunks, scale)).first->second;
  }

private:
  std::map<std::tuple<UnitCostKey, Recompute, int, double, std::vector<int>>,
           std::vector<StageRange>>
      cache_;
};

double objective_value(const PlanRequest& req, const Cluster& c, const PlanEstimate& e, int gpus,
                       const std::optional<Goodput>& goodput) {
  switch (req.objective) {
  case Objective::goodput:
    return goodput && goodput->goodput_tokens_per_s > 0 ? 1e6 / goodput->goodput_tokens_per_s
                                                        : 1e300;
  case Objective::throughput:
    return 1e6 / e.tokens_per_s; // seconds per million tokens: lower is better
  case Objective::time_to_train:
    return req.train_tokens / e.tokens_per_s / 3600.0;
  case Objective::cost:
    return gpus * c.cost_per_device_hour_usd.value_or(0.0) * (1e6 / e.tokens_per_s) / 3600.0;
  }
  return 0;
}

// The plan's objective value, and its goodput when that is the objective.
void score(const PlanRequest& req, CostModel& model, RankedPlan& p) {
  if (req.objective == Objective::goodput) {
    p.goodput = goodput_of(static_cast<double>(model.graph().total_params()), p.estimate.plan,
                           model.cluster(), req.stack, p.gpus, p.estimate.iteration_time_s,
                           p.estimate.tokens_per_s, req.gpu_mtbf_hours);
  }
  p.objective_value = objective_value(req, model.cluster(), p.estimate, p.gpus, p.goodput);
}

struct SearchState {
  const PlanRequest& req;
  PlanSearchResult result;
  double closest_ratio = 1e300;
};

void consider(SearchState& st, CostModel& model, StageCache& stages, Plan plan, int gpus) {
  ++st.result.candidates;
  plan.stages = stages.get(model, plan);
  const MemoryBreakdown mem = model.memory(plan);
  const double ratio = mem.total() / model.memory_capacity_bytes();
  if (ratio > 1.0) {
    ++st.result.pruned_memory;
    if (st.result.plans.empty() && ratio < st.closest_ratio) {
      st.closest_ratio = ratio;
      st.result.closest = model.estimate(plan);
    }
    return;
  }
  ++st.result.evaluated;
  RankedPlan ranked{.estimate = model.estimate(plan), .gpus = gpus};
  score(st.req, model, ranked);
  if (st.req.record_points) {
    st.result.points.push_back({.plan = plan,
                                .gpus = gpus,
                                .tokens_per_s = ranked.estimate.tokens_per_s,
                                .memory_bytes = ranked.estimate.memory.total()});
  }
  auto& plans = st.result.plans;
  const auto k = static_cast<std::size_t>(std::max(1, st.req.top_k));
  if (plans.size() == k && ranked.objective_value >= plans.back().objective_value) {
    return;
  }
  auto pos = std::upper_bound(plans.begin(), plans.end(), ranked.objective_value,
                              [](double v, const RankedPlan& p) { return v < p.objective_value; });
  plans.insert(pos, std::move(ranked));
  if (plans.size() > k) {
    plans.pop_back();
  }
}

// Every schedule / virtual-stage choice valid for this pp and micro-batch count.
constexpr GradSync kGradSyncs[] = {GradSync::allreduce, GradSync::tree, GradSync::hierarchical,
                                   GradSync::parameter_server, GradSync::parameter_server_async};

// The gradient compressions to try for plan `p`: the pinned one, none, or with
// search_compression also the methods compression_problem allows for it.
std::vector<GradCompression> compressions_for(const PlanPins& pins, const Plan& p) {
  if (pins.grad_compression) {
    return {*pins.grad_compression};
  }
  if (!pins.search_compression || p.dp_cp() <= 1 ||
      compression_problem(Plan{.zero_stage = p.zero_stage,
                               .grad_sync = p.grad_sync,
                               .grad_compression = {.kind = CompressionKind::bf16}})) {
    return {GradCompression{}};
  }
  return {GradCompression{}, GradCompression{.kind = CompressionKind::bf16},
          GradCompression{.kind = CompressionKind::powersgd, .rank = 4},
          GradCompression{.kind = CompressionKind::topk, .fraction = 0.01}};
}

// Heterogeneous clusters: micro-batch shares of the data-parallel replicas in proportion to
// their devices' speed (each replica's compute time over its stages' node groups), in whole
// micro-batches (multiples of pp when interleaved), at least one each; empty when the replicas
// all sit on the same kind of devices.
std::vector<std::int64_t> speed_shares(CostModel& model, const Plan& p) {
  if (!model.cluster().heterogeneous() || p.dp <= 1) {
    return {};
  }
  const UnitCostKey key = unit_cost_key(p);
  std::map<int, double> group_time;
  const auto time_on = [&](int g) {
    auto it = group_time.find(g);
    if (it == group_time.end()) {
      double t = 0;
      for (const UnitCost& u : model.units(key, g)) {
        t += u.fwd_s + u.bwd_s;
      }
      it = group_time.emplace(g, t).first;
    }
    return it->second;
  };
  std::vector<double> speed;
  bool uneven = false;
  for (int d = 0; d < p.dp; ++d) {
    double t = 0;
    for (int s = 0; s < p.pp; ++s) {
      t = std::max(t, time_on(model.stage_group(p, s, d)));
    }
    speed.push_back(t > 0 ? 1.0 / t : 1.0);
    uneven = uneven || speed.back() != speed.front();
  }
  if (!uneven) {
    return {};
  }
  const std::int64_t quantum = p.schedule == Schedule::interleaved ? p.pp : 1;
  const std::int64_t total = p.global_batch_size / p.micro_batch_size / quantum;
  if (total < p.dp) {
    return {};
  }
  const double sum = std::accumulate(speed.begin(), speed.end(), 0.0);
  std::vector<std::int64_t> shares;
  std::vector<std::pair<double, int>> remainders;
  std::int64_t given = 0;
  for (int d = 0; d < p.dp; ++d) {
    const double exact =
        static_cast<double>(total - p.dp) * speed[static_cast<std::size_t>(d)] / sum;
    shares.push_back(1 + static_cast<std::int64_t>(exact));
    given += shares.back();
    remainders.emplace_back(exact - std::floor(exact), d);
  }
  std::sort(remainders.begin(), remainders.end(), std::greater<>());
  for (std::size_t i = 0; given < total; ++i, ++given) {
    ++shares[static_cast<std::size_t>(remainders[i % remainders.size()].second)];
  }
  for (std::int64_t& s : shares) {
    s *= quantum;
  }
  return shares;
}

// Every (gradient synchronisation, compression) to try for plan `p`.
std::vector<std::pair<GradSync, GradCompression>> reductions_for(const PlanPins& pins,
                                                                 const Plan& p) {
  std::vector<GradSync> syncs = {p.grad_sync};
  if (!pins.grad_sync && pins.search_grad_sync && p.dp_cp() > 1) {
    syncs.assign(std::begin(kGradSyncs), std::end(kGradSyncs));
  }
  std::vector<std::pair<GradSync, GradCompression>> out;
  for (const GradSync sync : syncs) {
    Plan q = p;
    q.grad_sync = sync;
    for (const GradCompression& gc : compressions_for(pins, q)) {
      out.emplace_back(sync, gc);
    }
  }
  return out;
}

// Server counts for a parameter-server plan: the pin, or co-located (0) with, when searching
// gradient synchronisation, dp/4, dp/2 and dp dedicated servers.
std::vector<int> server_counts_for(const PlanPins& pins, const Plan& p) {
  if (!is_parameter_server(p.grad_sync)) {
    // A pin of dedicated servers asks for a parameter server: no other reduction honours it.
    return pins.parameter_servers.value_or(0) > 0 ? std::vector<int>{} : std::vector<int>{0};
  }
  if (pins.parameter_servers) {
    return {*pins.parameter_servers};
  }
  std::vector<int> out = {0};
  if (pins.search_grad_sync && !pins.grad_sync) {
    for (const int n : {p.dp_cp() / 4, p.dp_cp() / 2, p.dp_cp()}) {
      if (n >= 1 && n != out.back()) {
        out.push_back(n);
      }
    }
  }
  return out;
}

std::vector<std::pair<Schedule, int>> schedules_for(const PlanPins& pins, int pp, int units,
                                                    std::int64_t m) {
  std::vector<std::pair<Schedule, int>> out;
  if (pp == 1) {
    if ((!pins.schedule || *pins.schedule != Schedule::interleaved) &&
        (!pins.virtual_stages || *pins.virtual_stages == 1)) {
      out.emplace_back(pins.schedule.value_or(Schedule::one_f_one_b), 1);
    }
    return out;
  }
  for (Schedule s : {Schedule::gpipe, Schedule::one_f_one_b, Schedule::interleaved}) {
    if (pins.schedule && *pins.schedule != s) {
      continue;
    }
    if (s != Schedule::interleaved) {
      if (!pins.virtual_stages || *pins.virtual_stages == 1) {
        out.emplace_back(s, 1);
      }
      continue;
    }
    if (m % pp != 0) {
      continue;
    }
    constexpr int kMaxVirtualStages = 8;
    for (int v = 2; v <= kMaxVirtualStages && pp * v <= units; ++v) {
      if (!pins.virtual_stages || *pins.virtual_stages == v) {
        out.emplace_back(s, v);
      }
    }
  }
  return out;
}

void search_world(SearchState& st, const LayerGraph& graph, const Cluster& cluster, int gpus) {
  const PlanRequest& req = st.req;
  const PlanPins& pins = req.pins;
  const Cluster sized = cluster.with_devices(gpus);
  CostModel model(graph, sized, req.stack);
  StageCache stages;
  const GraphInfo& info = graph.info();
  const int units = graph.num_units();
  const Precision precision = pins.precision.value_or(default_precision(sized));
  bool has_selective = false;
  for (std::size_t v = 0; v < graph.num_layers(); ++v) {
    has_selective |= graph.layer(v).selective_recompute;
  }
  // Without materialised attention scores, selective recomputation equals none.
  const std::vector<Recompute> recomputes =
      has_selective ? std::vector<Recompute>{Recompute::none, Recompute::selective, Recompute::full}
                    : std::vector<Recompute>{Recompute::none, Recompute::full};
  sized.peak_flops(precision); // rejects a precision the device lacks, naming it

  for (int tp : pinned_or(pins.tp, divisors(gpus, sized.node.devices_per_node))) {
    if (gpus % tp != 0 || tp_problem(info, tp)) {
      continue;
    }
    for (int pp : pinned_or(pins.pp, divisors(gpus / tp, units))) {
      if ((gpus / tp) % pp != 0 || pp > units) {
        continue;
      }
      for (int cp : pinned_or(pins.cp, context_parallel_sizes(info, gpus / (tp * pp)))) {
        if ((gpus / (tp * pp)) % cp != 0) {
          continue;
        }
        const int dp = gpus / (tp * pp * cp);
        if ((pins.dp && *pins.dp != dp) || req.global_batch_size % dp != 0) {
          continue;
        }
        const std::vector<CpComm> cp_comms =
            cp > 1 ? pinned_or(pins.cp_comm, {CpComm::p2p, CpComm::all_gather})
                   : std::vector<CpComm>{CpComm::p2p};
        const std::int64_t local = req.global_batch_size / dp;
        for (std::int64_t mb : pinned_or<std::int64_t>(pins.micro_batch_size, [&] {
               auto d = divisors(local, 1 << 16);
               return std::vector<std::int64_t>(d.begin(), d.end());
             }())) {
          if (local % mb != 0) {
            continue;
          }
          // Experts split over TP like the MLP (etp 0), or whole on each TP rank (etp 1) with
          // the EP group over the stage's tp·dp·cp ranks.
          std::vector<std::pair<int, int>> expert_layouts; // (etp, ep)
          for (int etp : info.num_experts > 0 && tp > 1 ? pinned_or(pins.etp, {0, 1})
                                                        : std::vector<int>{pins.etp.value_or(0)}) {
            for (int ep :
                 pinned_or(pins.ep, expert_parallel_sizes(info, (etp == 1 ? tp : 1) * dp * cp))) {
              expert_layouts.emplace_back(etp, ep);
            }
          }
          for (auto [schedule, v] : schedules_for(pins, pp, units, local / mb)) {
            for (auto [etp, ep] : expert_layouts) {
              for (CpComm cp_comm : cp_comms) {
                for (int zero :
                     pinned_or(pins.zero_stage,
                               dp * cp > 1 ? std::vector<int>{0, 1, 2, 3} : std::vector<int>{0})) {
                  for (Recompute rc : pinned_or(pins.recompute, recomputes)) {
                    for (bool sp :
                         pinned_or(pins.sequence_parallel, tp > 1 ? std::vector<bool>{false, true}
                                                                  : std::vector<bool>{false})) {
                      Plan p{.dp = dp,
                             .tp = tp,
                             .pp = pp,
                             .ep = ep,
                             .etp = etp,
                             .cp = cp,
                             .cp_comm = cp_comm,
                             .zero_stage = zero,
                             .micro_batch_size = mb,
                             .global_batch_size = req.global_batch_size,
                             .schedule = schedule,
                             .virtual_stages = v,
                             .recompute = rc,
                             .sequence_parallel = sp,
                             .precision = precision,
                             .grad_sync = pins.grad_sync.value_or(GradSync::allreduce),
                             .overlap_grad_reduce = pins.overlap_grad_reduce.value_or(
                                 req.stack.overlaps_grad_reduce(zero)),
                             .stack = req.stack.name};
                      for (const auto& [sync, gc] : reductions_for(pins, p)) {
                        Plan q = p;
                        q.grad_sync = sync;
                        q.grad_compression = gc;
                        q.max_staleness = pins.max_staleness.value_or(q.max_staleness);
                        for (const int servers : server_counts_for(pins, q)) {
                          Plan r = q;
                          r.parameter_servers = servers;
                          // The one feasibility rule (core plan_problem): what is proposed
                          // trains.
                          if (plan_problem(r, graph, gpus)) {
                            continue;
                          }
                          // Replicas on faster devices also tried with more of the batch.
                          Plan shared = r;
                          shared.dp_shares = speed_shares(model, r);
                          consider(st, model, stages, std::move(r), gpus);
                          if (!shared.dp_shares.empty() && !plan_problem(shared, graph, gpus)) {
                            consider(st, model, stages, std::move(shared), gpus);
                          }
                        }
                      }
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

} // namespace

std::string_view objective_name(Objective o) {
  constexpr std::array<std::string_view, 4> kNames = {"throughput", "time_to_train", "cost",
                                                      "goodput"};
  return kNames.at(static_cast<int>(o));
}

void plan_assign_stages(CostModel& model, Plan& plan) {
  StageCache cache;
  plan.stages = cache.get(model, plan);
}

PlanSearchResult plan_search(const LayerGraph& graph, const Cluster& cluster,
                             const PlanRequest& req) {
  if (req.gpus < 1) {
    throw InputError("command line", "--gpus", "a device count >= 1", std::to_string(req.gpus));
  }
  if (req.objective == Objective::cost && !cluster.cost_per_device_hour_usd) {
    throw InputError(cluster.name, "/cost_per_device_hour_usd",
                     "a price per device-hour for --objective cost", "nothing");
  }
  if (req.objective == Objective::time_to_train && !(req.train_tokens > 0)) {
    throw InputError("command line", "--train-tokens",
                     "a token count > 0 for --objective time_to_train", "nothing");
  }
  if (req.objective == Objective::goodput &&
      !(req.gpu_mtbf_hours > 0 && std::isfinite(req.gpu_mtbf_hours))) {
    throw InputError("command line", "--gpu-mtbf-hours",
                     "a finite mean time between failures > 0 hours for --objective goodput",
                     req.gpu_mtbf_hours == 0 ? std::string("nothing")
                                             : fmt::format("{}", req.gpu_mtbf_hours));
  }
  std::vector<int> worlds = {req.gpus};
  if (req.allow_fewer_gpus) {
    const int node = cluster.node.devices_per_node;
    for (int g = req.gpus / 2; g >= 1; g /= 2) {
      if (g < node || g % node == 0) {
        worlds.push_back(g);
      }
    }
  }
  const int keep = std::max(req.top_k, req.simulate_top);
  PlanRequest widened = req;
  widened.top_k = keep;
  SearchState st{widened, {}, 1e300};
  for (int gpus : worlds) {
    search_world(st, graph, cluster, gpus);
  }
  if (req.simulate_top > 0 && !st.result.plans.empty()) {
    auto& plans = st.result.plans;
    const std::size_t n = std::min(plans.size(), static_cast<std::size_t>(req.simulate_top));
    // Each plan's simulation is independent (its own cost model and engine, its own slot of
    // `plans`): the cores share them out, and the result does not depend on their number.
    auto simulate = [&](std::size_t i) {
      RankedPlan& p = plans[i];
      const Cluster sized = cluster.with_devices(p.gpus);
      CostModel model(graph, sized, req.stack); // keeps a pointer: the cluster must outlive it
      SimulationResult sim =
          simulate_iteration(model, p.estimate.plan, {.symmetric = true, .record_timeline = false});
      p.analytic = p.estimate;
      p.estimate = sim.estimate;
      score(req, model, p);
    };
    const std::size_t workers =
        std::min<std::size_t>(n, std::max(1U, std::thread::hardware_concurrency()));
    std::atomic<std::size_t> next{0};
    std::vector<std::exception_ptr> failures(workers);
    auto work = [&](std::size_t w) {
      try {
        for (std::size_t i = next++; i < n; i = next++) {
          simulate(i);
        }
      } catch (...) {
        failures[w] = std::current_exception();
        next = n; // the others stop at their next plan
      }
    };
    std::vector<std::thread> threads;
    for (std::size_t w = 1; w < workers; ++w) {
      threads.emplace_back(work, w);
    }
    work(0);
    for (std::thread& t : threads) {
      t.join();
    }
    for (const std::exception_ptr& f : failures) {
      if (f) {
        std::rethrow_exception(f);
      }
    }
    // Simulated plans first, by their simulated objective; the rest keep the analytic order.
    std::stable_sort(plans.begin(), plans.begin() + static_cast<std::ptrdiff_t>(n),
                     [](const RankedPlan& a, const RankedPlan& b) {
                       return a.objective_value < b.objective_value;
                     });
  }
  if (static_cast<int>(st.result.plans.size()) > req.top_k) {
    st.result.plans.resize(static_cast<std::size_t>(req.top_k));
  }
  if (st.result.plans.empty()) {
    if (st.result.candidates == 0) {
      st.result.no_fit_reason =
          "no plan satisfies the pins and divisibility rules (dp·tp·pp = GPUs, tp dividing the "
          "heads and at most a node, global batch divisible by dp × micro-batch)";
    } else if (st.result.closest) {
      const auto& c = *st.result.closest;
      st.result.no_fit_reason = fmt::format(
          "no plan fits in memory; closest needs {:.1f} GiB per GPU of {:.1f} GiB available "
          "(+{:.0f}%)",
          c.memory.total() / (1 << 30), c.memory_capacity_bytes / (1 << 30),
          (c.memory.total() / c.memory_capacity_bytes - 1) * 100);
    }
  } else {
    st.result.closest.reset();
  }
  return st.result;
}

std::string plan_explain(const RankedPlan& best, const RankedPlan* other) {
  const auto& e = best.estimate;
  const auto& b = e.breakdown;
  const double t = e.iteration_time_s;
  auto pct = [t](double x) { return t > 0 ? 100.0 * x / t : 0.0; };
  std::string out = fmt::format(
      "  step {:.3f} s: compute {:.1f}%, tp comm {:.1f}%, pp comm {:.1f}%, dp comm {:.1f}%, "
      "bubble {:.1f}%, optimizer {:.1f}%; memory {:.1f} GiB (params {:.1f}, grads {:.1f}, "
      "optimizer {:.1f}, activations {:.1f}, buffers {:.1f}, allocator {:.1f}, runtime {:.1f})\n",
      t, pct(b.compute), pct(b.tp_comm), pct(b.pp_comm), pct(b.dp_comm), pct(b.bubble),
      pct(b.optimizer), e.memory.total() / (1 << 30), e.memory.params / (1 << 30),
      e.memory.grads / (1 << 30), e.memory.optimizer / (1 << 30), e.memory.activations / (1 << 30),
      e.memory.buffers / (1 << 30), e.memory.allocator / (1 << 30), e.memory.runtime / (1 << 30));
  if (best.goodput) {
    out += goodput_explain(*best.goodput, e.tokens_per_s);
  }
  if (other == nullptr) {
    return out;
  }
  const auto& o = other->estimate.breakdown;
  const std::array<std::tuple<const char*, double, double>, 6> parts = {{
      {"compute", b.compute, o.compute},
      {"tp comm", b.tp_comm, o.tp_comm},
      {"pp comm", b.pp_comm, o.pp_comm},
      {"dp comm", b.dp_comm, o.dp_comm},
      {"bubble", b.bubble, o.bubble},
      {"optimizer", b.optimizer, o.optimizer},
  }};
  std::string worse;
  for (const auto& [name, mine, theirs] : parts) {
    if (theirs - mine > 0.005 * t) {
      worse += fmt::format("{}{} +{:.3f} s", worse.empty() ? "" : ", ", name, theirs - mine);
    }
  }
  out += fmt::format("  the next plan is {:.1f}% slower{}{}\n",
                     100.0 * (other->estimate.iteration_time_s / t - 1.0),
                     worse.empty() ? "" : ": ", worse);
  return out;
}

} // namespace parallax
