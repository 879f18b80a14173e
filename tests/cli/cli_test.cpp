// Runs the parallax binary as a user would and checks exit codes and output.
#include <gtest/gtest.h>

#include "parallax/core/cluster_json.hpp"
#include "parallax/core/json_reader.hpp"

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

namespace {

struct Result {
  int code;
  std::string out;
};

Result run(const std::string& args) {
  std::string command = std::string(PARALLAX_BINARY) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf{};
  while (pipe != nullptr && fgets(buf.data(), buf.size(), pipe) != nullptr) {
    out += buf.data();
  }
  int status = pipe != nullptr ? pclose(pipe) : -1;
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

TEST(Cli, ModelsListsTheZooFromAnyDirectory) {
  Result r = run("models");
  EXPECT_EQ(r.code, 0) << r.out;
  for (const char* name : {"gpt3-175b", "llama3-405b", "megatron-1t", "bert-large", "gpt-tiny"}) {
    EXPECT_NE(r.out.find(name), std::string::npos) << name;
  }
  Result elsewhere = run("clusters");
  EXPECT_EQ(elsewhere.code, 0);
  EXPECT_NE(elsewhere.out.find("dgx-h100"), std::string::npos);
}

TEST(Cli, UnknownSubcommandAndFlagsFail) {
  EXPECT_NE(run("frobnicate").code, 0);
  EXPECT_NE(run("").code, 0);
  EXPECT_NE(run("models --no-such-flag").code, 0);
}

} // namespace

namespace {

std::string temp_path(const char* name) {
  return (std::filesystem::temp_directory_path() / name).string();
}

TEST(Cli, PlanPrintsRankedTableAndWritesBestPlan) {
  const std::string out = temp_path("parallax_cli_best_plan.json");
  Result r = run("plan --model gpt3-175b --cluster dgx-a100-80g --gpus 1024 --global-batch 1536 "
                 "--top 5 --explain --out " +
                 out);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("tokens/s"), std::string::npos);
  EXPECT_NE(r.out.find("the next plan is"), std::string::npos);
  std::ifstream in(out);
  ASSERT_TRUE(in.good());
  parallax::Json plan = parallax::Json::parse(in);
  EXPECT_EQ(plan["dp"].get<int>() * plan["tp"].get<int>() * plan["pp"].get<int>(), 1024);
  // simulate reads the written plan and agrees with the planner's figures.
  Result sim =
      run("simulate --model gpt3-175b --cluster dgx-a100-80g --gpus 1024 --json --plan " + out);
  ASSERT_EQ(sim.code, 0) << sim.out;
  parallax::Json figures = parallax::Json::parse(sim.out);
  for (const char* key : {"iteration_time_s", "tokens_per_s", "tflops_per_gpu", "mfu",
                          "peak_memory_bytes", "memory", "breakdown"}) {
    EXPECT_TRUE(figures.contains(key)) << key;
  }
  Result json = run("plan --model gpt3-175b --cluster dgx-a100-80g --gpus 1024 --global-batch 1536 "
                    "--top 3 --json");
  ASSERT_EQ(json.code, 0) << json.out;
  parallax::Json ranked = parallax::Json::parse(json.out);
  ASSERT_EQ(ranked["plans"].size(), 3U);
  EXPECT_DOUBLE_EQ(ranked["plans"][0]["iteration_time_s"].get<double>(),
                   figures["iteration_time_s"].get<double>());
  EXPECT_LE(ranked["plans"][0]["iteration_time_s"].get<double>(),
            ranked["plans"][1]["iteration_time_s"].get<double>());
}

TEST(Cli, PlanHonoursPins) {
  Result r = run("plan --model llama2-70b --cluster dgx-h100 --gpus 64 --global-batch 512 "
                 "--tp 8 --pp 4 --schedule interleaved --json --top 4");
  ASSERT_EQ(r.code, 0) << r.out;
  const parallax::Json doc = parallax::Json::parse(r.out);
  for (const auto& p : doc["plans"]) {
    EXPECT_EQ(p["plan"]["tp"], 8);
    EXPECT_EQ(p["plan"]["pp"], 4);
    EXPECT_EQ(p["plan"]["schedule"], "interleaved");
  }
  // A stack that reduces gradients after the backward: the plans say so and are no faster.
  Result serial = run("plan --model llama2-70b --cluster dgx-h100 --gpus 64 --global-batch 512 "
                      "--tp 8 --pp 4 --schedule interleaved --json --top 4 "
                      "--overlap-grad-reduce off");
  ASSERT_EQ(serial.code, 0) << serial.out;
  const parallax::Json serial_doc = parallax::Json::parse(serial.out);
  for (const auto& p : serial_doc["plans"]) {
    EXPECT_EQ(p["plan"]["overlap_grad_reduce"], false);
  }
  EXPECT_GE(serial_doc["plans"][0]["iteration_time_s"].get<double>(),
            doc["plans"][0]["iteration_time_s"].get<double>());
  Result bad = run("plan --model llama2-70b --cluster dgx-h100 --gpus 64 --global-batch 512 "
                   "--overlap-grad-reduce maybe");
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.out.find("--overlap-grad-reduce"), std::string::npos) << bad.out;
}

