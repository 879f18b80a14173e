// `parallax train`: run a plan for real, one MPI process per rank.
#include "commands.hpp"

#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/core/timeline_json.hpp"
#include "parallax/executor/checkpoint.hpp"
#include "parallax/executor/straggler.hpp"
#include "parallax/executor/trainer.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"
#include "parallax/simulator/cost_model.hpp"

#ifdef PARALLAX_HAVE_CUDA_EXECUTOR
#include "parallax/executor/cuda/device.hpp"
#include "parallax/executor/cuda/trainer.hpp"
#endif

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

namespace parallax::cli {
namespace {

std::vector<char*> g_argv;

// `parallax` itself does not link the CUDA libraries (loading cuBLASLt and NCCL costs every
// command about 0.4 s, bench/RESULTS.md); `train --backend cuda` re-executes the process as its
// CUDA-linked twin `parallax-cuda` from the same directory, same arguments, before MPI starts.
// Returns only when there is no twin (this build has no CUDA backend).
void exec_cuda_twin() {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec || g_argv.empty())
    return;
  const std::filesystem::path twin = self.parent_path() / "parallax-cuda";
  if (!std::filesystem::exists(twin, ec))
    return;
  std::vector<char*> args = g_argv;
  const std::string path = twin.string();
  args[0] = const_cast<char*>(path.c_str());
  args.push_back(nullptr);
  ::execv(path.c_str(), args.data());
  throw std::runtime_error(fmt::format("cannot start {}: {}", path, std::strerror(errno)));
}

struct TrainFlags {
  std::string model;
  std::string plan;
  std::string backend = "cpu";
  std::string precision;          // empty: the backend's default (cpu fp32, cuda bf16)
  std::string attention = "auto"; // cuda: auto, gemm (tensor cores, seq² memory) or flash
  std::string cluster; // empty: cpu-local, or the zoo profile of this GPU with --backend cuda
  std::int64_t steps = 20;
  std::string data;
  std::uint64_t seed = 1;
  double lr = 1e-3;
  std::int64_t warmup = -1;
  std::int64_t decay_steps = -1;
  double weight_decay = 0.1;
  double clip = 1.0;
  std::string checkpoint_dir;
  std::int64_t checkpoint_every = 0;
  int keep = 2;
  bool resume = false;
  std::string log;
  std::string trace;
  std::string op_times; // per-op times of every timed step (JSON)
  double timeout_s = 300;
};

Json step_json(const StepStats& s) {
  return {{"step", s.step},
          {"loss", s.loss},
          {"grad_norm", s.grad_norm},
          {"lr", s.lr},
          {"step_time_s", s.step_time_s},
          {"tokens_per_s", s.tokens_per_s},
          {"mfu", s.mfu},
          {"peak_memory_bytes", s.peak_memory_bytes}};
}

Json step_line(const StepStats& s) {
  Json j = step_json(s);
  if (s.staleness >= 0)
    j["staleness"] = s.staleness;
  return j;
}

struct Setup {
  ExecModel model;
  Plan plan;
  TrainOptions options;
  std::optional<Checkpoint> resume_from;
  std::string resume_source;
  Precision gemm = Precision::fp32; // the GEMMs' precision (cuda: fp32, tf32 or bf16)
  std::string cluster_name;         // the profile of the MFU denominator
};

std::unique_ptr<Trainer> make_trainer(const TrainFlags& f, const Setup& s) {
#ifdef PARALLAX_HAVE_CUDA_EXECUTOR
  if (f.backend == "cuda") {
    const cuda::GemmPrecision p = s.gemm == Precision::bf16   ? cuda::GemmPrecision::bf16
                                  : s.gemm == Precision::tf32 ? cuda::GemmPrecision::tf32
                                                              : cuda::GemmPrecision::f32;
    const cuda::AttentionKernel a = f.attention == "flash"  ? cuda::AttentionKernel::flash
                                    : f.attention == "gemm" ? cuda::AttentionKernel::gemm
                                                            : cuda::AttentionKernel::automatic;
    return cuda::make_trainer(s.model, s.plan, s.options, f.plan, {.precision = p, .attention = a});
  }
#endif
  return std::make_unique<Trainer>(s.model, s.plan, s.options, f.plan);
}

Setup prepare(const TrainFlags& f, int world_size) {
  if (f.backend == "cuda") {
#ifdef PARALLAX_HAVE_CUDA_EXECUTOR
    if (!cuda::gpu_available()) {
      throw InputError("command line", "--backend",
                       "\"cpu\", or \"cuda\" on a machine with a CUDA device",
                       "\"cuda\" (this process sees no CUDA device)");
    }
#else
    throw InputError("command line", "--backend",
                     "\"cpu\" (this build has no CUDA executor: nvcc was not found when it was "
                     "configured)",
                     "\"cuda\"");
#endif
  }
  const std::string precision =
      f.precision.empty() ? (f.backend == "cuda" ? "bf16" : "fp32") : f.precision;
  if (f.attention != "auto" && f.attention != "gemm" && f.attention != "flash") {
    throw InputError("command line", "--attention", "\"auto\", \"gemm\" or \"flash\"",
                     fmt::format("\"{}\"", f.attention));
  }
  const bool cuda_precision = precision == "tf32" || precision == "bf16";
  if (precision != "fp32" && !(f.backend == "cuda" && cuda_precision)) {
    throw InputError("command line", "--precision",
                     f.backend == "cpu"
                         ? "\"fp32\" for the cpu backend (tf32 and bf16 GEMMs need --backend cuda)"
                         : "\"fp32\", \"tf32\" or \"bf16\" for the cuda backend",
                     fmt::format("\"{}\"", precision));
  }
  if (f.steps < 1) {
    throw InputError("command line", "--steps", "a positive step count", std::to_string(f.steps));
  }
  if (f.checkpoint_every < 0 || (f.checkpoint_every > 0 && f.checkpoint_dir.empty())) {
    throw InputError("command line", "--checkpoint-every",
                     "a non-negative count, with --checkpoint-dir",
                     std::to_string(f.checkpoint_every));
  }
  if (f.resume && f.checkpoint_dir.empty()) {
    throw InputError("command line", "--resume", "--checkpoint-dir D to resume from",
                     "no directory");
  }
  if (!(f.lr > 0) || !(f.timeout_s > 0) || f.keep < 1) {
    throw InputError("command line", "--lr / --comm-timeout / --keep-checkpoints",
                     "positive values", fmt::format("{} / {} / {}", f.lr, f.timeout_s, f.keep));
  }
  LoadedModel loaded = model_load(f.model);
  if (!loaded.config) {
    throw InputError(loaded.source, "/",
                     "a GPT or Llama model config (the executor does not "
                     "train generic layer graphs)",
                     "a generic layer graph");
  }
  Setup s;
  s.model = ExecModel::from_config(*loaded.config, loaded.source);
  s.plan = plan_from_json(json_load_file(f.plan), f.plan);
  // Every input error is found here, on every rank, before any communicator exists.
  trainer_check_plan(s.model, s.plan, world_size, f.plan);
  plan_validate(s.plan, loaded.graph, s.plan.world_size(), f.plan);
  std::string cluster_name = f.cluster.empty() ? "cpu-local" : f.cluster;
#ifdef PARALLAX_HAVE_CUDA_EXECUTOR
  if (f.cluster.empty() && f.backend == "cuda") {
    const std::string gpu = cuda::device_name(0);
    const std::string_view zoo = cuda::zoo_profile_for(gpu);
    if (zoo.empty()) {
      throw InputError("command line", "--cluster",
                       "a cluster profile for this GPU (the MFU denominator)",
                       fmt::format("none given, and the zoo has no profile for \"{}\"", gpu));
    }
    cluster_name = zoo;
  }
#endif
  Cluster cluster = cluster_load(cluster_name).for_ranks(s.plan.world_size());
  s.cluster_name = cluster_name;
  if (s.plan.stages.empty()) {
    // The planner's balanced partition, costed in a precision the profile has.
    Plan costed = s.plan;
    if (!cluster.supports(costed.precision))
      costed.precision = Precision::fp32;
    CostModel cost(loaded.graph, cluster);
    plan_assign_stages(cost, costed);
    s.plan.stages = costed.stages;
  }
  s.options.steps = f.steps;
  s.options.seed = f.seed;
  s.options.lr = f.lr;
  s.options.warmup_steps = f.warmup;
  s.options.decay_steps = f.decay_steps;
  s.options.weight_decay = f.weight_decay;
  s.options.clip_grad_norm = f.clip;
  s.options.data_path = f.data;
  s.options.comm_timeout = std::chrono::duration<double>(f.timeout_s);
  // MFU against the device's peak in the precision the GEMMs run in.
  const Precision gemm = precision_parse(precision).value_or(Precision::fp32);
  s.options.peak_flops_per_rank =
      cluster.peak_flops(cluster.supports(gemm) ? gemm : Precision::fp32);
  s.gemm = gemm;
  if (!f.data.empty()) {
    open_token_file(f.data, s.model.config.vocab_size, s.model.config.seq_length); // validates
  }
  if (f.resume) {
    s.resume_from = read_latest_checkpoint(f.checkpoint_dir);
    s.resume_source = f.checkpoint_dir;
  }
  return s;
}

// Fault injection for tests of the failure paths: PARALLAX_FAULT="kill:RANK:STEP" makes world
// rank RANK kill itself with SIGKILL right after step STEP; "hang:RANK:STEP" makes it stop
// communicating forever instead (its peers must time out).
struct Fault {
  bool hang = false;
  int rank = -1;
  std::int64_t step = -1;
  int slow_ms = 0; // "slow:RANK:MS": rank RANK sleeps MS ms before each step (a straggler)
};

std::optional<Fault> fault_from_environment() {
  const char* spec = std::getenv("PARALLAX_FAULT");
  if (spec == nullptr)
    return std::nullopt;
  char kind[8] = {};
  int rank = -1;
  long long step = -1;
  if (std::sscanf(spec, "%4[a-z]:%d:%lld", kind, &rank, &step) != 3 ||
      (std::string(kind) != "kill" && std::string(kind) != "hang" && std::string(kind) != "slow") ||
      rank < 0 || step < 0 || (std::string(kind) == "slow" && step > 600000)) {
    throw InputError("environment", "PARALLAX_FAULT",
                     "kill:RANK:STEP, hang:RANK:STEP or slow:RANK:MS (MS <= 600000)", spec);
  }
  if (std::string(kind) == "slow") {
    return Fault{.rank = rank, .slow_ms = static_cast<int>(step)};
  }
  return Fault{.hang = std::string(kind) == "hang", .rank = rank, .step = step};
}

int run_train(const TrainFlags& f) {
#ifndef PARALLAX_HAVE_CUDA_EXECUTOR
  if (f.backend == "cuda")
    exec_cuda_twin();
#endif
  MpiRuntime::init(nullptr, nullptr);
  const int rank = MpiRuntime::world_rank();
  const int world_size = MpiRuntime::world_size();
  auto world = mpi_world(std::chrono::duration<double>(f.timeout_s));

  // Every rank validates the same inputs; they agree on the outcome before any rank builds
  // communicators, so a bad input ends every process cleanly instead of leaving some waiting.
  Setup setup;
  std::string error;
  try {
    setup = prepare(f, world_size);
  } catch (const InputError& e) {
    error = e.what();
  }
  double failed[1] = {error.empty() ? 0.0 : 1.0};
  world->all_reduce_max(std::span<double>(failed));
  if (failed[0] > 0) {
    if (!error.empty() && (rank == 0 || world_size == 1)) {
      std::cerr << "parallax: error: " << error << "\n";
    }
    return 2;
  }

  const bool terminal = rank == 0 && isatty(fileno(stderr)) != 0;
#ifdef PARALLAX_HAVE_CUDA_EXECUTOR
  if (rank == 0 && f.backend == "cuda") {
    const cuda::AttentionKernel asked = f.attention == "flash"  ? cuda::AttentionKernel::flash
                                        : f.attention == "gemm" ? cuda::AttentionKernel::gemm
                                                                : cuda::AttentionKernel::automatic;
    const double memory = cuda::device_memory_bytes();
    const bool gemm = cuda::choose_attention(asked, setup.model, setup.plan, 0, memory) ==
                      cuda::AttentionKernel::gemm;
    std::cerr << fmt::format(
        "parallax train: cuda backend on {} ({} ranks), {} GEMMs, {} attention ({:.1f} GiB of "
        "probabilities kept on rank 0 under the GEMM attention, {:.0f} GiB device), MFU against "
        "the {} profile\n",
        cuda::device_name(0), world_size, precision_name(setup.gemm), gemm ? "gemm" : "flash",
        cuda::attention_probability_bytes(setup.model, setup.plan, 0) / (1 << 30),
        memory / (1 << 30), setup.cluster_name);
  }
#endif
  const std::optional<Fault> fault = fault_from_environment();
  try {
    const std::unique_ptr<Trainer> trainer_ptr = make_trainer(f, setup);
    Trainer& trainer = *trainer_ptr;
    if (setup.resume_from) {
      trainer.restore(*setup.resume_from, setup.resume_source);
      if (rank == 0) {
        std::cerr << fmt::format("parallax train: resumed from step {} in {}\n",
                                 trainer.steps_done(), f.checkpoint_dir);
      }
    } else if (f.resume && rank == 0) {
      std::cerr << fmt::format("parallax train: no checkpoint in {}, starting from step 0\n",
                               f.checkpoint_dir);
    }
    std::ofstream log;
    if (rank == 0 && !f.log.empty()) {
      log.open(f.log, std::ios::app);
      if (!log)
        throw InputError(f.log, "--log", "a writable file", "cannot open");
    }
    const auto save = [&]() {
      Checkpoint ck = trainer.checkpoint();
      if (rank == 0) {
        ck.extra = {{"plan", plan_to_json(setup.plan)},
                    {"data", f.data.empty() ? "synthetic" : f.data},
                    {"lr", f.lr}};
        write_checkpoint(f.checkpoint_dir, ck, f.keep);
      }
    };
    // Rank 0 prints each step once its figures are complete (at once, or under the
    // asynchronous parameter server when the servers have applied it).
    std::map<std::int64_t, std::vector<int>> stragglers; // step → ranks flagged in it
    const auto print = [&](const std::vector<StepStats>& steps) {
      for (const StepStats& st : steps) {
        Json j = step_line(st);
        if (auto it = stragglers.find(st.step); it != stragglers.end())
          j["stragglers"] = it->second;
        const std::string line = j.dump();
        std::cout << line << "\n" << std::flush;
        if (log)
          log << line << "\n" << std::flush;
        if (terminal) {
          std::cerr << fmt::format("\rstep {}/{}  loss {:.4f}  {:.0f} tokens/s  MFU {:.1f}%   ",
                                   st.step, f.steps, st.loss, st.tokens_per_s, 100 * st.mfu)
                    << (st.step == f.steps ? "\n" : "") << std::flush;
        }
      }
    };
    std::map<std::pair<int, std::string>, Json> op_seconds; // (rank, op) → its times per step
    int op_steps = 0;
    // Every rank's busy time each step (not under the asynchronous server, whose workers run
    // apart on purpose: a per-step exchange would put the barrier back).
    const bool watch =
        world_size > 1 && !setup.plan.async_ps() && setup.plan.parameter_servers == 0;
    StragglerMonitor monitor(*world);
    while (trainer.steps_done() < f.steps) {
      const bool last = trainer.steps_done() + 1 == f.steps;
      // The first step warms caches and the allocator: op times come from the others.
      const bool timed = !f.op_times.empty() && (trainer.steps_done() > 0 || f.steps == 1);
      if (watch)
        monitor.begin_step();
      if (fault && fault->slow_ms > 0 && fault->rank == rank)
        std::this_thread::sleep_for(std::chrono::milliseconds(fault->slow_ms));
      trainer.step((last && !f.trace.empty()) || timed);
      const std::int64_t done = trainer.steps_done();
      if (watch)
        stragglers[done] = monitor.end_step();
      if (timed) {
        const Timeline t = trainer.timeline();
        if (rank == 0) {
          for (const OpTime& op : timeline_op_times(t)) {
            Json& row = op_seconds[{op.rank, op.name}];
            if (row.is_null())
              row = {{"rank", op.rank},
                     {"name", op.name},
                     {"category", category_name(op.category)},
                     {"seconds", Json::array()}};
            row["seconds"].push_back(op.seconds);
          }
          ++op_steps;
        }
        if (last && !f.trace.empty()) {
          if (rank == 0)
            json_write_file(f.trace, timeline_to_chrome_trace(t));
        }
      }
      print(trainer.finished_steps());
      if (!f.checkpoint_dir.empty() &&
          ((f.checkpoint_every > 0 && done % f.checkpoint_every == 0) || last)) {
        save();
        print(trainer.finished_steps());
      }
      if (fault && fault->slow_ms == 0 && fault->rank == rank && fault->step == done) {
        if (!fault->hang)
          std::raise(SIGKILL);
        for (;;)
          std::this_thread::sleep_for(std::chrono::seconds(1));
      }
    }
    trainer.drain();
    print(trainer.finished_steps());
    if (rank == 0 && watch && !monitor.summary().empty())
      std::cerr << "parallax train: stragglers (busy > 1.1x the median rank): " << monitor.summary()
                << "\n";
    if (!f.trace.empty() && f.op_times.empty()) {
      const Timeline t = trainer.timeline();
      if (rank == 0)
        json_write_file(f.trace, timeline_to_chrome_trace(t));
    }
    if (!f.op_times.empty() && rank == 0) {
      Json doc = {{"steps", op_steps}, {"ops", Json::array()}};
      for (auto& [key, row] : op_seconds)
        doc["ops"].push_back(std::move(row));
      json_write_file(f.op_times, doc);
    }
    world->barrier();
  } catch (const std::exception& e) {
    // One rank failing mid-run (a dead peer, a timeout, a full disk) must end the whole job.
    std::cerr << fmt::format("parallax train: rank {}: error: {}\n", rank, e.what());
    if (world_size > 1)
      MpiRuntime::abort(dynamic_cast<const InputError*>(&e) ? 2 : 1);
    return dynamic_cast<const InputError*>(&e) ? 2 : 1;
  }
  return 0;
}

} // namespace

