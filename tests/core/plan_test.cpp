#include "parallax/core/error.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/models/model_loader.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>

#include <random>
#include <set>

namespace parallax {
namespace {

const char* kContractPlan = R"({"dp": 8, "tp": 8, "pp": 16, "zero_stage": 1, "micro_batch_size": 1,
  "global_batch_size": 1536, "schedule": "interleaved", "virtual_stages": 2,
  "recompute": "selective", "sequence_parallel": true, "precision": "bf16",
  "grad_sync": "allreduce"})";

TEST(PlanJson, ContractExampleRoundTripsExactly) {
  Plan p = plan_from_json(Json::parse(kContractPlan), "plan.json");
  EXPECT_EQ(p.dp, 8);
  EXPECT_EQ(p.schedule, Schedule::interleaved);
  EXPECT_EQ(p.virtual_stages, 2);
  EXPECT_EQ(p.recompute, Recompute::selective);
  EXPECT_EQ(p.num_microbatches(), 192);
  EXPECT_EQ(plan_from_json(plan_to_json(p), "rt"), p);
  p.stages = stages_even(96, 32);
  EXPECT_EQ(plan_from_json(plan_to_json(p), "rt"), p);
  EXPECT_EQ(plan_to_json(plan_from_json(plan_to_json(p), "rt")), plan_to_json(p));
  // The stack's overlap of gradient reduction is written only when it is off.
  EXPECT_FALSE(plan_to_json(p).contains("overlap_grad_reduce"));
  p.overlap_grad_reduce = false;
  EXPECT_EQ(plan_to_json(p)["overlap_grad_reduce"], false);
  EXPECT_EQ(plan_from_json(plan_to_json(p), "rt"), p);
  // Gradient compression, written only when on.
  EXPECT_FALSE(plan_to_json(p).contains("grad_compression"));
  for (const char* name : {"bf16", "topk:0.05", "topk:1", "powersgd:4"}) {
    p.grad_compression = *grad_compression_parse(name, nullptr);
    EXPECT_EQ(plan_to_json(p)["grad_compression"], name);
    EXPECT_EQ(plan_from_json(plan_to_json(p), "rt"), p);
  }
  p.error_feedback = false;
  p.compression_warmup_steps = 10;
  EXPECT_EQ(plan_from_json(plan_to_json(p), "rt"), p);
  // Uneven data-parallel shares (contract plan: dp 8, micro 1, global 1536, pp 16).
  p.dp_shares = {96, 96, 96, 96, 288, 288, 288, 288};
  EXPECT_EQ(plan_from_json(plan_to_json(p), "rt"), p);
  EXPECT_EQ(p.microbatches_of(4), 288);
  EXPECT_EQ(p.first_microbatch_of(5), 4 * 96 + 288);
  EXPECT_EQ(replica_plan(p, 4).num_microbatches(), 288);
  EXPECT_TRUE(replica_plan(p, 4).dp_shares.empty());
  p.dp_shares.clear();
  EXPECT_EQ(plan_label(p).substr(plan_label(p).find("gc=")), "gc=powersgd:4(no-ef)");
  // Dedicated parameter servers, written only when there are some.
  EXPECT_FALSE(plan_to_json(p).contains("parameter_servers"));
  p.grad_compression = {};
  p.grad_sync = GradSync::parameter_server;
  p.parameter_servers = 4;
  EXPECT_EQ(plan_to_json(p)["parameter_servers"], 4);
  EXPECT_EQ(plan_from_json(plan_to_json(p), "rt"), p);
  EXPECT_NE(plan_label(p).find("servers=4"), std::string::npos);
  Json bad = plan_to_json(p);
  bad["parameter_servers"] = -1;
  EXPECT_THROW(plan_from_json(bad, "bad"), InputError);
}

