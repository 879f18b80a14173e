// `parallax calibrate` and `parallax compare`: measure this machine into a profile, then run
// plans for real and set each measured step against the simulator's prediction.
#include "commands.hpp"

#include "parallax/core/cluster_json.hpp"
#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/core/timeline_json.hpp"
#include "parallax/executor/comm.hpp"
#include "parallax/hardware_profiles/calibrate.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/simulator/cost_model.hpp"
#include "parallax/simulator/iteration_simulator.hpp"
#include "parallax/simulator/timeline_breakdown.hpp"
#include "parallax/viz/graphviz_render.hpp"
#include "parallax/viz/layer_graph_dot.hpp"
#include "parallax/viz/mesh_dot.hpp"
#include "parallax/viz/report_html.hpp"
#include "parallax/viz/timeline_svg.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sys/wait.h>
#include <unistd.h>

namespace parallax::cli {
namespace {

namespace fs = std::filesystem;

// ---- calibrate ----

struct CalibrateFlags {
  std::string backend = "cpu";
  std::string out;
  bool quick = false;
};

int run_calibrate(const CalibrateFlags& f) {
  if (f.backend != "cpu") {
    throw InputError("command line", "--backend",
                     "\"cpu\" (calibration on a GPU is not written yet: start from a GPU profile "
                     "such as dgx-h100 and compare --backend cuda against it)",
                     fmt::format("\"{}\"", f.backend));
  }
  MpiRuntime::init(nullptr, nullptr);
  const Cluster c = calibrate_cpu({.quick = f.quick});
  if (MpiRuntime::world_rank() == 0) {
    json_write_file(f.out, cluster_to_json(c));
    std::cerr << fmt::format("parallax calibrate: {} ranks, GEMM peak {:.1f} GFLOP/s per rank, "
                             "memory {:.1f} GB/s, all-reduce {:.2f} GB/s, {:.1f} us; wrote {}\n",
                             c.node.devices_per_node,
                             c.device.peak_tflops.at(Precision::fp32) * 1e3,
                             c.device.memory_bandwidth_gbps, c.node.intra_bandwidth_gbps,
                             c.node.intra_latency_us, f.out);
  }
  return 0;
}

// ---- compare ----

struct CompareFlags {
  std::string model;
  std::string backend = "cpu";
  std::string cluster = "cpu-local";
  std::string plans;
  int ranks = 0;
  std::int64_t global_batch = 16;
  int max_plans = 12;
  int steps = 5;
  bool json = false;
  std::string work_dir;
  std::string report;
  std::string stack;
};

// One compared plan, with what the report needs besides the figures.
struct Row : viz::ComparedPlan {
  fs::path trace;        // the measured timeline (Chrome trace)
  PlanEstimate estimate; // the simulator's figures
};

Json ops_json(const std::vector<viz::ComparedOp>& ops) {
  Json out = Json::array();
  for (const viz::ComparedOp& op : ops) {
    out.push_back({{"rank", op.rank},
                   {"name", op.name},
                   {"category", op.category},
                   {"simulated_s", op.simulated_s ? Json(*op.simulated_s) : Json()},
                   {"measured_s", op.measured_s ? Json(*op.measured_s) : Json()}});
  }
  return out;
}

Json breakdown_json(const TimeBreakdown& b) {
  return {{"compute", b.compute}, {"tp_comm", b.tp_comm}, {"pp_comm", b.pp_comm},
          {"dp_comm", b.dp_comm}, {"bubble", b.bubble},   {"optimizer", b.optimizer}};
}

// A representative sweep for `world` ranks: every dp × tp × pp layout the model allows, then
// variants (ZeRO, recomputation, schedules, sequence parallelism, micro-batch size) until
// `max_plans`.
std::vector<Plan> default_sweep(const LayerGraph& graph, int world, std::int64_t global_batch,
                                int max_plans) {
  std::vector<Plan> layouts;
  for (int tp = 1; tp <= world; ++tp) {
    for (int pp = 1; pp * tp <= world; ++pp) {
      if (world % (tp * pp) != 0)
        continue;
      Plan p;
      p.tp = tp;
      p.pp = pp;
      p.dp = world / (tp * pp);
      p.precision = Precision::fp32;
      p.global_batch_size = global_batch;
      p.micro_batch_size = std::max<std::int64_t>(1, global_batch / (p.dp * 4));
      try {
        plan_validate(p, graph, world, "sweep");
      } catch (const InputError&) {
        continue;
      }
      if (global_batch % (p.dp * p.micro_batch_size) != 0)
        continue;
      layouts.push_back(p);
    }
  }
  std::vector<Plan> out = layouts;
  auto add = [&](Plan p) {
    if (static_cast<int>(out.size()) >= max_plans)
      return;
    try {
      plan_validate(p, graph, world, "sweep");
    } catch (const InputError&) {
      return;
    }
    if (std::find(out.begin(), out.end(), p) == out.end())
      out.push_back(p);
  };
  for (const Plan& base : layouts) {
    Plan p = base;
    p.recompute = Recompute::full;
    add(p);
    if (base.dp > 1) {
      p = base;
      p.zero_stage = 1;
      add(p);
      p.zero_stage = 3;
      add(p);
    }
    if (base.pp > 1) {
      p = base;
      p.schedule = Schedule::gpipe;
      add(p);
    }
    if (base.tp > 1) {
      p = base;
      p.sequence_parallel = true;
      add(p);
    }
    p = base;
    p.micro_batch_size = base.micro_batch_size * 2;
    if (global_batch % (p.dp * p.micro_batch_size) == 0)
      add(p);
  }
  if (static_cast<int>(out.size()) > max_plans)
    out.resize(static_cast<std::size_t>(max_plans));
  return out;
}

struct Process {
  int code = -1;
  std::string output;
};

Process run_process(const std::string& command) {
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  Process p;
  std::array<char, 4096> buf{};
  while (pipe != nullptr && fgets(buf.data(), buf.size(), pipe) != nullptr)
    p.output += buf.data();
  const int status = pipe != nullptr ? pclose(pipe) : -1;
  p.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return p;
}

void write_report(const CompareFlags& f, const LoadedModel& model, const Cluster& cluster,
                  const Stack& stack, const std::vector<Row>& rows, double mape, double tau) {
  viz::ReportInput in;
  in.title = fmt::format("Simulated vs measured: {}", model.graph.info().name);
  in.context =
      fmt::format("{} on {} ({}), {}, {} plans, profile {}", model.graph.info().name, cluster.name,
                  cluster.device.name, stack_line(stack), rows.size(), f.cluster);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    in.compared.push_back(r);
    in.plans.push_back(
        {.estimate = r.estimate, .gpus = r.plan.world_size(), .chosen = i == 0, .simulated = true});
    in.candidates.push_back({.tokens_per_s = r.estimate.tokens_per_s,
                             .memory_bytes = r.estimate.memory.total(),
                             .rank_in_table = static_cast<int>(i) + 1,
                             .chosen = i == 0});
  }
  in.mape = mape;
  in.kendall_tau = tau;
  // The first plan in detail: memory, both timelines, layer graph and mesh.
  const Row& first = rows.front();
  const Cluster sized = cluster.with_devices(first.plan.world_size());
  CostModel cost(model.graph, sized, stack);
  in.memory_capacity_bytes = cost.memory_capacity_bytes();
  in.chosen = first.estimate;
  const SimulationResult sim = simulate_iteration(cost, first.plan, {.symmetric = true});
  in.timelines.emplace_back(
      "measured (plan 1, last step, every rank)",
      viz::timeline_svg(
          timeline_from_chrome_trace(json_load_file(first.trace), first.trace.string()),
          {.title = plan_label(first.plan)}));
  in.timelines.emplace_back("simulated (plan 1, one rank per pipeline stage)",
                            viz::timeline_svg(sim.timeline, {.title = plan_label(first.plan)}));
  in.layer_graph_svg =
      viz::dot_to_svg(viz::layer_graph_dot(model.graph, first.plan), "layer graph");
  in.mesh_svg = viz::dot_to_svg(viz::mesh_dot(first.plan, sized), "mesh");
  text_write_file(f.report, viz::report_html(in));
}

// The simulated ops (one rank per pipeline stage) beside the measured ones of the same ranks,
// each measured op at its median over the timed steps; ops either side lacks appear too.
std::vector<viz::ComparedOp> compared_ops(const Timeline& simulated, const Json& measured,
                                          const std::string& source) {
  std::vector<int> ranks;
  for (const Event& e : simulated.events) {
    if (std::find(ranks.begin(), ranks.end(), e.rank) == ranks.end())
      ranks.push_back(e.rank);
  }
  std::vector<viz::ComparedOp> ops;
  std::map<std::pair<int, std::string>, std::size_t> at;
  for (const OpTime& op : timeline_op_times(simulated)) {
    at[{op.rank, op.name}] = ops.size();
    ops.push_back({.rank = op.rank,
                   .name = op.name,
                   .category = std::string(category_name(op.category)),
                   .simulated_s = op.seconds});
  }
  const JsonReader list = JsonReader(measured, source).array("ops");
  for (std::size_t i = 0; i < list.array_size(); ++i) {
    const JsonReader row = list.element(i);
    const int rank = static_cast<int>(row.integer("rank", 0));
    if (std::find(ranks.begin(), ranks.end(), rank) == ranks.end())
      continue;
    const JsonReader seconds = row.array("seconds");
    std::vector<double> times;
    for (std::size_t t = 0; t < seconds.array_size(); ++t)
      times.push_back(seconds.element(t).value().get<double>());
    if (times.empty())
      continue;
    std::nth_element(times.begin(), times.begin() + static_cast<std::ptrdiff_t>(times.size() / 2),
                     times.end());
    const std::string name = row.string("name");
    auto it = at.find({rank, name});
    if (it == at.end()) {
      at[{rank, name}] = ops.size();
      ops.push_back({.rank = rank, .name = name, .category = row.string("category")});
      it = at.find({rank, name});
    }
    ops[it->second].measured_s = times[times.size() / 2];
  }
  return ops;
}

Row measure_and_simulate(const CompareFlags& f, const LoadedModel& model, const Cluster& cluster,
                         const Stack& stack, Plan plan, const fs::path& dir, int index) {
  const fs::path plan_file = dir / fmt::format("plan-{}.json", index);
  const fs::path log = dir / fmt::format("steps-{}.jsonl", index);
  const fs::path trace = dir / fmt::format("trace-{}.json", index);
  const fs::path op_times = dir / fmt::format("ops-{}.json", index);
  fs::remove(log);
  Cluster sized = cluster.with_devices(plan.world_size());
  CostModel cost(model.graph, sized, stack);
  if (plan.stages.empty())
    plan_assign_stages(cost, plan);
  json_write_file(plan_file, plan_to_json(plan));
  const int n = plan.process_count();
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  std::string launcher;
  if (n > 1) {
    launcher = fmt::format("mpirun {}--oversubscribe --bind-to none -np {} ",
                           geteuid() == 0 ? "--allow-run-as-root " : "", n);
  }
  const Process p = run_process(fmt::format(
      "{}{} train --backend {} --model {} --plan {} --steps {} --log {} --trace {} --op-times {} "
      "--cluster {} --seed 1",
      launcher, shell_quote(self), f.backend, shell_quote(f.model), shell_quote(plan_file.string()),
      f.steps, shell_quote(log.string()), shell_quote(trace.string()),
      shell_quote(op_times.string()), shell_quote(f.cluster)));
  if (p.code != 0) {
    throw std::runtime_error(fmt::format("training plan {} ({}) failed with exit code {}:\n{}",
                                         index, plan_label(plan), p.code, p.output));
  }
  Row r;
  r.plan = plan;
  std::vector<double> times;
  std::ifstream in(log);
  for (std::string line; std::getline(in, line);) {
    const Json j = Json::parse(line);
    times.push_back(j.at("step_time_s").get<double>());
    r.measured_peak_memory_bytes =
        std::max(r.measured_peak_memory_bytes, j.at("peak_memory_bytes").get<double>());
  }
  PARALLAX_CHECK(!times.empty(), "train wrote no steps");
  // The first step warms caches and the allocator; the median of the rest is the step time.
  if (times.size() > 1)
    times.erase(times.begin());
  std::nth_element(times.begin(), times.begin() + static_cast<std::ptrdiff_t>(times.size() / 2),
                   times.end());
  r.measured_step_s = times[times.size() / 2];
  r.measured =
      timeline_breakdown(timeline_from_chrome_trace(json_load_file(trace), trace.string()));
  const SimulationResult sim = simulate_iteration(cost, plan, {.symmetric = true});
  r.ops = compared_ops(sim.timeline, json_load_file(op_times), op_times.string());
  r.simulated_step_s = sim.estimate.iteration_time_s;
  r.simulated = sim.estimate.breakdown;
  r.simulated_peak_memory_bytes = sim.estimate.memory.reserved();
  r.trace = trace;
  r.estimate = sim.estimate;
  return r;
}

int run_compare(const CompareFlags& f) {
  if (!f.report.empty()) {
    const fs::path parent = fs::absolute(f.report).parent_path();
    if (!fs::is_directory(parent)) {
      throw InputError("command line", "--report", "a file in an existing directory", f.report);
    }
  }
  LoadedModel model = model_load(f.model);
  const Cluster cluster = cluster_load(f.cluster);
  const Stack stack = stack_for(f.stack, cluster);
  model_apply_stack(model, stack);
  std::vector<Plan> plans;
  if (!f.plans.empty()) {
    const Json doc = json_load_file(f.plans);
    const Json& list = doc.is_object() && doc.contains("plans") ? doc.at("plans") : doc;
    if (!list.is_array() || list.empty()) {
      throw InputError(f.plans, "/plans", "a non-empty array of plans (or {\"plans\": [...]})",
                       std::string(doc.type_name()));
    }
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string source = fmt::format("{} (plan {})", f.plans, i);
      const Json& item =
          list[i].is_object() && list[i].contains("plan") ? list[i].at("plan") : list[i];
      Plan p = plan_from_json(item, source);
      plan_validate(p, model.graph, p.world_size(), source);
      if (!item.contains("overlap_grad_reduce")) {
        p.overlap_grad_reduce = stack.data_parallel.overlap_grad_reduce;
      }
      p.stack = stack.name;
      plans.push_back(p);
    }
  } else {
    const int ranks = f.ranks > 0 ? f.ranks : cluster.num_devices();
    plans = default_sweep(model.graph, ranks, f.global_batch, f.max_plans);
    if (plans.empty()) {
      throw InputError("command line", "--ranks", "a rank count the model can be laid out on",
                       std::to_string(ranks));
    }
  }
  const fs::path dir =
      f.work_dir.empty() ? fs::temp_directory_path() / fmt::format("parallax_compare_{}", getpid())
                         : fs::path(f.work_dir);
  fs::create_directories(dir);
  std::vector<Row> rows;
  for (std::size_t i = 0; i < plans.size(); ++i) {
    if (!f.json) {
      std::cerr << fmt::format("[{}/{}] {}\n", i + 1, plans.size(), plan_label(plans[i]));
    }
    rows.push_back(
        measure_and_simulate(f, model, cluster, stack, plans[i], dir, static_cast<int>(i)));
  }
  std::vector<double> measured, simulated;
  for (const Row& r : rows) {
    measured.push_back(r.measured_step_s);
    simulated.push_back(r.simulated_step_s);
  }
  const double mape = mean_absolute_percentage_error(measured, simulated);
  const double tau = rows.size() >= 2 ? kendall_tau(measured, simulated) : 1.0;
  if (!f.report.empty()) {
    write_report(f, model, cluster, stack, rows, mape, tau);
  }
  if (f.json) {
    Json out = {{"plans", Json::array()}, {"mape", mape}, {"kendall_tau", tau}};
    for (const Row& r : rows) {
      out["plans"].push_back(
          {{"plan", plan_to_json(r.plan)},
           {"measured_step_time_s", r.measured_step_s},
           {"simulated_step_time_s", r.simulated_step_s},
           {"error", (r.simulated_step_s - r.measured_step_s) / r.measured_step_s},
           {"measured_peak_memory_bytes", r.measured_peak_memory_bytes},
           {"simulated_peak_memory_bytes", r.simulated_peak_memory_bytes},
           {"measured_breakdown", breakdown_json(r.measured)},
           {"simulated_breakdown", breakdown_json(r.simulated)},
           {"ops", ops_json(r.ops)}});
    }
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << fmt::format("{} on {} ({}): measured vs simulated step time\n",
                             model.graph.info().name, cluster.name, cluster.device.name);
    std::cout << fmt::format("{:>3}  {:<52} {:>10} {:>10} {:>7}  {:>15}  {:>23}\n", "#", "plan",
                             "measured", "simulated", "error", "peak MiB m/s", "compute m/s (ms)");
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::cout << fmt::format(
          "{:>3}  {:<52} {:>8.2f}ms {:>8.2f}ms {:>+6.1f}%  {:>7.0f}/{:<7.0f}  "
          "{:>10.2f}/{:<10.2f}\n",
          i + 1, plan_label(r.plan), 1e3 * r.measured_step_s, 1e3 * r.simulated_step_s,
          100 * (r.simulated_step_s - r.measured_step_s) / r.measured_step_s,
          r.measured_peak_memory_bytes / (1 << 20), r.simulated_peak_memory_bytes / (1 << 20),
          1e3 * r.measured.compute, 1e3 * r.simulated.compute);
    }
    std::cout << fmt::format("MAPE {:.1f}%, Kendall tau {:.2f} over {} plans\n", 100 * mape, tau,
                             rows.size());
    std::cout << "breakdowns (measured | simulated, ms): compute, tp, pp, dp, bubble, optimizer\n";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto& m = rows[i].measured;
      const auto& s = rows[i].simulated;
      std::cout << fmt::format(
          "{:>3}  {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} | {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} "
          "{:.2f}\n",
          i + 1, 1e3 * m.compute, 1e3 * m.tp_comm, 1e3 * m.pp_comm, 1e3 * m.dp_comm, 1e3 * m.bubble,
          1e3 * m.optimizer, 1e3 * s.compute, 1e3 * s.tp_comm, 1e3 * s.pp_comm, 1e3 * s.dp_comm,
          1e3 * s.bubble, 1e3 * s.optimizer);
    }
  }
  return 0;
}

} // namespace