void set_command_line(int argc, char** argv) {
  g_argv.assign(argv, argv + argc);
}

Run register_train(CLI::App& app) {
  auto f = std::make_shared<TrainFlags>();
  auto* cmd = app.add_subcommand(
      "train", "Train a model with a plan, one MPI process per rank (mpirun -np N parallax train)");
  cmd->add_option("--model", f->model, "Zoo name or model JSON (GPT or Llama family)")->required();
  cmd->add_option("--plan", f->plan, "Plan JSON; dp·tp·pp must equal the process count")
      ->required();
  cmd->add_option("--backend", f->backend,
                  "cpu (Eigen + MPI) or cuda (cuBLASLt + own kernels + NCCL, one GPU per process)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--precision", f->precision,
                  "GEMM precision: fp32 (cpu, cuda), tf32 or bf16 (cuda; bf16 is its default: "
                  "bf16 GEMM inputs, fp32 master weights and accumulation)");
  cmd->add_option("--attention", f->attention,
                  "cuda attention kernels: gemm (batched GEMMs on tensor cores, keeps the "
                  "seq x seq probabilities), flash (CUDA cores, keeps only their log-sum-exp) or "
                  "auto (gemm when the probabilities fit in a quarter of the device memory)");
  cmd->add_option("--cluster", f->cluster,
                  "Profile whose device peak is the MFU denominator (default: cpu-local, or with "
                  "--backend cuda the zoo profile of this GPU)");
  cmd->add_option("--steps", f->steps, "Train until this many optimizer steps are done");
  cmd->add_option("--data", f->data,
                  "uint16 token file (nanoGPT .bin or llm.c); default synthetic");
  cmd->add_option("--seed", f->seed, "Initial weights and synthetic data");
  cmd->add_option("--lr", f->lr, "Peak learning rate (AdamW)");
  cmd->add_option("--warmup-steps", f->warmup, "Linear warm-up steps (default steps/10)");
  cmd->add_option("--decay-steps", f->decay_steps, "Cosine decay horizon (default --steps)");
  cmd->add_option("--weight-decay", f->weight_decay, "AdamW weight decay on matrices");
  cmd->add_option("--clip-grad", f->clip, "Gradient-norm clipping threshold (0: off)");
  cmd->add_option("--checkpoint-dir", f->checkpoint_dir, "Directory for checkpoints");
  cmd->add_option("--checkpoint-every", f->checkpoint_every,
                  "Checkpoint every K steps (and at the end)");
  cmd->add_option("--keep-checkpoints", f->keep, "How many checkpoints to keep");
  cmd->add_flag("--resume", f->resume, "Resume from the newest checkpoint in --checkpoint-dir");
  cmd->add_option("--log", f->log, "Append the per-step JSON lines to this file");
  cmd->add_option("--trace", f->trace, "Write the last step's measured timeline (Chrome trace)");
  cmd->add_option("--op-times", f->op_times,
                  "Write each op's measured seconds per rank and timed step (JSON; the first "
                  "step is not timed)");
  cmd->add_option("--comm-timeout", f->timeout_s,
                  "Seconds before a stuck collective aborts the job");
  return [f]() { return run_train(*f); };
}

} // namespace parallax::cli
