// `parallax simulate`: one plan's predicted step time, throughput and memory, and what-ifs
// beside it: a straggler GPU, a slow node link (simulator/what_if.hpp), or GPUs lost and the
// plan re-made on the survivors.
#include "commands.hpp"
#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/core/timeline_json.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/simulator/cost_model.hpp"
#include "parallax/simulator/estimate.hpp"
#include "parallax/simulator/iteration_simulator.hpp"
#include "parallax/simulator/what_if.hpp"

#include <fmt/format.h>

#include <iostream>
#include <memory>

namespace parallax::cli {

namespace {

struct SimulateFlags {
  std::string model, cluster, plan, trace, stack;
  int gpus = 0;
  bool json = false;
  bool analytic = false;
  std::string straggler, slow_link;
  int lose_gpus = 0;
};

PlanEstimate estimate_on(const LoadedModel& model, const Cluster& cluster, const Stack& stack,
                         const Plan& plan, bool analytic, const std::string& trace) {
  CostModel cost(model.graph, cluster, stack);
  if (analytic) {
    return cost.estimate(plan);
  }
  SimulationResult sim =
      simulate_iteration(cost, plan, {.symmetric = true, .record_timeline = !trace.empty()});
  if (!trace.empty()) {
    json_write_file(trace, timeline_to_chrome_trace(sim.timeline));
  }
  return sim.estimate;
}

std::string estimate_line(const PlanEstimate& e) {
  return fmt::format("iteration {:.4f} s, {:.0f} tokens/s, {:.1f} TFLOP/s per GPU, MFU {:.1f}%, "
                     "memory {} GiB allocated, {} GiB reserved, {} GiB on the device of {} "
                     "GiB{}",
                     e.iteration_time_s, e.tokens_per_s, e.tflops_per_gpu, 100 * e.mfu,
                     gib(e.memory.allocated()), gib(e.memory.reserved()), gib(e.memory.total()),
                     gib(e.memory_capacity_bytes), e.fits ? "" : " (DOES NOT FIT)");
}

// The survivors of losing `k` of `gpus`: whole nodes once more than one (a node with a failed
// GPU is drained), else the GPUs left in the one node.
int survivors_of(const Cluster& c, int gpus, int k) {
  if (k <= 0 || k >= gpus) {
    throw InputError(
        "command line", "--lose-gpus",
        fmt::format("a count in [1, {}] (fewer than the plan's {} GPUs)", gpus - 1, gpus),
        std::to_string(k));
  }
  const int per_node = c.node.devices_per_node;
  if (gpus <= per_node) {
    return gpus - k;
  }
  const int lost_nodes = (k + per_node - 1) / per_node;
  const int left = gpus - lost_nodes * per_node;
  if (left <= 0) {
    throw InputError("command line", "--lose-gpus",
                     fmt::format("fewer GPUs than the {} of the nodes but one", gpus - per_node),
                     std::to_string(k));
  }
  return left;
}

int run_simulate(const SimulateFlags& f) {
  LoadedModel model = model_load(f.model);
  Cluster cluster = cluster_load(f.cluster);
  if (f.gpus > 0) {
    cluster = cluster.with_devices(f.gpus);
  }
  Degradation what_if;
  if (!f.straggler.empty()) {
    what_if = parse_straggler(f.straggler, "--straggler");
  }
  if (!f.slow_link.empty()) {
    const Degradation link = parse_slow_link(f.slow_link, "--slow-link");
    what_if.slow_node = link.slow_node;
    what_if.link_factor = link.link_factor;
  }
  if (!f.trace.empty() && f.analytic) {
    throw InputError("command line", "--trace", "no --analytic (traces come from the simulator)",
                     "both");
  }
  Stack stack;
  Plan plan = plan_load_on_stack(f.plan, f.stack, model, cluster, f.gpus, stack);
  const Cluster degraded = what_if.any() ? degraded_cluster(cluster, what_if) : cluster;
  const int survivors =
      f.lose_gpus != 0 ? survivors_of(cluster, cluster.num_devices(), f.lose_gpus) : 0;
  {
    // The healthy plan's stages, kept in every what-if: the plan as it was made.
    CostModel cost(model.graph, cluster, stack);
    if (plan.stages.empty()) {
      plan_assign_stages(cost, plan);
    }
  }
  const PlanEstimate e = estimate_on(model, cluster, stack, plan, f.analytic, f.trace);
  std::optional<PlanEstimate> slowed;
  if (what_if.any()) {
    slowed = estimate_on(model, degraded, stack, plan, f.analytic, "");
  }
  std::optional<PlanEstimate> replanned;
  std::string replan_reason;
  if (survivors > 0) {
    PlanRequest req;
    req.gpus = survivors;
    req.global_batch_size = plan.global_batch_size;
    req.pins.precision = plan.precision;
    req.stack = stack;
    req.top_k = 1;
    const Cluster left = cluster.with_devices(survivors);
    PlanSearchResult r = plan_search(model.graph, left, req);
    if (r.plans.empty()) {
      replan_reason = r.no_fit_reason;
    } else {
      replanned = estimate_on(model, left, stack, r.plans.front().estimate.plan, f.analytic, "");
    }
  }
  if (f.json) {
    Json doc = estimate_to_json(e);
    if (slowed) {
      Json w = estimate_to_json(*slowed);
      w["what_if"] = degradation_label(what_if);
      w["slowdown"] = slowed->iteration_time_s / e.iteration_time_s;
      doc["what_if"] = w;
    }
    if (survivors > 0) {
      Json l = {{"lost_gpus", f.lose_gpus}, {"gpus", survivors}};
      if (replanned) {
        l["estimate"] = estimate_to_json(*replanned);
        l["slowdown"] = replanned->iteration_time_s / e.iteration_time_s;
      } else {
        l["reason"] = replan_reason;
      }
      doc["lose_gpus"] = l;
    }
    std::cout << doc.dump(2) << "\n";
    return survivors > 0 && !replanned ? 4 : 0;
  }
  std::cout << fmt::format("{} on {}, {}: {}\n", model.graph.info().name,
                           devices_label(cluster, cluster.num_devices()), stack_line(stack),
                           plan_label(plan));
  std::cout << "  " << estimate_line(e) << "\n";
  std::cout << plan_explain(RankedPlan{.estimate = e, .gpus = cluster.num_devices()}, nullptr);
  if (slowed) {
    std::cout << fmt::format("what-if, {}: {:.2f}x the healthy step\n  {}\n",
                             degradation_label(what_if),
                             slowed->iteration_time_s / e.iteration_time_s, estimate_line(*slowed));
    std::cout << plan_explain(RankedPlan{.estimate = *slowed, .gpus = cluster.num_devices()},
                              nullptr);
  }
  if (survivors > 0) {
    if (!replanned) {
      std::cout << fmt::format("losing {} GPUs: no plan on the {} left: {}\n", f.lose_gpus,
                               survivors, replan_reason);
      return 4;
    }
    std::cout << fmt::format("losing {} GPUs: re-planned on {}: {}, {:.2f}x the healthy step\n  "
                             "{}\n",
                             f.lose_gpus, survivors, plan_label(replanned->plan),
                             replanned->iteration_time_s / e.iteration_time_s,
                             estimate_line(*replanned));
  }
  return 0;
}

} // namespace

Run register_simulate(CLI::App& app) {
  auto f = std::make_shared<SimulateFlags>();
  auto* cmd = app.add_subcommand("simulate", "Predict one plan's step time, throughput and memory");
  add_model_cluster(cmd, f->model, f->cluster, f->gpus);
  cmd->add_option("--plan", f->plan, "Plan JSON")->required();
  cmd->add_option("--trace", f->trace, "Write the simulated timeline (Chrome trace JSON)");
  cmd->add_flag("--json", f->json, "Print the figures as JSON");
  cmd->add_flag("--analytic", f->analytic,
                "Use the analytic cost model instead of the discrete-event simulation");
  cmd->add_option("--straggler", f->straggler,
                  "What-if: GPU RANK runs FACTOR times slower (RANK:FACTOR, e.g. 3:1.5)");
  cmd->add_option("--slow-link", f->slow_link,
                  "What-if: node NODE's network link is FACTOR times slower (NODE:FACTOR)");
  cmd->add_option("--lose-gpus", f->lose_gpus,
                  "What-if: K GPUs fail; re-plan on the survivors (whole nodes) and compare");
  add_stack(cmd, f->stack);
  return [f]() { return run_simulate(*f); };
}

} // namespace parallax::cli
