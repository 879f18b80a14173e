// The Stack IR: the zoo loads and round-trips, malformed files name file, field and allowed
// values, an unknown zoo name lists the zoo, and the allocator's rounding rule.
#include "parallax/core/error.hpp"
#include "parallax/core/stack_json.hpp"
#include "parallax/core/zoo_path.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/hardware_profiles/stack_loader.hpp"

#include <gtest/gtest.h>

#include <string>

namespace parallax {
namespace {

TEST(StackZoo, TheNamedStacksLoadWithCitedNotesAndRoundTrip) {
  for (const char* name : {"megatron-core", "megatron-lm-legacy", "megatron-deepspeed", "deepspeed",
                           "pytorch-fsdp", "torchtitan", "llm.c", "parallax"}) {
    SCOPED_TRACE(name);
    const Stack s = stack_load(name);
    EXPECT_EQ(s.name, name);
    EXPECT_GT(s.notes.size(), 200U) << "every value is cited in the notes";
    const Json doc = stack_to_json(s);
    EXPECT_EQ(stack_from_json(doc, "roundtrip"), s);
    EXPECT_EQ(stack_to_json(stack_from_json(doc, "roundtrip")), doc);
  }
  EXPECT_EQ(zoo_list(ZooKind::stacks).size(), 8U);
}

TEST(StackZoo, MechanismsTheStacksDifferIn) {
  // Megatron-LM before 2023: materialised attention, gradients reduced after the flush.
  const Stack legacy = stack_load("megatron-lm-legacy");
  EXPECT_EQ(legacy.attention, AttentionKernel::standard);
  EXPECT_FALSE(legacy.data_parallel.overlap_grad_reduce);
  EXPECT_FALSE(legacy.overlaps_grad_reduce(1));
  // Megatron-Core: native fused attention, fused loss, fp32 main-gradient reduction.
  const Stack core = stack_load("megatron-core");
  EXPECT_EQ(core.attention, AttentionKernel::flash);
  EXPECT_EQ(core.loss, LossKernel::fused);
  EXPECT_TRUE(core.data_parallel.fp32_grad_reduce);
  // FSDP1 keeps one more gathered unit alive (recordStream); eager cross-entropy.
  const Stack fsdp = stack_load("pytorch-fsdp");
  EXPECT_EQ(fsdp.loss, LossKernel::unfused);
  EXPECT_EQ(fsdp.sharding.retained_layers, 1);
  // Megatron-DeepSpeed reduces replicated gradients after the backward but ZeRO-3 partitions
  // from its hooks.
  const Stack mds = stack_load("megatron-deepspeed");
  EXPECT_FALSE(mds.overlaps_grad_reduce(0));
  EXPECT_TRUE(mds.overlaps_grad_reduce(3));
  // Our executor on CPU: no CUDA context or communicator buffers.
  const Stack ours = stack_load("parallax");
  EXPECT_EQ(ours.memory.context_bytes, 0);
  EXPECT_EQ(ours.memory.communicator_bytes, 0);
}

TEST(StackZoo, DefaultIsParallaxOnCpuAndMegatronCoreOnGpu) {
  EXPECT_EQ(stack_default_name(cluster_load("cpu-local")), "parallax");
  EXPECT_EQ(stack_default_name(cluster_load("dgx-h100")), "megatron-core");
}

TEST(StackZoo, UnknownNameListsTheZoo) {
  try {
    (void)stack_load("megatron-lm-2019");
    ADD_FAILURE() << "accepted";
  } catch (const InputError& e) {
    const std::string what = e.what();
    for (const char* name : {"megatron-core", "pytorch-fsdp", "torchtitan", "llm.c", "parallax"}) {
      EXPECT_NE(what.find(name), std::string::npos) << what;
    }
    EXPECT_NE(what.find("parallax stacks"), std::string::npos) << what;
  }
}

struct BadStack {
  const char* what;
  const char* patch; // JSON merge patch applied to a valid stack
  const char* field;
  const char* allowed; // a piece of the allowed values the message must name
};

TEST(StackJson, MalformedInputsNameFileFieldAndAllowedValues) {
  const Json valid = stack_to_json(stack_load("megatron-core"));
  const BadStack cases[] = {
      {"unknown attention", R"({"attention": "xformers"})", "/attention", "flash2"},
      {"unknown loss", R"({"loss": "liger"})", "/loss", "unfused"},
      {"unknown recipe", R"({"fp8_recipe": "mxfp8"})", "/fp8_recipe", "rowwise"},
      {"empty name", R"({"name": ""})", "/name", "non-empty"},
      {"overlap as text", R"({"data_parallel": {"overlap_grad_reduce": "yes"}})",
       "/data_parallel/overlap_grad_reduce", "true or false"},
      {"unknown section field", R"({"data_parallel": {"bucket_mb": 25}})",
       "/data_parallel/bucket_mb", "fp32_grad_reduce"},
      {"negative prefetch", R"({"sharding": {"prefetch_layers": -1}})", "/sharding/prefetch_layers",
       ""},
      {"slowdown above 1", R"({"overlap_compute_slowdown": 1.5})", "/overlap_compute_slowdown",
       "[0, 1]"},
      {"tp overlap above 1", R"({"tp_comm_overlap": 2})", "/tp_comm_overlap", "[0, 1]"},
      {"huge context", R"({"memory": {"context_bytes": 1e14}})", "/memory/context_bytes", "64 GiB"},
      {"negative fragmentation", R"({"memory": {"fragmentation": -0.1}})", "/memory/fragmentation",
       ""},
      {"unknown field", R"({"attn": "flash"})", "/attn", "attention"},
  };
  for (const auto& bad : cases) {
    SCOPED_TRACE(bad.what);
    Json doc = valid;
    doc.merge_patch(Json::parse(bad.patch));
    try {
      (void)stack_from_json(doc, "bad_stack.json");
      ADD_FAILURE() << "accepted";
    } catch (const InputError& e) {
      EXPECT_EQ(e.file(), "bad_stack.json");
      EXPECT_EQ(e.field(), bad.field) << e.what();
      EXPECT_NE(std::string(e.what()).find(bad.allowed), std::string::npos) << e.what();
    }
  }
}

TEST(StackAllocator, RoundsToHalfKilobytesThenToSegments) {
  Stack s;
  s.memory.segment_bytes = 0;
  EXPECT_EQ(allocator_round_bytes(s, 1), 512);
  EXPECT_EQ(allocator_round_bytes(s, 512), 512);
  EXPECT_EQ(allocator_round_bytes(s, 513), 1024);
  s.memory.segment_bytes = 2 << 20; // PyTorch's large-block granularity
  EXPECT_EQ(allocator_round_bytes(s, 3 << 20), 4 << 20);
  EXPECT_EQ(allocator_round_bytes(s, 2 << 20), 2 << 20);
  EXPECT_EQ(allocator_round_bytes(s, (2 << 20) + 1), 4 << 20);
  EXPECT_EQ(allocator_round_bytes(s, 1000), 1024); // small requests share segments
}

TEST(StackFp8, CurrentScalingReadsTheTensorOnceMore) {
  EXPECT_EQ(fp8_cast_traffic_factor(Fp8Recipe::delayed), 1.0);
  EXPECT_GT(fp8_cast_traffic_factor(Fp8Recipe::tensorwise), 1.0);
  EXPECT_GE(fp8_cast_traffic_factor(Fp8Recipe::rowwise),
            fp8_cast_traffic_factor(Fp8Recipe::tensorwise));
}

} // namespace
} // namespace parallax
