// `parallax export`: pictures of a plan — its layer graph or device mesh as DOT or SVG, its
// simulated timeline as an SVG Gantt chart, or everything in one self-contained HTML report.
#include "commands.hpp"

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/exporters/launch_config.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/planner/uncertainty.hpp"
#include "parallax/simulator/iteration_simulator.hpp"
#include "parallax/simulator/what_if.hpp"
#include "parallax/viz/graphviz_render.hpp"
#include "parallax/viz/layer_graph_dot.hpp"
#include "parallax/viz/mesh_dot.hpp"
#include "parallax/viz/report_html.hpp"
#include "parallax/viz/timeline_svg.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <iostream>
#include <memory>

namespace parallax::cli {

namespace {

struct ExportFlags {
  std::string model, cluster, plan, format, out, stack;
  std::string view = "graph";
  int gpus = 0;
  std::int64_t global_batch = 0;
  int top = 10;
  bool expand = false;
  bool uncertainty = false;
  std::string straggler, slow_link; // what-ifs shown beside the healthy plan (html)
};

// The search behind the report's table and scatter.
PlanSearchResult search_for_report(const LoadedModel& model, const Cluster& cluster,
                                   const Stack& stack, int gpus, std::int64_t global_batch,
                                   int top) {
  PlanRequest req;
  req.stack = stack;
  req.gpus = gpus;
  req.global_batch_size = global_batch;
  req.top_k = top;
  req.simulate_top = top;
  req.record_points = true;
  return plan_search(model.graph, cluster, req);
}

std::string dot_for_view(const ExportFlags& f, const LoadedModel& model, const Cluster& cluster,
                         const Plan& plan) {
  if (f.view == "graph") {
    return viz::layer_graph_dot(model.graph, plan, {.expand_blocks = f.expand});
  }
  if (f.view == "mesh") {
    return viz::mesh_dot(plan, cluster, {.expand = f.expand});
  }
  throw InputError("command line", "--view", "\"graph\" or \"mesh\" with --format dot",
                   fmt::format("\"{}\" (timelines are SVG, HTML or the Chrome trace of `simulate "
                               "--trace`)",
                               f.view));
}

std::string html_report(const ExportFlags& f, const LoadedModel& model, const Cluster& cluster,
                        CostModel& cost, const Plan& plan, PlanSearchResult search) {
  viz::ReportInput in;
  in.title = fmt::format("Parallax plan for {}", model.graph.info().name);
  in.context = fmt::format("{} on {} ({}), {}, global batch {}", model.graph.info().name,
                           devices_label(cluster, cluster.num_devices()), cluster.name,
                           stack_line(cost.stack()), plan.global_batch_size);
  in.memory_capacity_bytes = cost.memory_capacity_bytes();
  bool listed = false;
  std::vector<StepUncertainty> spread;
  if (f.uncertainty) {
    spread = plan_uncertainty(model.graph, cluster, cost.stack(), search.plans, 200);
  }
  for (const RankedPlan& p : search.plans) {
    const bool chosen = p.estimate.plan == plan;
    listed = listed || chosen;
    in.plans.push_back({.estimate = p.estimate,
                        .gpus = p.gpus,
                        .chosen = chosen,
                        .simulated = p.analytic.has_value()});
    if (!spread.empty()) {
      const StepUncertainty& u = spread[in.plans.size() - 1];
      in.plans.back().p10_s = u.p10_s;
      in.plans.back().p90_s = u.p90_s;
      in.plans.back().p_best = u.p_best;
    }
  }
  const SimulationResult sim = simulate_iteration(cost, plan, {.symmetric = true});
  if (!listed) {
    in.plans.push_back(
        {.estimate = sim.estimate, .gpus = plan.world_size(), .chosen = true, .simulated = true});
  }
  for (const PlanPoint& p : search.points) {
    int rank = -1;
    for (std::size_t i = 0; i < search.plans.size(); ++i) {
      if (search.plans[i].estimate.plan == p.plan) {
        rank = static_cast<int>(i) + 1;
      }
    }
    in.candidates.push_back({.tokens_per_s = p.tokens_per_s,
                             .memory_bytes = p.memory_bytes,
                             .rank_in_table = rank,
                             .chosen = p.plan == plan});
  }
  in.chosen = sim.estimate;
  for (const auto& [text, straggler] :
       {std::pair{f.straggler, true}, std::pair{f.slow_link, false}}) {
    if (text.empty())
      continue;
    const Degradation d =
        straggler ? parse_straggler(text, "--straggler") : parse_slow_link(text, "--slow-link");
    const Cluster degraded = degraded_cluster(cluster, d);
    CostModel slow(model.graph, degraded, cost.stack());
    in.what_ifs.push_back(
        {.label = degradation_label(d),
         .estimate = simulate_iteration(slow, plan, {.symmetric = true}).estimate});
  }
  in.timelines.emplace_back("simulated (one rank per pipeline stage)",
                            viz::timeline_svg(sim.timeline, {.title = plan_label(plan)}));
  in.layer_graph_svg = viz::dot_to_svg(
      viz::layer_graph_dot(model.graph, plan, {.expand_blocks = f.expand}), "layer graph");
  in.mesh_svg = viz::dot_to_svg(viz::mesh_dot(plan, cluster, {.expand = f.expand}), "mesh");
  return viz::report_html(in);
}

int run_export(const ExportFlags& f) {
  LoadedModel model = model_load(f.model);
  Cluster cluster = cluster_load(f.cluster);
  if (f.gpus > 0) {
    cluster = cluster.with_devices(f.gpus);
  }
  Plan plan;
  Stack stack;
  std::optional<PlanSearchResult> search;
  if (!f.plan.empty()) {
    plan = plan_load_on_stack(f.plan, f.stack, model, cluster, f.gpus, stack);
  } else {
    stack = stack_for(f.stack, cluster);
    model_apply_stack(model, stack);
    const std::int64_t batch = f.global_batch > 0 ? f.global_batch : 512;
    search = search_for_report(model, cluster, stack, cluster.num_devices(), batch, f.top);
    if (search->plans.empty()) {
      std::cerr << "parallax export: " << search->no_fit_reason << "\n";
      return 4;
    }
    plan = search->plans.front().estimate.plan;
    cluster = cluster.with_devices(search->plans.front().gpus);
  }
  CostModel cost(model.graph, cluster, stack);
  if (plan.stages.empty()) {
    plan_assign_stages(cost, plan);
  }
  const std::filesystem::path out(f.out);
  if (auto launch = enum_from_name<LaunchFormat>(kLaunchFormatNames, f.format)) {
    // A launch configuration; slurm and mpijob also need the plan beside them.
    std::filesystem::path plan_path = out;
    plan_path.replace_extension(".plan.json");
    LaunchInput li{.plan = &plan,
                   .model = &model.graph.info(),
                   .cluster = &cluster,
                   .source = f.plan.empty() ? std::string("the planner's plan") : f.plan,
                   .model_arg = f.model,
                   .plan_path = plan_path.filename().string()};
    const std::string text = launch_config(*launch, li);
    if (*launch == LaunchFormat::slurm) {
      json_write_file(plan_path, plan_to_json(plan));
    }
    text_write_file(out, text);
    if (*launch == LaunchFormat::deepspeed) {
      const NodeLayout n = node_layout(plan, cluster);
      std::cerr << fmt::format("parallax export: launch with: deepspeed --num_nodes {} "
                               "--num_gpus {} train.py --deepspeed --deepspeed_config {}\n",
                               n.nodes, n.per_node, out.filename().string());
    }
    std::cerr << fmt::format("parallax export: wrote {} ({}) for {}\n", f.out, f.format,
                             plan_label(plan));
    return 0;
  }
  if (f.format == "dot") {
    text_write_file(out, dot_for_view(f, model, cluster, plan));
  } else if (f.format == "svg") {
    if (f.view == "timeline") {
      const SimulationResult sim = simulate_iteration(cost, plan, {.symmetric = true});
      text_write_file(out, viz::timeline_svg(sim.timeline, {.title = plan_label(plan)}));
    } else {
      const std::string dot = dot_for_view(f, model, cluster, plan);
      std::filesystem::path dot_path = out;
      dot_path.replace_extension(".dot");
      if (dot_path != out) {
        text_write_file(dot_path, dot);
      }
      text_write_file(out, viz::dot_to_svg(dot, f.view));
    }
  } else {
    if (!search) {
      search = search_for_report(model, cluster, stack, cluster.num_devices(),
                                 plan.global_batch_size, f.top);
    }
    text_write_file(out, html_report(f, model, cluster, cost, plan, std::move(*search)));
  }
  std::cerr << fmt::format("parallax export: wrote {} ({}) for {}\n", f.out,
                           f.format == "html" ? "report" : f.view, plan_label(plan));
  return 0;
}

} // namespace

Run register_export(CLI::App& app) {
  auto f = std::make_shared<ExportFlags>();
  auto* cmd = app.add_subcommand(
      "export",
      "Export a plan's layer graph, device mesh or timeline (DOT, SVG) or an HTML report");
  add_model_cluster(cmd, f->model, f->cluster, f->gpus);
  cmd->add_option("--plan", f->plan, "Plan JSON (default: the planner's best plan)");
  cmd->add_option("--format", f->format,
                  "dot, svg or html; or a launch configuration: megatron, torchtitan, deepspeed, "
                  "slurm, mpijob")
      ->required()
      ->check(CLI::IsMember(
          {"dot", "svg", "html", "megatron", "torchtitan", "deepspeed", "slurm", "mpijob"}));
  cmd->add_option("--out", f->out, "File to write (with svg, the DOT source goes next to it)")
      ->required();
  cmd->add_option("--view", f->view, "graph (default), mesh or timeline (svg only)")
      ->check(CLI::IsMember({"graph", "mesh", "timeline"}));
  cmd->add_flag("--expand", f->expand,
                "Draw every layer and every GPU instead of folding repeated blocks and replicas");
  cmd->add_option("--global-batch", f->global_batch,
                  "Global batch for the search when no --plan is given (default 512)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--uncertainty", f->uncertainty,
                "html: each ranked plan's 80% step-time interval and chance of being fastest");
  cmd->add_option("--straggler", f->straggler,
                  "html: show the chosen plan with GPU RANK FACTOR times slower (RANK:FACTOR)");
  cmd->add_option("--slow-link", f->slow_link,
                  "html: show the chosen plan with node NODE's link FACTOR times slower");
  cmd->add_option("--top", f->top, "Plans in the report's table (default 10)")
      ->check(CLI::PositiveNumber);
  add_stack(cmd, f->stack);
  return [f]() { return run_export(*f); };
}

} // namespace parallax::cli
