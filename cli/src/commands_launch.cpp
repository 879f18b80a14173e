// `parallax launch --np N [--min-np M] [--elastic] -- train …`: starts a training job through
// mpirun (srun inside a Slurm allocation) and, with --elastic, keeps it going when a rank dies:
// the job restarts from the newest checkpoint on the surviving ranks with a plan made for
// their count, down to M ranks. Without --plan in the train arguments the plan is made for
// the rank count here too. Every restart is logged (stderr and <checkpoint-dir>/launch.jsonl):
// which rank died, at which step, the old and the new plan.
#include "commands.hpp"
#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/executor/checkpoint.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/planner/planner.hpp"

#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <regex>

namespace fs = std::filesystem;

namespace parallax::cli {

namespace {

struct LaunchFlags {
  int np = 0;
  int min_np = 0;
  bool elastic = false;
  std::int64_t global_batch = 0;
  std::vector<std::string> command; // "train" and its arguments
};

// The value of `--name V` or `--name=V` in the train arguments, or "".
std::string arg_value(const std::vector<std::string>& args, const std::string& name) {
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == name && i + 1 < args.size())
      return args[i + 1];
    if (args[i].starts_with(name + "="))
      return args[i].substr(name.size() + 1);
  }
  return "";
}

// The train arguments without `--name V` (and `--name=V`); flags (no value) when `flag`.
std::vector<std::string> without(const std::vector<std::string>& args, const std::string& name,
                                 bool flag = false) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == name) {
      i += flag ? 0 : 1;
      continue;
    }
    if (args[i].starts_with(name + "="))
      continue;
    out.push_back(args[i]);
  }
  return out;
}

// The plan for `ranks` processes: the best the planner finds for the run's model and profile.
std::optional<Plan> plan_for(const std::vector<std::string>& args, int ranks,
                             std::int64_t global_batch, std::string* why) {
  const std::string cluster_name = arg_value(args, "--cluster").empty()
                                       ? std::string("cpu-local")
                                       : arg_value(args, "--cluster");
  LoadedModel model = model_load(arg_value(args, "--model"));
  const Cluster cluster = cluster_load(cluster_name).for_ranks(ranks);
  PlanRequest req;
  req.gpus = ranks;
  req.global_batch_size = global_batch;
  req.pins.precision = Precision::fp32; // what the CPU executor trains in
  req.top_k = 1;
  PlanSearchResult r = plan_search(model.graph, cluster, req);
  if (r.plans.empty()) {
    *why = r.no_fit_reason;
    return std::nullopt;
  }
  return r.plans.front().estimate.plan;
}

struct Attempt {
  int code = -1;
  int dead_rank = -1;         // from mpirun's report, when it names one
  std::int64_t last_step = 0; // the newest step line the job printed
};

// Runs `command`, echoing its output, and reads from it which rank died and the last step.
Attempt run_streaming(const std::string& command) {
  Attempt a;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr)
    return a;
  static const std::regex kRank(R"(process rank (\d+))");
  static const std::regex kStep(R"("step":\s*(\d+))");
  std::array<char, 8192> buf{};
  std::string line;
  while (fgets(buf.data(), buf.size(), pipe) != nullptr) {
    line = buf.data();
    std::cout << line << std::flush;
    std::smatch m;
    if (std::regex_search(line, m, kStep))
      a.last_step = std::max<std::int64_t>(a.last_step, std::stoll(m[1]));
    if (a.dead_rank < 0 && std::regex_search(line, m, kRank))
      a.dead_rank = std::stoi(m[1]);
  }
  const int status = pclose(pipe);
  a.code =
      WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  return a;
}

std::string launcher_for(int np) {
  if (std::getenv("SLURM_JOB_ID") != nullptr && std::system("command -v srun >/dev/null 2>&1") == 0)
    return fmt::format("srun --ntasks {} ", np);
  return fmt::format("mpirun {}--oversubscribe --bind-to none -np {} ",
                     geteuid() == 0 ? "--allow-run-as-root " : "", np);
}