TEST(PlanJson, DefaultsForOptionalFields) {
  Plan p = plan_from_json(Json::parse(R"({"dp": 2, "tp": 1, "pp": 1, "global_batch_size": 8})"),
                          "p.json");
  EXPECT_EQ(p.zero_stage, 0);
  EXPECT_EQ(p.micro_batch_size, 1);
  EXPECT_EQ(p.schedule, Schedule::one_f_one_b);
  EXPECT_EQ(p.precision, Precision::bf16);
  EXPECT_TRUE(p.overlap_grad_reduce);
  EXPECT_TRUE(p.stages.empty());
}

struct BadPlan {
  const char* what;
  const char* patch;
  const char* field;
};

TEST(PlanJson, MalformedInputsNameTheField) {
  const Json valid = Json::parse(kContractPlan);
  const BadPlan cases[] = {
      {"missing dp", R"({"dp": null})", "/dp"},
      {"wrong type", R"({"tp": "8"})", "/tp"},
      {"negative", R"({"micro_batch_size": -1})", "/micro_batch_size"},
      {"zero stage 4", R"({"zero_stage": 4})", "/zero_stage"},
      {"unknown schedule", R"({"schedule": "zigzag"})", "/schedule"},
      {"unknown precision", R"({"precision": "int4"})", "/precision"},
      {"overlap not a boolean", R"({"overlap_grad_reduce": "no"})", "/overlap_grad_reduce"},
      {"unknown field", R"({"pipeline": 2})", "/pipeline"},
      {"batch not divisible", R"({"global_batch_size": 1537})", "/global_batch_size"},
      {"virtual stages without interleaving", R"({"schedule": "1f1b"})", "/virtual_stages"},
      {"interleaved with v=1", R"({"virtual_stages": 1})", "/virtual_stages"},
      {"stage count", R"({"stages": [[0, 48], [48, 96]]})", "/stages"},
      {"stage gap", R"({"stages": [[0, 3], [4, 6]]})", "/stages/1"},
      {"stage empty", R"({"stages": [[0, 0]]})", "/stages/0"},
      {"stage not pair", R"({"stages": [[0, 1, 2]]})", "/stages/0"},
      {"compression unknown", R"({"grad_compression": "zip"})", "/grad_compression"},
      {"top-k fraction 0", R"({"grad_compression": "topk:0"})", "/grad_compression"},
      {"top-k fraction above 1", R"({"grad_compression": "topk:1.5"})", "/grad_compression"},
      {"top-k fraction nan", R"({"grad_compression": "topk:nan"})", "/grad_compression"},
      {"powersgd rank 0", R"({"grad_compression": "powersgd:0"})", "/grad_compression"},
      {"powersgd rank negative", R"({"grad_compression": "powersgd:-2"})", "/grad_compression"},
      {"powersgd rank missing", R"({"grad_compression": "powersgd"})", "/grad_compression"},
      {"powersgd rank fraction", R"({"grad_compression": "powersgd:2.5"})", "/grad_compression"},
      {"error feedback not bool", R"({"error_feedback": 1})", "/error_feedback"},
      {"negative warm-up", R"({"compression_warmup_steps": -1})", "/compression_warmup_steps"},
      {"negative staleness", R"({"max_staleness": -1})", "/max_staleness"},
      {"staleness not an integer", R"({"max_staleness": 1.5})", "/max_staleness"},
      {"deterministic not bool", R"({"ps_deterministic": "yes"})", "/ps_deterministic"},
      {"unknown grad sync", R"({"grad_sync": "gossip"})", "/grad_sync"},
      {"shares of the wrong count", R"({"dp_shares": [96, 96]})", "/dp_shares"},
      {"shares not adding up", R"({"dp_shares": [1, 1, 1, 1, 1, 1, 1, 1]})", "/dp_shares"},
      {"a share of zero", R"({"dp_shares": [0, 192, 192, 192, 192, 192, 192, 384]})",
       "/dp_shares/0"},
  };
  for (const auto& bad : cases) {
    SCOPED_TRACE(bad.what);
    Json doc = valid;
    doc.merge_patch(Json::parse(bad.patch));
    try {
      plan_from_json(doc, "bad.json");
      ADD_FAILURE() << "accepted";
    } catch (const InputError& e) {
      EXPECT_EQ(e.field(), bad.field) << e.what();
    }
  }
}