TEST(Cli, NothingFitsSaysWhatCameClosest) {
  Result r = run("plan --model megatron-1t --cluster dgx-a100-80g --gpus 8 --global-batch 8");
  EXPECT_EQ(r.code, 4) << r.out;
  EXPECT_NE(r.out.find("closest"), std::string::npos) << r.out;
}

TEST(Cli, BadInputsExitTwoNamingTheField) {
  const std::string plan = temp_path("parallax_cli_bad_plan.json");
  std::ofstream(plan) << R"({"dp": 3, "tp": 1, "pp": 1, "global_batch_size": 12})";
  Result r = run("simulate --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --plan " + plan);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("/dp"), std::string::npos) << r.out;
  Result zoo = run("plan --model no-such-model --cluster dgx-a100-80g");
  EXPECT_EQ(zoo.code, 2);
  EXPECT_NE(zoo.out.find("--model"), std::string::npos);
  Result choice = run("plan --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --schedule zigzag");
  EXPECT_EQ(choice.code, 2);
  EXPECT_NE(choice.out.find("--schedule"), std::string::npos);
  Result fp8 = run("plan --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --precision fp8");
  EXPECT_EQ(fp8.code, 2) << fp8.out;
}

// The software stack: listed, chosen with --stack, recorded in the plan and reused from it,
// printed by plan and simulate; unknown names and malformed files exit 2 naming what is wrong.
TEST(Cli, StackIsChosenRecordedAndPrinted) {
  Result list = run("stacks");
  ASSERT_EQ(list.code, 0) << list.out;
  for (const char* name : {"megatron-core", "megatron-lm-legacy", "megatron-deepspeed", "deepspeed",
                           "pytorch-fsdp", "torchtitan", "llm.c", "parallax"}) {
    EXPECT_NE(list.out.find(name), std::string::npos) << name;
  }
  const std::string plan = temp_path("parallax_cli_stack_plan.json");
  Result fsdp = run("plan --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --global-batch 64 "
                    "--stack pytorch-fsdp --top 3 --out " +
                    plan);
  ASSERT_EQ(fsdp.code, 0) << fsdp.out;
  EXPECT_NE(fsdp.out.find("stack pytorch-fsdp"), std::string::npos) << fsdp.out;
  std::ifstream in(plan);
  const parallax::Json doc = parallax::Json::parse(in);
  EXPECT_EQ(doc.at("stack"), "pytorch-fsdp");
  // simulate reuses the plan's stack and prints the three memory levels.
  Result sim = run("simulate --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --plan " + plan);
  ASSERT_EQ(sim.code, 0) << sim.out;
  EXPECT_NE(sim.out.find("stack pytorch-fsdp"), std::string::npos) << sim.out;
  EXPECT_NE(sim.out.find("reserved"), std::string::npos) << sim.out;
  Result json =
      run("simulate --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --json --plan " + plan);
  ASSERT_EQ(json.code, 0) << json.out;
  const parallax::Json est = parallax::Json::parse(json.out);
  EXPECT_EQ(est.at("stack"), "pytorch-fsdp");
  EXPECT_GE(est.at("peak_reserved_bytes").get<double>(), est.at("peak_memory_bytes").get<double>());
  EXPECT_GT(est.at("peak_device_bytes").get<double>(), est.at("peak_reserved_bytes").get<double>());
  // The plan takes the stack's gradient-reduction timing unless its file states one.
  const std::string timing = temp_path("parallax_cli_stack_timing.json");
  auto overlap_under = [&](const char* plan_text, const char* stack) {
    std::ofstream(timing) << plan_text;
    Result r = run("simulate --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --json --plan " +
                   timing + " --stack " + stack);
    EXPECT_EQ(r.code, 0) << r.out;
    const parallax::Json p = parallax::Json::parse(r.out).at("plan");
    return p.value("overlap_grad_reduce", true);
  };
  const char* unstated = R"({"dp": 8, "tp": 1, "pp": 1, "global_batch_size": 64})";
  const char* stated =
      R"({"dp": 8, "tp": 1, "pp": 1, "global_batch_size": 64, "overlap_grad_reduce": false})";
  EXPECT_TRUE(overlap_under(unstated, "megatron-core"));
  EXPECT_FALSE(overlap_under(unstated, "megatron-lm-legacy")); // reduces after the flush
  EXPECT_FALSE(overlap_under(stated, "megatron-core"));        // the file's word wins
  // The default on a GPU profile is megatron-core, on a CPU profile our own executor.
  Result gpu = run("plan --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --global-batch 64");
  EXPECT_NE(gpu.out.find("stack megatron-core"), std::string::npos) << gpu.out;
  Result cpu = run("plan --model gpt-tiny --cluster cpu-local --gpus 2 --global-batch 8 "
                   "--precision fp32");
  EXPECT_NE(cpu.out.find("stack parallax"), std::string::npos) << cpu.out;

  Result unknown = run("plan --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --stack nope");
  EXPECT_EQ(unknown.code, 2) << unknown.out;
  EXPECT_NE(unknown.out.find("--stack"), std::string::npos) << unknown.out;
  EXPECT_NE(unknown.out.find("torchtitan"), std::string::npos) << unknown.out;
  const std::string bad = temp_path("parallax_cli_bad_stack.json");
  std::ofstream(bad) << R"({"name": "mine", "attention": "xformers"})";
  Result malformed = run("simulate --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --plan " +
                         plan + " --stack " + bad);
  EXPECT_EQ(malformed.code, 2) << malformed.out;
  EXPECT_NE(malformed.out.find(bad), std::string::npos) << malformed.out;
  EXPECT_NE(malformed.out.find("/attention"), std::string::npos) << malformed.out;
  EXPECT_NE(malformed.out.find("flash2"), std::string::npos) << malformed.out;
}

