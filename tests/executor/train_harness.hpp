// Shared harness of the end-to-end executor tests: runs `parallax train` (under mpirun when
// there are several ranks) with a plan built from a Case, and compares runs.
#pragma once

#include <gtest/gtest.h>

#include "parallax/core/json_reader.hpp"
#include "parallax/core/plan.hpp"
#include "parallax/executor/checkpoint.hpp"

#include <fmt/format.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <ostream>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace parallax_test {

namespace fs = std::filesystem;
using parallax::Checkpoint;
using parallax::Json;

struct Result {
  int code = -1;
  std::string out;
};

inline Result shell(const std::string& command) {
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  Result r;
  std::array<char, 4096> buf{};
  while (pipe != nullptr && fgets(buf.data(), buf.size(), pipe) != nullptr)
    r.out += buf.data();
  const int status = pipe != nullptr ? pclose(pipe) : -1;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

inline std::string mpirun(int np) {
  return fmt::format("mpirun {} --oversubscribe --bind-to none -np {} ",
                     geteuid() == 0 ? "--allow-run-as-root" : "", np);
}

inline fs::path work_dir() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / fmt::format("parallax_train_mpi_{}", getpid());
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

// 8-layer versions of the zoo's tiny models, so pipelines of 4 stages × 2 chunks fit.
inline fs::path model_file(const std::string& family) {
  const fs::path path = work_dir() / (family + "-8l.json");
  if (!fs::exists(path)) {
    const bool moe = family == "moe" || family == "moecap";
    Json m = family != "llama" && !moe ? Json{{"name", "gpt-tiny-8l"},
                                              {"family", "gpt"},
                                              {"activation", "gelu"},
                                              {"norm", "layernorm"},
                                              {"position_embedding", "learned"},
                                              {"bias", true},
                                              {"tied_embeddings", true},
                                              {"num_kv_heads", 4},
                                              {"ffn_hidden_size", 256}}
                                       : Json{{"name", "llama-tiny-8l"},      {"family", "llama"},
                                              {"activation", "swiglu"},       {"norm", "rmsnorm"},
                                              {"position_embedding", "rope"}, {"bias", false},
                                              {"tied_embeddings", false},     {"num_kv_heads", 2},
                                              {"ffn_hidden_size", 176}};
    m["num_layers"] = 8;
    m["hidden_size"] = 64;
    m["num_attention_heads"] = 4;
    m["vocab_size"] = 256;
    if (moe) { // Llama blocks, the first dense, then 8 experts (top-2) + 1 shared
      m["name"] = "moe-tiny-8l";
      m["ffn_hidden_size"] = 128;
      m["moe"] = {{"num_experts", 8},    {"experts_per_token", 2},  {"expert_ffn_hidden_size", 32},
                  {"shared_experts", 1}, {"first_dense_layers", 1}, {"aux_loss_coef", 0.01}};
    }
    if (family == "moecap") { // the same with a capacity: at most 8 of a sequence's copies each
      m["name"] = "moe-tiny-8l-capacity";
      m["moe"]["capacity_factor"] = 1.0;
    }
    if (family == "oddgpt") { // a prime vocabulary (padded for tp) and 6 heads
      m["name"] = "gpt-odd-8l";
      m["hidden_size"] = 96;
      m["num_attention_heads"] = 6;
      m["num_kv_heads"] = 6;
      m["ffn_hidden_size"] = 384;
      m["vocab_size"] = 251;
    }
    m["seq_length"] = 32;
    m["max_position_embeddings"] = 32;
    parallax::json_write_file(path, m);
  }
  return path;
}

struct Case {
  std::string family = "gpt";
  int dp = 1, tp = 1, pp = 1;
  int cp = 1;                 // context parallelism
  bool cp_all_gather = false; // its K/V exchange: all-gathered (else the ring)
  int ep = 1;                 // expert parallelism (divides dp · cp)
  int zero = 0;
  std::string schedule = "1f1b";
  int v = 1;
  std::string recompute = "none";
  bool sp = false;
  int micro = 2;
  std::string sync = "allreduce";
  bool overlap = true;              // the plan's overlap_grad_reduce
  bool even_stages = false;         // write the stages (an even split) into the plan
  std::string compression = "none"; // the plan's grad_compression
  bool error_feedback = true;
  int compression_warmup = 0;
  int max_staleness = 1; // the asynchronous parameter server's bound
  bool ps_deterministic = false;
  int servers = 0;         // dedicated parameter-server processes (parameter_servers)
  std::vector<int> shares; // uneven micro-batches per data-parallel replica (dp_shares)
  std::vector<std::pair<int, int>> stages; // explicit (uneven) stage ranges
};

// `text` with only letters, digits and underscores ("topk:0.05" -> "topk_0p05").
inline std::string word(std::string text) {
  for (char& ch : text) {
    if (ch == '.')
      ch = 'p';
    else if (!std::isalnum(static_cast<unsigned char>(ch)))
      ch = '_';
  }
  return text;
}

inline std::string case_name(const Case& c) {
  return fmt::format(
             "{}_d{}t{}p{}{}_z{}_{}{}_{}{}_mb{}{}{}", c.family, c.dp, c.tp, c.pp,
             (c.cp > 1 ? fmt::format("c{}{}", c.cp, c.cp_all_gather ? "ag" : "") : "") +
                 (c.ep > 1 ? fmt::format("e{}", c.ep) : ""),
             c.zero, c.schedule == "1f1b" ? "onefoneb" : c.schedule,
             c.v > 1 ? fmt::format("v{}", c.v) : "", c.recompute, c.sp ? "_sp" : "", c.micro,
             c.sync == "allreduce" ? ""
             : c.sync == "parameter_server_async"
                 ? fmt::format("_psasync_k{}{}", c.max_staleness, c.ps_deterministic ? "_det" : "")
                 : "_" + c.sync,
             c.overlap ? "" : "_serial_reduce") +
         (c.stages.empty() ? "" : fmt::format("_stages_{}", c.stages.front().second)) +
         (c.servers > 0 ? fmt::format("_servers{}", c.servers) : "") +
         (c.shares.empty() ? ""
                           : "_shares" +
                                 [&] {
                                   std::string out;
                                   for (int v : c.shares)
                                     out += fmt::format("_{}", v);
                                   return out;
                                 }()) +
         (c.compression == "none"
              ? ""
              : fmt::format("_gc_{}{}_w{}", word(c.compression), c.error_feedback ? "" : "_noef",
                            c.compression_warmup));
}

// gtest prints parameters in test names and failure messages with this.
inline void PrintTo(const Case& c, std::ostream* os) {
  *os << case_name(c);
}

constexpr int kGlobalBatch = 16;
constexpr int kSteps = 5;

struct TrainRun {
  int code = -1;
  std::vector<Json> steps; // the --log lines
  Checkpoint final_state;  // the newest checkpoint
  std::string output;
};

struct TrainArgs {
  std::string extra; // more flags
  int steps = kSteps;
  std::string dir;   // run directory under work_dir(); default: the case's name
  bool fresh = true; // empty the directory first
  std::string env;   // environment assignments put before the command
  bool expect_success = true;
  int comm_timeout_s = 60;
};

inline fs::path write_plan(const Case& c, const fs::path& file) {
  const Json plan = {{"dp", c.dp},
                     {"tp", c.tp},
                     {"pp", c.pp},
                     {"zero_stage", c.zero},
                     {"micro_batch_size", c.micro},
                     {"global_batch_size", kGlobalBatch},
                     {"schedule", c.schedule},
                     {"virtual_stages", c.v},
                     {"recompute", c.recompute},
                     {"sequence_parallel", c.sp},
                     {"precision", "fp32"},
                     {"grad_sync", c.sync},
                     {"overlap_grad_reduce", c.overlap}};
  Json doc = plan;
  if (c.cp > 1) {
    doc["cp"] = c.cp;
    doc["cp_comm"] = c.cp_all_gather ? "all_gather" : "p2p";
  }
  if (c.ep > 1)
    doc["ep"] = c.ep;
  if (!c.shares.empty())
    doc["dp_shares"] = c.shares;
  for (const auto& [first, last] : c.stages)
    doc["stages"].push_back({first, last});
  if (c.servers > 0)
    doc["parameter_servers"] = c.servers;
  if (c.sync == "parameter_server_async") {
    doc["max_staleness"] = c.max_staleness;
    doc["ps_deterministic"] = c.ps_deterministic;
  }
  if (c.compression != "none") {
    doc["grad_compression"] = c.compression;
    doc["error_feedback"] = c.error_feedback;
    doc["compression_warmup_steps"] = c.compression_warmup;
  }
  if (c.even_stages) {
    for (const parallax::StageRange& r : parallax::stages_even(8, c.pp * c.v))
      doc["stages"].push_back({r.first, r.second});
  }
  parallax::json_write_file(file, doc);
  return file;
}

// Trains case `c` with seed 7, peak lr 1e-3, 2 warm-up steps and a 20-step cosine, logging and
// checkpointing into the run directory.
inline TrainRun train(const Case& c, const TrainArgs& a = {}) {
  const fs::path dir = work_dir() / (a.dir.empty() ? case_name(c) : a.dir);
  if (a.fresh)
    fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path plan = write_plan(c, dir / fmt::format("plan-{}.json", case_name(c)));
  const int np = c.dp * c.cp * c.tp * c.pp + c.servers;
  const Result r = shell(fmt::format(
      "{} {}{} train --model {} --plan {} --steps {} --seed 7 --lr 1e-3 --warmup-steps 2 "
      "--decay-steps 20 --checkpoint-dir {} --log {} --comm-timeout {} {}",
      a.env, np > 1 ? mpirun(np) : "", PARALLAX_BINARY, model_file(c.family).string(),
      plan.string(), a.steps, (dir / "ckpt").string(), (dir / "log.jsonl").string(),
      a.comm_timeout_s, a.extra));
  TrainRun run;
  run.code = r.code;
  run.output = r.out;
  if (a.expect_success) {
    EXPECT_EQ(r.code, 0) << r.out;
  }
  if (r.code != 0)
    return run;
  std::ifstream log(dir / "log.jsonl");
  for (std::string line; std::getline(log, line);)
    run.steps.push_back(Json::parse(line));
  if (auto ck = parallax::read_latest_checkpoint(dir / "ckpt"))
    run.final_state = std::move(*ck);
  return run;
}

// ‖a − b‖ / ‖b‖ over every tensor of the model at once. (Per tensor, parameters whose exact
// gradient is zero — the key bias, which softmax ignores — take Adam steps on rounding noise
// and cannot match across reduction orders; the model as a whole must. The key bias's moments,
// pure noise, are left out of the moment comparison.)
struct Accum {
  double num = 0;
  double den = 0;
  void add(const std::vector<float>& a, const std::vector<float>& b) {
    ASSERT_EQ(a.size(), b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
      den += static_cast<double>(b[i]) * b[i];
    }
  }
  double rel() const { return den > 0 ? std::sqrt(num / den) : std::sqrt(num); }
};

inline void expect_same_training(const TrainRun& got, const TrainRun& ref, double tol) {
  ASSERT_EQ(got.steps.size(), ref.steps.size()) << got.output;
  for (std::size_t i = 0; i < ref.steps.size(); ++i) {
    for (const char* key : {"loss", "grad_norm", "lr"}) {
      const double a = got.steps[i][key].get<double>();
      const double b = ref.steps[i][key].get<double>();
      EXPECT_LE(std::abs(a - b), tol * std::abs(b)) << key << " at step " << i + 1;
    }
  }
  ASSERT_EQ(got.final_state.tensors.size(), ref.final_state.tensors.size());
  EXPECT_EQ(got.final_state.step, ref.final_state.step);
  EXPECT_EQ(got.final_state.samples, ref.final_state.samples);
  Accum value, m1, m2;
  std::string worst; // per-tensor differences, for the failure message
  for (std::size_t i = 0; i < ref.final_state.tensors.size(); ++i) {
    const auto& a = got.final_state.tensors[i];
    const auto& b = ref.final_state.tensors[i];
    ASSERT_EQ(a.name, b.name);
    ASSERT_EQ(a.shape, b.shape) << a.name;
    Accum one;
    one.add(a.exp_avg, b.exp_avg);
    worst += fmt::format("{} {:.2e}; ", a.name, one.rel());
    value.add(a.value, b.value);
    if (a.name.ends_with(".attn.bk"))
      continue; // zero gradient: its moments are rounding noise
    m1.add(a.exp_avg, b.exp_avg);
    m2.add(a.exp_avg_sq, b.exp_avg_sq);
  }
  EXPECT_LE(value.rel(), tol) << "parameters";
  // Moments are raw gradient statistics: summed in another order (4-way tensor-parallel partial
  // sums, data-parallel all-reduce) they carry fp32 rounding of ~1e-5 relative, so they get a
  // 10× looser bound than the parameters, loss and gradient norm.
  EXPECT_LE(m1.rel(), 10 * tol) << "first moments; per tensor: " << worst;
  EXPECT_LE(m2.rel(), 10 * tol) << "second moments";
}

} // namespace parallax_test