int run_launch(const LaunchFlags& f) {
  if (f.command.empty() || f.command.front() != "train") {
    throw InputError("command line", "--", "train and its arguments after --",
                     f.command.empty() ? "nothing" : "\"" + f.command.front() + "\"");
  }
  if (f.np < 1) {
    throw InputError("command line", "--np", "a process count >= 1", std::to_string(f.np));
  }
  const int min_np = f.min_np > 0 ? f.min_np : f.np;
  if (min_np > f.np) {
    throw InputError("command line", "--min-np", fmt::format("at most --np {}", f.np),
                     std::to_string(min_np));
  }
  std::vector<std::string> args(f.command.begin() + 1, f.command.end());
  if (arg_value(args, "--model").empty()) {
    throw InputError("command line", "--model", "train's --model after --", "nothing");
  }
  const std::string ckpt_dir = arg_value(args, "--checkpoint-dir");
  if (f.elastic && ckpt_dir.empty()) {
    throw InputError("command line", "--elastic",
                     "train's --checkpoint-dir D (a restart resumes from its newest checkpoint)",
                     "none given");
  }
  const std::string given_plan = arg_value(args, "--plan");
  std::int64_t global_batch = f.global_batch;
  if (!given_plan.empty() && global_batch == 0) {
    global_batch = plan_from_json(json_load_file(given_plan), given_plan).global_batch_size;
  }
  if (global_batch == 0)
    global_batch = 16;
  const fs::path work =
      ckpt_dir.empty() ? fs::temp_directory_path() / fmt::format("parallax-launch-{}", getpid())
                       : fs::path(ckpt_dir);
  fs::create_directories(work);
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  std::ofstream log;
  if (!ckpt_dir.empty())
    log.open(work / "launch.jsonl", std::ios::app);

  int np = f.np;
  std::string plan_file = given_plan;
  int restarts = 0;
  std::optional<Json> pending; // the restart being logged, until its new plan is known
  for (;;) {
    std::string label;
    if (plan_file.empty() || restarts > 0) {
      // A plan for this rank count (fewer ranks may have none: try fewer still).
      std::optional<Plan> plan;
      std::string why;
      while (np >= min_np && !(plan = plan_for(args, np, global_batch, &why))) {
        std::cerr << fmt::format("parallax launch: no plan on {} ranks ({}); trying {}\n", np, why,
                                 np - 1);
        --np;
      }
      if (!plan) {
        std::cerr << fmt::format("parallax launch: no plan on {} to {} ranks; giving up\n", min_np,
                                 f.np);
        return 5;
      }
      plan_file = (work / fmt::format("launch-plan-np{}.json", np)).string();
      json_write_file(plan_file, plan_to_json(*plan));
      label = plan_label(*plan);
    } else {
      label = plan_label(plan_from_json(json_load_file(plan_file), plan_file));
    }
    if (pending) {
      (*pending)["new_plan"] = label;
      (*pending)["new_ranks"] = np;
      if (log)
        log << pending->dump() << "\n" << std::flush;
      std::cerr << fmt::format("parallax launch: re-planned for {} ranks: {}\n", np, label);
      pending.reset();
    }
    std::vector<std::string> run_args = without(args, "--plan");
    run_args.push_back("--plan");
    run_args.push_back(plan_file);
    if (restarts > 0) {
      run_args = without(run_args, "--resume", true);
      run_args.push_back("--resume");
    }
    std::string command = np > 1 ? launcher_for(np) : std::string();
    // The fault injector (PARALLAX_FAULT) acts on the first attempt only.
    if (restarts > 0)
      command = "env -u PARALLAX_FAULT " + command;
    command += shell_quote(self) + " train";
    for (const std::string& a : run_args)
      command += " " + shell_quote(a);
    std::cerr << fmt::format("parallax launch: {} ranks, plan {}\n", np, label);
    const Attempt a = run_streaming(command);
    if (a.code == 0) {
      if (restarts > 0)
        std::cerr << fmt::format("parallax launch: finished on {} ranks after {} restart{}\n", np,
                                 restarts, restarts == 1 ? "" : "s");
      return 0;
    }
    if (a.code == 2 || !f.elastic) {
      return a.code; // bad input, or not asked to survive failures
    }
    const std::optional<Checkpoint> ck = read_latest_checkpoint(ckpt_dir);
    const std::int64_t resume_step = ck ? ck->step : 0;
    const int survivors = np - 1;
    Json entry = {{"restart", restarts + 1},    {"dead_rank", a.dead_rank},
                  {"exit_code", a.code},        {"last_step_printed", a.last_step},
                  {"resume_step", resume_step}, {"old_ranks", np},
                  {"new_ranks", survivors},     {"old_plan", label}};
    if (survivors < min_np) {
      entry["new_plan"] = nullptr;
      if (log)
        log << entry.dump() << "\n";
      std::cerr << fmt::format("parallax launch: rank {} died (exit {}); {} ranks left, below "
                               "--min-np {}; giving up\n",
                               a.dead_rank, a.code, survivors, min_np);
      return a.code;
    }
    np = survivors;
    ++restarts;
    std::cerr << fmt::format("parallax launch: rank {} died (exit {}) after step {}; restarting "
                             "from checkpoint step {} on {} ranks (was {}: {})\n",
                             a.dead_rank, a.code, a.last_step, resume_step, np, np + 1, label);
    pending = entry;
  }
}

} // namespace

Run register_launch(CLI::App& app) {
  auto f = std::make_shared<LaunchFlags>();
  auto* cmd = app.add_subcommand(
      "launch", "Start `train` on N processes (mpirun, or srun under Slurm); with --elastic, "
                "restart from the newest checkpoint on the survivors when a rank dies");
  cmd->add_option("--np", f->np, "Processes to start")->required();
  cmd->add_option("--min-np", f->min_np,
                  "With --elastic: the fewest processes to go on with (default --np)");
  cmd->add_flag("--elastic", f->elastic,
                "Restart on the surviving ranks, re-planned, when a rank dies");
  cmd->add_option("--global-batch", f->global_batch,
                  "Global batch of the plans made here (default: --plan's, else 16)");
  cmd->add_option("command", f->command, "-- train and its arguments")->expected(-1);
  return [f]() { return run_launch(*f); };
}

} // namespace parallax::cli