// `train --backend cuda` hands over to the CUDA-linked parallax-cuda when the build has one; on
// a machine without a GPU (or a build without nvcc) it is a clean input error either way, and
// a precision the chosen backend does not run is one too.
TEST(Cli, TrainBackendAndPrecisionAreChecked) {
  const std::string plan = temp_path("parallax_cli_train_plan.json");
  std::ofstream(plan) << R"({"dp": 1, "tp": 1, "pp": 1, "micro_batch_size": 2,
                             "global_batch_size": 2})";
  const std::string base = "train --model gpt-tiny --steps 1 --plan " + plan;
  Result cpu_tf32 = run(base + " --precision tf32");
  EXPECT_EQ(cpu_tf32.code, 2) << cpu_tf32.out;
  EXPECT_NE(cpu_tf32.out.find("--precision"), std::string::npos) << cpu_tf32.out;
  Result cuda = run(base + " --backend cuda --precision fp8");
  EXPECT_EQ(cuda.code, 2) << cuda.out;
  Result cuda_tf32 = run(base + " --backend cuda");
  if (cuda_tf32.code == 0) {
    GTEST_SKIP() << "a CUDA device is present: the GPU tests (ctest -L gpu) cover training";
  }
  EXPECT_EQ(cuda_tf32.code, 2) << cuda_tf32.out;
  EXPECT_NE(cuda_tf32.out.find("--backend"), std::string::npos) << cuda_tf32.out;
  EXPECT_NE(cuda_tf32.out.find("CUDA"), std::string::npos) << cuda_tf32.out;
}

} // namespace

