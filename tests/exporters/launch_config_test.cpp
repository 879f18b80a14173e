// Launch configurations against golden files (tests/golden/launch), and the plans each target
// cannot express refused with the plan field named. The golden files are also parsed by
// Python's tomllib, json and yaml (check_launch_configs.py).
#include <gtest/gtest.h>

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"
#include "parallax/core/json_reader.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/exporters/launch_config.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/model_loader.hpp"

#include <fstream>
#include <sstream>

namespace {

using namespace parallax;

const std::string kGolden = std::string(PARALLAX_TEST_DATA_DIR) + "/../golden/launch/";

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct Export {
  std::string model, plan, format, golden;
};

std::string run_export(const Export& e, Plan* plan_out = nullptr) {
  LoadedModel m = model_load(e.model);
  const Cluster c = cluster_load("dgx-a100-80g");
  Plan p = plan_from_json(json_load_file(kGolden + e.plan), e.plan);
  if (plan_out)
    *plan_out = p;
  const auto format = *enum_from_name<LaunchFormat>(kLaunchFormatNames, e.format);
  return launch_config(format, {.plan = &p,
                                .model = &m.graph.info(),
                                .cluster = &c,
                                .source = e.plan,
                                .model_arg = e.model,
                                .plan_path = "gpt3.plan.json"});
}

class LaunchGolden : public ::testing::TestWithParam<Export> {};

TEST_P(LaunchGolden, MatchesTheGoldenFile) {
  const Export& e = GetParam();
  const std::string got = run_export(e);
  if (std::getenv("PARALLAX_UPDATE_GOLDEN") != nullptr) {
    std::ofstream(kGolden + e.golden) << got;
  }
  EXPECT_EQ(got, read(kGolden + e.golden)) << "regenerate with PARALLAX_UPDATE_GOLDEN=1";
}

INSTANTIATE_TEST_SUITE_P(
    Formats, LaunchGolden,
    ::testing::Values(
        Export{"gpt3-175b", "gpt3-175b-tp8pp8v2.plan.json", "megatron", "gpt3-megatron.sh"},
        Export{"gpt3-175b", "gpt3-175b-tp8pp8v2.plan.json", "slurm", "gpt3-slurm.sbatch"},
        Export{"gpt3-175b", "gpt3-175b-tp8pp8v2.plan.json", "mpijob", "gpt3-mpijob.yaml"},
        Export{"gpt3-175b", "gpt3-175b-tp8pp8-1f1b.plan.json", "deepspeed", "gpt3-deepspeed.json"},
        Export{"llama2-70b", "llama2-70b-tp8pp8v2.plan.json", "torchtitan",
               "llama2-70b-torchtitan.toml"}),
    [](const auto& test) {
      std::string n = test.param.golden;
      for (char& ch : n)
        ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
      return n;
    });

TEST(LaunchConfig, MegatronCarriesTheDegreesAndBatches) {
  const std::string a = run_export({"gpt3-175b", "gpt3-175b-tp8pp8v2.plan.json", "megatron", ""});
  for (const char* flag :
       {"--tensor-model-parallel-size 8", "--pipeline-model-parallel-size 8",
        "--num-layers-per-virtual-pipeline-stage 6", "--micro-batch-size 1",
        "--global-batch-size 1536", "--sequence-parallel", "--recompute-granularity selective",
        "--use-distributed-optimizer", "--bf16", "--nnodes 128 --nproc-per-node 8"}) {
    EXPECT_NE(a.find(flag), std::string::npos) << flag;
  }
}

std::string refusal(const Export& e) {
  try {
    run_export(e);
  } catch (const InputError& err) {
    return err.what();
  }
  return "accepted";
}

TEST(LaunchConfig, WhatATargetCannotExpressIsRefusedByField) {
  // GPT-3 is no torchtitan model; DeepSpeed has no interleaved schedule; Megatron's
  // distributed optimizer is ZeRO-1 only.
  EXPECT_NE(
      refusal({"gpt3-175b", "gpt3-175b-tp8pp8v2.plan.json", "torchtitan", ""}).find("model family"),
      std::string::npos);
  EXPECT_NE(
      refusal({"gpt3-175b", "gpt3-175b-tp8pp8v2.plan.json", "deepspeed", ""}).find("/schedule"),
      std::string::npos);
  LoadedModel m = model_load("llama2-70b");
  const Cluster c = cluster_load("dgx-a100-80g");
  Plan p = plan_from_json(json_load_file(kGolden + "llama2-70b-tp8pp8v2.plan.json"), "p");
  const LaunchInput in{.plan = &p, .model = &m.graph.info(), .cluster = &c, .source = "p"};
  const auto field_of = [&](LaunchFormat f) {
    try {
      launch_config(f, in);
    } catch (const InputError& err) {
      const std::string w = err.what();
      return w.substr(w.find("field '") + 7,
                      w.find('\'', w.find("field '") + 7) - w.find("field '") - 7);
    }
    return std::string("accepted");
  };
  EXPECT_EQ(field_of(LaunchFormat::megatron), "/zero_stage"); // ZeRO-3
  p.zero_stage = 1;
  EXPECT_EQ(field_of(LaunchFormat::torchtitan), "/zero_stage");
  p.zero_stage = 3;
  p.grad_compression = *grad_compression_parse("powersgd:4", nullptr);
  EXPECT_EQ(field_of(LaunchFormat::torchtitan), "/grad_compression");
  p.grad_compression = {};
  p.grad_sync = GradSync::hierarchical;
  EXPECT_EQ(field_of(LaunchFormat::megatron), "/grad_sync");
  p.grad_sync = GradSync::allreduce;
  p.stages = {{0, 4}};
  for (int i = 1; i < 16; ++i)
    p.stages.push_back({4 + (i - 1) * 76 / 15, 4 + i * 76 / 15});
  EXPECT_EQ(field_of(LaunchFormat::torchtitan), "/stages");
  p.stages.clear();
  EXPECT_EQ(field_of(LaunchFormat::torchtitan), "accepted");
  EXPECT_EQ(field_of(LaunchFormat::slurm), "accepted");
}

} // namespace