TEST(PlanValidate, AgainstModelAndWorld) {
  LoadedModel gpt = model_load("gpt3-175b");
  Plan p = plan_from_json(Json::parse(kContractPlan), "plan.json");
  EXPECT_NO_THROW(plan_validate(p, gpt.graph, 1024, "plan.json"));
  auto field_of = [&](const Plan& q, int world) -> std::string {
    try {
      plan_validate(q, gpt.graph, world, "plan.json");
    } catch (const InputError& e) {
      return e.field();
    }
    return "accepted";
  };
  EXPECT_EQ(field_of(p, 512), "/dp"); // dp·tp·pp ≠ GPUs
  Plan bad_tp = p;
  bad_tp.tp = 5;
  bad_tp.dp = 8;
  EXPECT_EQ(field_of(bad_tp, 640), "/tp"); // 5 does not divide 96 heads
  Plan too_deep = p;
  too_deep.pp = 64;
  too_deep.dp = 2;
  EXPECT_EQ(field_of(too_deep, 1024), "/pp"); // 64 × 2 chunks > 96 layers
  Plan bad_m = p;
  bad_m.global_batch_size = 8 * 8; // m = 8, not a multiple of pp = 16
  EXPECT_EQ(field_of(bad_m, 1024), "/global_batch_size");
  Plan bad_stages = p;
  bad_stages.stages = stages_even(90, 32);
  EXPECT_EQ(field_of(bad_stages, 1024), "/stages");

  // Compression is refused where the plan does not all-reduce whole gradients.
  Plan compressed = p;
  compressed.grad_compression = {.kind = CompressionKind::powersgd, .rank = 4};
  compressed.zero_stage = 1;
  EXPECT_EQ(field_of(compressed, 1024), "/grad_compression");
  compressed.zero_stage = 0;
  compressed.grad_sync = GradSync::parameter_server;
  EXPECT_EQ(field_of(compressed, 1024), "/grad_compression");
  compressed.grad_sync = GradSync::allreduce;
  EXPECT_EQ(field_of(compressed, 1024), "accepted");
  // The asynchronous server runs pure data parallelism, without ZeRO.
  Plan async{.dp = 64, .global_batch_size = 64, .grad_sync = GradSync::parameter_server_async};
  EXPECT_EQ(field_of(async, 64), "accepted");
  async.zero_stage = 1;
  EXPECT_EQ(field_of(async, 64), "/grad_sync");
  Plan async_tp = p; // tp 8, pp 16
  async_tp.zero_stage = 0;
  async_tp.grad_sync = GradSync::parameter_server_async;
  EXPECT_EQ(field_of(async_tp, 1024), "/grad_sync");
  // Dedicated servers: only for a parameter server, over pure data parallelism, even shares.
  Plan servers = async;
  servers.zero_stage = 0;
  servers.parameter_servers = 8;
  EXPECT_EQ(field_of(servers, 64), "accepted");
  EXPECT_EQ(servers.process_count(), 72);
  EXPECT_EQ(servers.server_shards(), 8);
  servers.grad_sync = GradSync::parameter_server;
  EXPECT_EQ(field_of(servers, 64), "accepted");
  servers.grad_sync = GradSync::allreduce;
  EXPECT_EQ(field_of(servers, 64), "/parameter_servers");
  Plan servers_tp = async_tp;
  servers_tp.grad_sync = GradSync::parameter_server;
  servers_tp.parameter_servers = 4;
  EXPECT_EQ(field_of(servers_tp, 1024), "/parameter_servers");

  LoadedModel llama = model_load("llama2-70b");
  Plan gqa{.dp = 1, .tp = 16, .pp = 1, .global_batch_size = 16};
  EXPECT_THROW(plan_validate(gqa, llama.graph, 16, "p"), InputError); // 8 kv heads
}