namespace {

TEST(Cli, SimulateWritesChromeTrace) {
  const std::string plan = temp_path("parallax_cli_trace_plan.json");
  const std::string trace = temp_path("parallax_cli_trace.json");
  std::ofstream(plan) << R"({"dp": 2, "tp": 2, "pp": 2, "micro_batch_size": 1,
    "global_batch_size": 8, "schedule": "1f1b", "zero_stage": 1})";
  Result r = run("simulate --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --json --plan " +
                 plan + " --trace " + trace);
  ASSERT_EQ(r.code, 0) << r.out;
  std::ifstream in(trace);
  ASSERT_TRUE(in.good());
  parallax::Json doc = parallax::Json::parse(in);
  std::set<std::pair<int, int>> tracks;
  for (const auto& e : doc["traceEvents"]) {
    if (e["ph"] == "X") {
      tracks.insert({e["pid"].get<int>(), e["tid"].get<int>()});
    }
  }
  // Two simulated ranks (one per stage), each with compute, TP, PP and DP streams in use.
  EXPECT_EQ(tracks.size(), 8U);
  Result analytic = run("simulate --model gpt2-124m --cluster dgx-a100-80g --gpus 8 --analytic "
                        "--json --plan " +
                        plan);
  ASSERT_EQ(analytic.code, 0) << analytic.out;
  const double sim = parallax::Json::parse(r.out)["iteration_time_s"].get<double>();
  const double ana = parallax::Json::parse(analytic.out)["iteration_time_s"].get<double>();
  EXPECT_NEAR(sim / ana, 1.0, 0.25);
}

} // namespace

