// `parallax plan` and `parallax simulate`.
#include "commands.hpp"

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/core/timeline_json.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/hardware_profiles/stack_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/planner/uncertainty.hpp"
#include "parallax/simulator/cost_model.hpp"
#include "parallax/simulator/iteration_simulator.hpp"

#include <fmt/format.h>

#include <array>
#include <iostream>
#include <memory>

namespace parallax::cli {

namespace {

template <class Enum, std::size_t N>
std::optional<Enum> parse_choice(const std::string& flag, const std::string& value,
                                 const std::array<std::string_view, N>& names) {
  if (value.empty()) {
    return std::nullopt;
  }
  if (auto parsed = enum_from_name<Enum>(names, value)) {
    return parsed;
  }
  std::string allowed;
  for (auto n : names) {
    allowed += fmt::format("{}\"{}\"", allowed.empty() ? "" : ", ", n);
  }
  throw InputError("command line", flag, "one of " + allowed, fmt::format("\"{}\"", value));
}

struct PlanFlags {
  std::string model;
  std::string cluster;
  int gpus = 0;
  std::int64_t global_batch = 0;
  int top = 10;
  bool json = false;
  bool explain = false;
  std::string out;
  int tp = 0, pp = 0, dp = 0, ep = 0, cp = 0, zero = -1, virtual_stages = 0;
  int etp = -1;
  std::string cp_comm;
  std::int64_t micro_batch = 0;
  std::string schedule, recompute, sequence_parallel, precision, grad_sync, overlap_grad_reduce;
  std::string grad_compression;
  int max_staleness = -1;
  int parameter_servers = -1;
  std::string objective = "throughput";
  std::string stack;
  double train_tokens = 0;
  double gpu_mtbf_hours = 0;
  bool uncertainty = false;
  int samples = 200;
  bool allow_fewer = false;
  int simulate_top = 20;
};

PlanPins pins_from(const PlanFlags& f) {
  PlanPins p;
  if (f.tp > 0)
    p.tp = f.tp;
  if (f.pp > 0)
    p.pp = f.pp;
  if (f.dp > 0)
    p.dp = f.dp;
  if (f.ep > 0)
    p.ep = f.ep;
  if (f.cp > 0)
    p.cp = f.cp;
  if (f.etp >= 0)
    p.etp = f.etp;
  p.cp_comm = parse_choice<CpComm>("--cp-comm", f.cp_comm, kCpCommNames);
  if (f.zero >= 0)
    p.zero_stage = f.zero;
  if (f.micro_batch > 0)
    p.micro_batch_size = f.micro_batch;
  if (f.virtual_stages > 0)
    p.virtual_stages = f.virtual_stages;
  p.schedule = parse_choice<Schedule>("--schedule", f.schedule, kScheduleNames);
  p.recompute = parse_choice<Recompute>("--recompute", f.recompute, kRecomputeNames);
  p.precision = parse_choice<Precision>("--precision", f.precision, kPrecisionNames);
  if (f.grad_sync == "auto") {
    p.search_grad_sync = true;
  } else {
    p.grad_sync = parse_choice<GradSync>("--grad-sync", f.grad_sync, kGradSyncNames);
  }
  if (f.max_staleness >= 0)
    p.max_staleness = f.max_staleness;
  if (f.parameter_servers >= 0)
    p.parameter_servers = f.parameter_servers;
  if (f.grad_compression == "auto") {
    p.search_compression = true;
  } else if (!f.grad_compression.empty()) {
    std::string why;
    p.grad_compression = grad_compression_parse(f.grad_compression, &why);
    if (!p.grad_compression) {
      throw InputError("command line", "--grad-compression", why + ", or \"auto\" (search)",
                       f.grad_compression);
    }
  }
  if (!f.sequence_parallel.empty()) {
    auto sp = parse_choice<int>("--sequence-parallel", f.sequence_parallel,
                                std::array<std::string_view, 2>{"off", "on"});
    p.sequence_parallel = *sp == 1;
  }
  if (!f.overlap_grad_reduce.empty()) {
    auto on = parse_choice<int>("--overlap-grad-reduce", f.overlap_grad_reduce,
                                std::array<std::string_view, 2>{"off", "on"});
    p.overlap_grad_reduce = *on == 1;
  }
  return p;
}

} // namespace

std::string gib(double bytes) {
  return fmt::format("{:.1f}", bytes / (1 << 30));
}

namespace {

void print_table(const PlanSearchResult& r, std::ostream& out) {
  out << fmt::format("{:>3}  {:<58} {:>10} {:>12} {:>6} {:>9}  {}\n", "#", "plan", "step s",
                     "tokens/s", "MFU", "mem GiB", "bottleneck");
  for (std::size_t i = 0; i < r.plans.size(); ++i) {
    const auto& e = r.plans[i].estimate;
    out << fmt::format("{:>3}  {:<58} {:>10.3f} {:>12.0f} {:>5.1f}% {:>9}  {}\n", i + 1,
                       plan_label(e.plan), e.iteration_time_s, e.tokens_per_s, 100 * e.mfu,
                       gib(e.memory.total()), e.bottleneck);
  }
}

int run_plan(const PlanFlags& f) {
  LoadedModel model = model_load(f.model);
  Cluster cluster = cluster_load(f.cluster);
  PlanRequest req;
  req.gpus = f.gpus > 0 ? f.gpus : cluster.num_devices();
  req.global_batch_size = f.global_batch > 0 ? f.global_batch : 512;
  req.pins = pins_from(f);
  req.objective = *parse_choice<Objective>(
      "--objective", f.objective,
      std::array<std::string_view, 4>{"throughput", "time_to_train", "cost", "goodput"});
  req.train_tokens = f.train_tokens;
  req.gpu_mtbf_hours = f.gpu_mtbf_hours;
  req.allow_fewer_gpus = f.allow_fewer;
  req.top_k = std::max(f.top, 2);
  req.simulate_top = f.simulate_top;
  req.stack = stack_for(f.stack, cluster);
  model_apply_stack(model, req.stack);
  PlanSearchResult r = plan_search(model.graph, cluster, req);
  if (r.plans.empty()) {
    std::cerr << "parallax plan: " << r.no_fit_reason << "\n";
    if (r.closest) {
      std::cerr << "  closest: " << plan_label(r.closest->plan) << "\n";
    }
    if (f.json) {
      Json doc = {{"plans", Json::array()}, {"reason", r.no_fit_reason}};
      if (r.closest) {
        doc["closest"] = estimate_to_json(*r.closest);
      }
      std::cout << doc.dump(2) << "\n";
    }
    return 4;
  }
  if (!f.out.empty()) {
    json_write_file(f.out, plan_to_json(r.plans.front().estimate.plan));
  }
  r.plans.resize(std::min<std::size_t>(r.plans.size(), static_cast<std::size_t>(f.top)));
  std::vector<StepUncertainty> spread;
  if (f.uncertainty) {
    spread = plan_uncertainty(model.graph, cluster, req.stack, r.plans, f.samples);
  }
  if (f.json) {
    Json plans = Json::array();
    for (const auto& p : r.plans) {
      Json entry = estimate_to_json(p.estimate);
      entry["gpus"] = p.gpus;
      entry["objective"] = {{"name", objective_name(req.objective)}, {"value", p.objective_value}};
      if (!spread.empty()) {
        const StepUncertainty& u = spread[plans.size()];
        entry["step_time_p10_s"] = u.p10_s;
        entry["step_time_p90_s"] = u.p90_s;
        entry["p_best"] = u.p_best;
      }
      if (p.goodput) {
        const Goodput& g = *p.goodput;
        entry["goodput_tokens_per_s"] = g.goodput_tokens_per_s;
        entry["goodput_fraction"] = g.efficiency;
        entry["checkpoint_interval_s"] = g.interval_s;
        entry["checkpoint_write_s"] = g.checkpoint.write_s;
        entry["checkpoint_blocking_s"] = g.checkpoint.blocking_s;
        entry["checkpoint_bytes"] = g.checkpoint.bytes;
        entry["restart_s"] = g.checkpoint.restart_s;
        entry["job_mtbf_s"] = g.job_mtbf_s;
      }
      plans.push_back(entry);
    }
    std::cout << Json{{"plans", plans},
                      {"stack", req.stack.name},
                      {"candidates", r.candidates},
                      {"pruned_memory", r.pruned_memory},
                      {"evaluated", r.evaluated}}
                     .dump(2)
              << "\n";
    return 0;
  }
  std::cout << fmt::format("{} on {} ({}), {}, global batch {}: {} candidates, {} pruned "
                           "by memory, {} timed\n",
                           model.graph.info().name, devices_label(cluster, req.gpus), cluster.name,
                           stack_line(req.stack), req.global_batch_size, r.candidates,
                           r.pruned_memory, r.evaluated);
  print_table(r, std::cout);
  if (!spread.empty()) {
    const Uncertainty& u = cluster.uncertainty;
    std::cout << fmt::format("\nstep time, 80% interval over {} draws (spreads: compute {:.0f}%, "
                             "bandwidth {:.0f}%, kernel overhead {:.0f}%):\n",
                             f.samples, 100 * u.gemm_efficiency, 100 * u.bandwidth,
                             100 * u.kernel_overhead);
    for (std::size_t i = 0; i < r.plans.size(); ++i) {
      std::cout << fmt::format("{:>3}  {:.3f} s  [{:.3f}, {:.3f}]  fastest in {:.0f}% of draws\n",
                               i + 1, r.plans[i].estimate.iteration_time_s, spread[i].p10_s,
                               spread[i].p90_s, 100 * spread[i].p_best);
    }
  }
  if (req.objective == Objective::goodput) {
    std::cout << "\ngoodput (--gpu-mtbf-hours " << f.gpu_mtbf_hours << "):\n";
    for (std::size_t i = 0; i < r.plans.size(); ++i) {
      const Goodput& g = *r.plans[i].goodput;
      std::cout << fmt::format("{:>3}  {:>12.0f} tokens/s ({:.1f}%), checkpoint every {:.0f} s, "
                               "{:.1f} s to write, job MTBF {:.2f} h\n",
                               i + 1, g.goodput_tokens_per_s, 100 * g.efficiency, g.interval_s,
                               g.checkpoint.write_s, g.job_mtbf_s / 3600);
    }
  }
  if (f.explain) {
    std::cout << "\nwhy:\n";
    const std::size_t shown = std::min<std::size_t>(3, r.plans.size());
    for (std::size_t i = 0; i < shown; ++i) {
      std::cout << fmt::format("#{} {}\n", i + 1, plan_label(r.plans[i].estimate.plan));
      std::cout << plan_explain(r.plans[i], i + 1 < r.plans.size() ? &r.plans[i + 1] : nullptr);
    }
  }
  return 0;
}

} // namespace

void add_model_cluster(CLI::App* cmd, std::string& model, std::string& cluster, int& gpus) {
  cmd->add_option("--model", model, "Zoo model name or model / HF config / layer-graph JSON")
      ->required();
  cmd->add_option("--cluster", cluster, "Zoo cluster name or cluster profile JSON")->required();
  cmd->add_option("--gpus", gpus, "Number of GPUs (num_nodes = N / devices_per_node)")
      ->check(CLI::PositiveNumber);
}

void add_stack(CLI::App* cmd, std::string& stack) {
  cmd->add_option("--stack", stack,
                  "Software stack: zoo name (megatron-core, megatron-lm-legacy, "
                  "megatron-deepspeed, deepspeed, pytorch-fsdp, torchtitan, llm.c, parallax) or "
                  "stack JSON; default: the plan's, else parallax on CPU and megatron-core on GPU "
                  "profiles");
}

Stack stack_for(const std::string& flag, const Cluster& cluster, const std::string& recorded) {
  if (!flag.empty()) {
    return stack_load(flag);
  }
  if (!recorded.empty()) {
    return stack_load(recorded);
  }
  return stack_load(stack_default_name(cluster));
}

std::string stack_line(const Stack& stack) {
  return fmt::format("stack {}", stack.name);
}

Plan plan_load_on_stack(const std::string& file, const std::string& stack_flag, LoadedModel& model,
                        Cluster& cluster, int gpus, Stack& stack) {
  const Json doc = json_load_file(file);
  Plan plan = plan_from_json(doc, file);
  if (gpus <= 0 && plan.world_size() != cluster.num_devices()) {
    cluster = cluster.with_devices(plan.world_size());
  }
  plan_validate(plan, model.graph, cluster.num_devices(), file);
  cluster.peak_flops(plan.precision); // InputError when the profile lacks the precision
  stack = stack_for(stack_flag, cluster, plan.stack);
  model_apply_stack(model, stack);
  if (!doc.contains("overlap_grad_reduce")) { // a stated timing overrides the stack's
    plan.overlap_grad_reduce = stack.overlaps_grad_reduce(plan.zero_stage);
  }
  plan.stack = stack.name;
  return plan;
}

Run register_plan(CLI::App& app) {
  auto f = std::make_shared<PlanFlags>();
  auto* cmd = app.add_subcommand("plan", "Search parallel plans for a model on a cluster");
  add_model_cluster(cmd, f->model, f->cluster, f->gpus);
  cmd->add_option("--global-batch", f->global_batch, "Global batch size in sequences (default 512)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--top", f->top, "How many plans to show (default 10)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--json", f->json, "Print the ranked plans as JSON");
  cmd->add_flag("--explain", f->explain, "Explain where time goes and why the runner-up loses");
  cmd->add_option("--out", f->out, "Write the best plan to this file");
  cmd->add_option("--tp", f->tp, "Pin tensor-parallel size")->check(CLI::PositiveNumber);
  cmd->add_option("--pp", f->pp, "Pin pipeline-parallel size")->check(CLI::PositiveNumber);
  cmd->add_option("--dp", f->dp, "Pin data-parallel size")->check(CLI::PositiveNumber);
  cmd->add_option("--ep", f->ep,
                  "Pin expert-parallel size (mixture-of-experts models; divides dp and the "
                  "experts)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--etp", f->etp,
                  "Pin expert tensor parallelism: 0 (experts split over tp like the MLP) or 1 "
                  "(whole experts per TP rank; needs sequence parallelism)")
      ->check(CLI::IsMember({0, 1}));
  cmd->add_option("--cp", f->cp,
                  "Pin context-parallel size (each sequence split over cp ranks in 2·cp chunks)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--cp-comm", f->cp_comm,
                  "Pin how context-parallel ranks exchange K/V: p2p (ring), all_gather");
  cmd->add_option("--zero", f->zero, "Pin ZeRO stage")->check(CLI::Range(0, 3));
  cmd->add_option("--micro-batch", f->micro_batch, "Pin micro-batch size")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--schedule", f->schedule, "Pin schedule: gpipe, 1f1b, interleaved");
  cmd->add_option("--virtual-stages", f->virtual_stages, "Pin virtual stages (interleaved)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--recompute", f->recompute, "Pin recomputation: none, selective, full");
  cmd->add_option("--sequence-parallel", f->sequence_parallel, "Pin sequence parallel: on, off");
  cmd->add_option("--precision", f->precision, "Pin precision: fp32, tf32, fp16, bf16, fp8");
  cmd->add_option("--grad-sync", f->grad_sync,
                  "Gradient sync: allreduce, tree, hierarchical, parameter_server, "
                  "parameter_server_async; or auto (try them all)");
  cmd->add_option("--max-staleness", f->max_staleness,
                  "The asynchronous parameter server's bound: steps a worker may run ahead of "
                  "its parameters (default 1; 0 is the synchronous result)")
      ->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--parameter-servers", f->parameter_servers,
                  "Pin dedicated parameter-server processes for parameter-server plans (0: "
                  "shards co-located with the workers; unpinned, --grad-sync auto also tries "
                  "dp/4, dp/2 and dp)")
      ->check(CLI::Range(0, 1 << 16));
  cmd->add_option("--grad-compression", f->grad_compression,
                  "Pin gradient compression: none, bf16, topk:<fraction>, powersgd:<rank>; or "
                  "auto (also try bf16, powersgd:4, topk:0.01; lossy, so never by default)");
  cmd->add_option("--overlap-grad-reduce", f->overlap_grad_reduce,
                  "Whether the training stack overlaps gradient reduction with the backward "
                  "pass: on (default), off");
  cmd->add_option("--objective", f->objective,
                  "throughput (default), time_to_train, cost, goodput (with --gpu-mtbf-hours)");
  cmd->add_flag("--uncertainty", f->uncertainty,
                "Monte-Carlo over the profile's uncertain inputs: each plan's 10th-90th "
                "percentile step time and the probability that it is the fastest shown");
  cmd->add_option("--samples", f->samples, "Draws for --uncertainty (default 200)")
      ->check(CLI::Range(1, 100000));
  cmd->add_option("--gpu-mtbf-hours", f->gpu_mtbf_hours,
                  "One GPU's mean time between failures, with its share of the host (hours; the "
                  "job's is this / GPUs), for --objective goodput");
  cmd->add_option("--train-tokens", f->train_tokens, "Tokens to train, for time_to_train");
  cmd->add_flag("--allow-fewer-gpus", f->allow_fewer, "Also consider using fewer GPUs");
  add_stack(cmd, f->stack);
  cmd->add_option("--simulate-top", f->simulate_top,
                  "Re-rank this many best plans with the discrete-event simulator (default 20)")
      ->check(CLI::NonNegativeNumber);
  return [f]() { return run_plan(*f); };
}

} // namespace parallax::cli