TEST(RankMapping, EveryRankOnceAndGroupsConsistent) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    Plan p;
    p.dp = 1 << (rng() % 4);
    p.tp = 1 << (rng() % 4);
    p.pp = 1 + static_cast<int>(rng() % 5);
    p.cp = 1 << (rng() % 3);
    p.ep = 1 << (rng() % (1 + std::countr_zero(static_cast<unsigned>(p.dp * p.cp))));
    std::set<std::tuple<int, int, int, int>> seen;
    for (int r = 0; r < p.world_size(); ++r) {
      RankCoords c = rank_coords(p, r);
      ASSERT_EQ(rank_of(p, c), r);
      seen.insert({c.dp, c.pp, c.tp, c.cp});
      auto tp = tp_group(p, r);
      auto dp = dp_group(p, r);
      auto pp = pp_group(p, r);
      auto cp = cp_group(p, r);
      auto dp_cp = dp_cp_group(p, r);
      ASSERT_EQ(static_cast<int>(tp.size()), p.tp);
      ASSERT_EQ(static_cast<int>(dp.size()), p.dp);
      ASSERT_EQ(static_cast<int>(pp.size()), p.pp);
      ASSERT_EQ(static_cast<int>(cp.size()), p.cp);
      ASSERT_EQ(static_cast<int>(dp_cp.size()), p.dp * p.cp);
      EXPECT_EQ(tp[c.tp], r);
      EXPECT_EQ(dp[c.dp], r);
      EXPECT_EQ(pp[c.pp], r);
      EXPECT_EQ(cp[c.cp], r);
      // TP peers are adjacent ranks, so a TP group ≤ devices per node stays inside a node; CP
      // peers come next (stride t), and the dp·cp ranks of a stage are contiguous at stride t.
      EXPECT_EQ(tp.back() - tp.front(), p.tp - 1);
      EXPECT_EQ(cp.back() - cp.front(), (p.cp - 1) * p.tp);
      EXPECT_EQ(dp_cp.back() - dp_cp.front(), (p.dp * p.cp - 1) * p.tp);
      for (int m : dp_cp) {
        const RankCoords o = rank_coords(p, m);
        EXPECT_TRUE(o.pp == c.pp && o.tp == c.tp);
      }
      // Expert parallelism: ep groups are consecutive ranks of the dp·cp group; the expert-DP
      // group holds the same experts (the same dp·cp index mod ep).
      auto ep = ep_group(p, r);
      auto edp = expert_dp_group(p, r);
      const auto index = [&](int m) {
        const RankCoords o = rank_coords(p, m);
        return o.dp * p.cp + o.cp;
      };
      ASSERT_EQ(static_cast<int>(ep.size()), p.ep);
      ASSERT_EQ(static_cast<int>(edp.size()), p.dp * p.cp / p.ep);
      EXPECT_EQ(ep[index(r) % p.ep], r);
      EXPECT_EQ(ep.back() - ep.front(), (p.ep - 1) * p.tp);
      EXPECT_NE(std::find(edp.begin(), edp.end(), r), edp.end());
      for (int m : edp) {
        EXPECT_EQ(index(m) % p.ep, index(r) % p.ep);
      }
    }
    EXPECT_EQ(static_cast<int>(seen.size()), p.world_size());
  }
  EXPECT_EQ(rank_device(13, 8), (DeviceSlot{1, 5}));
}

TEST(StagesEven, CoversAllUnits) {
  auto s = stages_even(10, 4);
  ASSERT_EQ(s.size(), 4U);
  EXPECT_EQ(s[0], (StageRange{0, 3}));
  EXPECT_EQ(s[1], (StageRange{3, 6}));
  EXPECT_EQ(s[2], (StageRange{6, 8}));
  EXPECT_EQ(s[3], (StageRange{8, 10}));
}

} // namespace
} // namespace parallax