namespace {

TEST(Cli, CalibrateWritesAValidProfileAndCompareScoresPlans) {
  const std::string profile = temp_path("parallax_cli_calibrated.json");
  Result r = run("calibrate --backend cpu --quick --out " + profile);
  ASSERT_EQ(r.code, 0) << r.out;
  // The profile loads as a cluster (the loader checks the efficiency curve's order too).
  const parallax::Json doc = parallax::json_load_file(profile);
  const parallax::Cluster c = parallax::cluster_from_json(doc, profile);
  EXPECT_EQ(c.device.kind, "cpu");
  EXPECT_GT(c.peak_flops(parallax::Precision::fp32), 1e9);
  EXPECT_GT(c.device.memory_bandwidth_gbps, 0.1);
  EXPECT_GT(c.device.elementwise_efficiency, 0.0);
  EXPECT_GT(c.device.optimizer_efficiency, 0.0); // the executor's AdamW pass, measured
  EXPECT_LE(c.device.optimizer_efficiency, 1.0);
  EXPECT_GE(c.device.gemm_efficiency.size(), 5u);
  for (const auto& p : c.device.gemm_efficiency) {
    EXPECT_GT(p.efficiency, 0);
    EXPECT_LE(p.efficiency, 1.0 + 1e-12);
  }
  EXPECT_EQ(c.node.devices_per_node, 1);

  const std::string plans = temp_path("parallax_cli_compare_plans.json");
  {
    std::ofstream f(plans);
    f << R"([{"dp":1,"tp":1,"pp":1,"micro_batch_size":2,"global_batch_size":4,"precision":"fp32"},
             {"dp":1,"tp":1,"pp":1,"micro_batch_size":4,"global_batch_size":8,"precision":"fp32",
              "recompute":"full"}])";
  }
  const std::string report = temp_path("parallax_cli_compare_report.html");
  std::filesystem::remove(report);
  r = run("compare --model gpt-tiny --cluster " + profile + " --plans " + plans +
          " --steps 3 --json --report " + report + " 2>/dev/null");
  ASSERT_EQ(r.code, 0) << r.out;
  const parallax::Json out = parallax::json_parse_text(r.out, "compare output");
  ASSERT_EQ(out.at("plans").size(), 2u);
  double sum = 0;
  for (const auto& p : out.at("plans")) {
    const double m = p.at("measured_step_time_s").get<double>();
    const double s = p.at("simulated_step_time_s").get<double>();
    EXPECT_GT(m, 0);
    EXPECT_GT(s, 0);
    EXPECT_NEAR(p.at("error").get<double>(), (s - m) / m, 1e-12);
    sum += std::abs((s - m) / m);
    EXPECT_GT(p.at("measured_peak_memory_bytes").get<double>(), 0);
    EXPECT_GT(p.at("simulated_peak_memory_bytes").get<double>(), 0);
    EXPECT_GT(p.at("measured_breakdown").at("compute").get<double>(), 0);
    EXPECT_GT(p.at("simulated_breakdown").at("compute").get<double>(), 0);
  }
  EXPECT_NEAR(out.at("mape").get<double>(), sum / 2, 1e-12);
  EXPECT_LE(std::abs(out.at("kendall_tau").get<double>()), 1.0);
  // The report has the comparison and both timelines of the first plan.
  std::ifstream in(report);
  const std::string html((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(html.find("id=\"compare\""), std::string::npos);
  EXPECT_NE(html.find("measured (plan 1"), std::string::npos);
  EXPECT_NE(html.find("simulated (plan 1"), std::string::npos);
}

// Per-op comparison on 2 ranks: every op of the step program, simulated and measured, for every
// op class (ZeRO-3 gathers and reductions, pipeline messages, TP collectives, recomputation).
TEST(Cli, CompareReportsEveryOpWithBothTimes) {
  const std::string plans = temp_path("parallax_cli_compare_ops.json");
  {
    std::ofstream f(plans);
    f << R"([{"dp":2,"tp":1,"pp":1,"micro_batch_size":2,"global_batch_size":8,"precision":"fp32",
              "zero_stage":3,"recompute":"full"},
             {"dp":1,"tp":1,"pp":2,"micro_batch_size":2,"global_batch_size":8,"precision":"fp32"},
             {"dp":1,"tp":2,"pp":1,"micro_batch_size":2,"global_batch_size":8,"precision":"fp32"}])";
  }
  const std::string report = temp_path("parallax_cli_compare_ops.html");
  const Result r = run("compare --model gpt-tiny --plans " + plans + " --steps 3 --json --report " +
                       report + " 2>/dev/null");
  ASSERT_EQ(r.code, 0) << r.out;
  const parallax::Json out = parallax::json_parse_text(r.out, "compare output");
  std::set<std::string> categories;
  for (const auto& p : out.at("plans")) {
    ASSERT_FALSE(p.at("ops").empty());
    for (const auto& op : p.at("ops")) {
      EXPECT_TRUE(op.at("simulated_s").is_number()) << op.dump();
      EXPECT_TRUE(op.at("measured_s").is_number()) << op.dump();
      EXPECT_GE(op.value("measured_s", -1.0), 0.0) << op.dump();
      categories.insert(op.at("category").get<std::string>());
    }
  }
  for (const char* c :
       {"forward", "backward", "recompute", "optimizer", "tp_comm", "pp_comm", "dp_comm"}) {
    EXPECT_TRUE(categories.contains(c)) << c;
  }
  std::ifstream in(report);
  const std::string html((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(html.find("Per op, plan 1"), std::string::npos);
  EXPECT_NE(html.find("gather u0 mb0"), std::string::npos); // plan 1 is ZeRO-3
  EXPECT_NE(html.find("ops with both times"), std::string::npos);
}

TEST(Cli, ExportWritesDotSvgAndHtml) {
  const std::string plan = temp_path("parallax_cli_export_plan.json");
  {
    std::ofstream f(plan);
    f << R"({"dp":2,"tp":2,"pp":2,"zero_stage":1,"micro_batch_size":1,"global_batch_size":8})";
  }
  const std::string dot = temp_path("parallax_cli_export_graph.dot");
  Result r = run("export --model gpt-tiny --cluster dgx-a100-80g --plan " + plan +
                 " --format dot --out " + dot);
  ASSERT_EQ(r.code, 0) << r.out;
  std::ifstream d(dot);
  const std::string dot_text((std::istreambuf_iterator<char>(d)), std::istreambuf_iterator<char>());
  EXPECT_EQ(dot_text.rfind("digraph \"gpt-tiny\"", 0), 0u) << dot_text;

  const std::string svg = temp_path("parallax_cli_export_mesh.svg");
  std::filesystem::remove(temp_path("parallax_cli_export_mesh.dot"));
  r = run("export --model gpt-tiny --cluster dgx-a100-80g --plan " + plan +
          " --format svg --view mesh --out " + svg);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(std::filesystem::exists(temp_path("parallax_cli_export_mesh.dot")));
  EXPECT_GT(std::filesystem::file_size(svg), 1000u);

  const std::string timeline = temp_path("parallax_cli_export_timeline.svg");
  r = run("export --model gpt-tiny --cluster dgx-a100-80g --plan " + plan +
          " --format svg --view timeline --out " + timeline);
  ASSERT_EQ(r.code, 0) << r.out;

  // Without --plan the planner chooses; the report carries the search.
  const std::string html = temp_path("parallax_cli_export_report.html");
  r = run("export --model gpt3-175b --cluster dgx-a100-80g --gpus 64 --global-batch 256 "
          "--format html --out " +
          html);
  ASSERT_EQ(r.code, 0) << r.out;
  std::ifstream h(html);
  const std::string page((std::istreambuf_iterator<char>(h)), std::istreambuf_iterator<char>());
  for (const char* id : {"plans", "candidates", "memory", "timeline", "layer-graph", "mesh"}) {
    EXPECT_NE(page.find(std::string("<section id=\"") + id + "\""), std::string::npos) << id;
  }
}

TEST(Cli, ExportWritesLaunchConfigurationsOrRefusesByField) {
  const std::string plan = temp_path("parallax_cli_launch_plan.json");
  {
    std::ofstream f(plan);
    f << R"({"dp":2,"tp":2,"pp":2,"zero_stage":1,"micro_batch_size":1,"global_batch_size":8,)"
         R"("sequence_parallel":true})";
  }
  const std::string sbatch = temp_path("parallax_cli_launch.sbatch");
  Result r = run("export --model gpt-tiny --cluster dgx-a100-80g --plan " + plan +
                 " --format slurm --out " + sbatch);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(std::filesystem::exists(temp_path("parallax_cli_launch.plan.json")));
  r = run("export --model gpt-tiny --cluster dgx-a100-80g --plan " + plan +
          " --format megatron --out " + temp_path("parallax_cli_launch.sh"));
  ASSERT_EQ(r.code, 0) << r.out;
  // gpt-tiny is a GPT: torchtitan has no such model; ZeRO-1 with a pipeline is fine for
  // DeepSpeed but sequence parallelism is not.
  r = run("export --model gpt-tiny --cluster dgx-a100-80g --plan " + plan +
          " --format torchtitan --out " + temp_path("parallax_cli_launch.toml"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("model family"), std::string::npos) << r.out;
  r = run("export --model gpt-tiny --cluster dgx-a100-80g --plan " + plan +
          " --format deepspeed --out " + temp_path("parallax_cli_launch.json"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("/sequence_parallel"), std::string::npos) << r.out;
}

TEST(Cli, ExportRejectsATimelineAsDot) {
  const Result r = run("export --model gpt-tiny --cluster dgx-a100-80g --gpus 1 --format dot "
                       "--view timeline --out /tmp/parallax_cli_x.dot");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--view"), std::string::npos) << r.out;
}

TEST(Cli, CompareRejectsABadPlanList) {
  const std::string plans = temp_path("parallax_cli_compare_bad.json");
  {
    std::ofstream f(plans);
    f << R"({"plans": 3})";
  }
  const Result r = run("compare --model gpt-tiny --plans " + plans);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("parallax_cli_compare_bad.json"), std::string::npos) << r.out;
}

} // namespace