Run register_calibrate(CLI::App& app) {
  auto f = std::make_shared<CalibrateFlags>();
  auto* cmd = app.add_subcommand(
      "calibrate", "Measure this machine into a cluster profile (run under mpirun -np N to "
                   "measure N ranks at once)");
  cmd->add_option("--backend", f->backend, "cpu")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--out", f->out, "Profile JSON to write")->required();
  cmd->add_flag("--quick", f->quick, "Smaller grid and buffers (seconds instead of a minute)");
  return [f]() { return run_calibrate(*f); };
}

Run register_compare(CLI::App& app) {
  auto f = std::make_shared<CompareFlags>();
  auto* cmd = app.add_subcommand(
      "compare", "Train plans for real and compare each measured step with the simulator");
  cmd->add_option("--model", f->model, "Zoo name or model JSON")->required();
  cmd->add_option("--cluster", f->cluster, "Profile to simulate with (e.g. from calibrate)");
  cmd->add_option("--backend", f->backend,
                  "Executor that trains the plans: cpu, or cuda (one GPU per rank)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--plans", f->plans,
                  "JSON array of plans (or {\"plans\": [...]}); default: "
                  "a representative sweep");
  cmd->add_option("--ranks", f->ranks,
                  "Ranks of the default sweep (default: the profile's devices)");
  cmd->add_option("--global-batch", f->global_batch, "Global batch of the default sweep");
  cmd->add_option("--max-plans", f->max_plans, "Plans in the default sweep");
  cmd->add_option("--steps", f->steps, "Training steps per plan (the first is not timed)");
  cmd->add_option("--work-dir", f->work_dir, "Where plans, step logs and measured traces go");
  cmd->add_option("--report", f->report, "Write a self-contained HTML report to this file");
  cmd->add_flag("--json", f->json, "Print the comparison as JSON");
  add_stack(cmd, f->stack);
  return [f]() { return run_compare(*f); };
}

} // namespace parallax::cli
