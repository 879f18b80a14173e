// The published-run adapter: rows of ../shared/validation/published_runs.json and rows of the same
// schema that it does not hold yet (other GPUs, networks, frameworks, partial rows), each turned
// into a model, a cluster and a pinned request, or refused with the row and field named.
#include "published_runs.hpp"

#include "parallax/core/error.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace parallax {
namespace {

// A complete row in the schema of published_runs.json (a GPT on 16 DGX A100 80GB).
Json base_row() {
  return Json::parse(R"({
    "id": "test-gpt-13b",
    "source": {"key": "example2024", "title": "t", "location": "l"},
    "quality": "full",
    "model": {"name": "GPT 13B", "family": "GPT", "num_layers": 40, "hidden_size": 5120,
              "num_attention_heads": 40, "num_kv_heads": 40, "ffn_hidden_size": 20480,
              "ffn_activation": "gelu", "seq_len": 2048, "vocab_size": 50304,
              "tied_embeddings": true, "position_embedding": "learned absolute"},
    "hardware": {"gpu_type": "NVIDIA A100-SXM4-80GB", "gpu_memory_gb": 80, "gpus_per_node": 8,
                 "inter_node_bw_per_node_gbps": 1600, "num_gpus": 128},
    "parallel": {"tp": 2, "pp": 1, "dp": 64, "cp": 1, "ep": 1, "zero_stage": 1,
                 "virtual_pipeline_stages": null, "pipeline_schedule": null,
                 "sequence_parallel": true},
    "training": {"global_batch": 1024, "micro_batch": 4, "seq_len": 2048,
                 "precision": "bf16", "recompute": "selective", "framework": "Megatron-LM"},
    "measured": {"iteration_time_s": 10.0}
  })");
}

// The field an InputError names for `row`, or "" when the row is accepted; the error's file
// names the document and the row.
std::string refused_field(const Json& row) {
  try {
    (void)published_case(row, "runs.json");
  } catch (const InputError& e) {
    const std::string id = row.is_object() && row.contains("id") && row["id"].is_string()
                               ? row["id"].get<std::string>()
                               : "";
    EXPECT_EQ(e.file(), "runs.json (row '" + id + "')");
    return e.field();
  }
  return "";
}

TEST(PublishedRuns, CompleteRowPinsWhatItStates) {
  const PublishedCase c = published_case(base_row(), "runs.json");
  EXPECT_EQ(c.id, "test-gpt-13b");
  EXPECT_EQ(c.source, "example2024");
  EXPECT_DOUBLE_EQ(c.measured_s, 10.0);
  EXPECT_EQ(c.request.gpus, 128);
  EXPECT_EQ(c.request.global_batch_size, 1024);
  const PlanPins& p = c.request.pins;
  EXPECT_EQ(p.tp, 2);
  EXPECT_EQ(p.pp, 1);
  EXPECT_EQ(p.dp, 64);
  EXPECT_EQ(p.zero_stage, 1);
  EXPECT_EQ(p.micro_batch_size, 4);
  EXPECT_EQ(p.recompute, Recompute::selective);
  EXPECT_EQ(p.precision, Precision::bf16);
  EXPECT_EQ(p.sequence_parallel, true);
  EXPECT_FALSE(p.schedule.has_value());            // one stage: nothing to pin
  EXPECT_FALSE(p.overlap_grad_reduce.has_value()); // a 2024 Megatron-LM overlaps
  EXPECT_EQ(c.model.attention_impl, "flash");
  EXPECT_EQ(c.model.ffn_hidden_size, 20480);
  // Everything the row states about the machine matches the zoo profile: the same cluster.
  EXPECT_EQ(c.cluster, cluster_load("dgx-a100-80g"));
}

TEST(PublishedRuns, NodeNetworkAndMemoryComeFromTheRow) {
  Json row = base_row();
  row["hardware"]["gpu_type"] = "NVIDIA A100 SXM";
  row["hardware"]["gpu_memory_gb"] = 40;
  row["hardware"]["gpus_per_node"] = 4;
  row["hardware"]["inter_node_bw_per_node_gbps"] = 800; // 4 × 200 Gb/s HDR
  const PublishedCase c = published_case(row, "runs.json");
  EXPECT_EQ(c.cluster.name, "dgx-a100-40g");
  EXPECT_EQ(c.cluster.node.devices_per_node, 4);
  EXPECT_DOUBLE_EQ(c.cluster.network.inter_bandwidth_gbps, 25.0); // 800 Gb/s / 8 / 4 GPUs
  EXPECT_DOUBLE_EQ(c.cluster.device.memory_gib, 40.0);

  row["hardware"]["inter_node_bw_per_node_gbps"] = 400; // 4 × 100 Gb/s
  EXPECT_DOUBLE_EQ(published_case(row, "runs.json").cluster.network.inter_bandwidth_gbps, 12.5);

  row["hardware"]["gpu_type"] = "NVIDIA H100 80GB HBM3";
  row["hardware"]["gpu_memory_gb"] = 80;
  EXPECT_EQ(published_case(row, "runs.json").cluster.name, "dgx-h100");
  row["hardware"]["gpu_type"] = "NVIDIA H800 80GB HBM3"; // an H100 with 200 GB/s NVLink
  const PublishedCase h800 = published_case(row, "runs.json");
  EXPECT_EQ(h800.cluster.name, "dgx-h100");
  EXPECT_DOUBLE_EQ(h800.cluster.node.intra_bandwidth_gbps, 200.0);
  EXPECT_EQ(h800.cluster.device, cluster_load("dgx-h100").device);
  row["hardware"]["gpu_type"] = "Tesla V100-SXM2-16GB";
  row["hardware"]["gpu_memory_gb"] = 16;
  row["hardware"]["gpus_per_node"] = 8; // a DGX-1, not the zoo's 16-GPU DGX-2
  row["training"]["precision"] = "mixed fp16";
  const PublishedCase v100 = published_case(row, "runs.json");
  EXPECT_EQ(v100.cluster.name, "dgx2-v100");
  EXPECT_EQ(v100.cluster.node.devices_per_node, 8);
  EXPECT_DOUBLE_EQ(v100.cluster.device.memory_gib, 16.0);
}

TEST(PublishedRuns, LlamaRowsWithRopeGqaAndDefaults) {
  Json row = base_row();
  row["model"] = Json::parse(R"({"name": "Llama 2 70B", "family": "Llama 2", "num_layers": 80,
      "hidden_size": 8192, "num_attention_heads": 64, "num_kv_heads": 8,
      "ffn_activation": "SwiGLU", "vocab_size": 32000, "position_embedding": "RoPE"})");
  const PublishedCase c = published_case(row, "runs.json");
  EXPECT_EQ(c.model.family, ModelFamily::llama);
  EXPECT_EQ(c.model.position_embedding, "rope");
  EXPECT_EQ(c.model.activation, "swiglu");
  EXPECT_EQ(c.model.norm, "rmsnorm");
  EXPECT_FALSE(c.model.bias);
  EXPECT_FALSE(c.model.tied_embeddings);
  EXPECT_EQ(c.model.num_kv_heads, 8);
  EXPECT_EQ(c.model.ffn_hidden_size, 22016); // 8h/3 = 21845.3, rounded up to a multiple of 256
  EXPECT_EQ(c.model.seq_length, 2048);       // from training.seq_len
}

TEST(PublishedRuns, UnstatedDimensionsAreLeftToThePlanner) {
  Json row = base_row();
  for (const char* key : {"tp", "pp", "dp", "sequence_parallel"}) {
    row["parallel"][key] = nullptr;
  }
  row["parallel"]["zero_stage"] = nullptr;
  row["training"]["micro_batch"] = nullptr;
  row["training"]["recompute"] = nullptr;
  const PlanPins p = published_case(row, "runs.json").request.pins;
  EXPECT_FALSE(p.tp || p.pp || p.dp || p.micro_batch_size || p.recompute || p.sequence_parallel);
  EXPECT_EQ(p.zero_stage, 0); // no sharding unless a row says so

  // A stated accumulation count fixes the micro-batch: 1024 / (64 × 4) = 4.
  row["parallel"]["dp"] = 64;
  row["training"]["grad_accum_steps"] = 4;
  EXPECT_EQ(published_case(row, "runs.json").request.pins.micro_batch_size, 4);
}

TEST(PublishedRuns, FrameworkTextMapsToAZooStack) {
  // One table: the framework text (and, for Megatron-LM, the publication year) names the stack.
  EXPECT_EQ(published_stack_name("Megatron-LM (2021)", std::nullopt), "megatron-lm-legacy");
  EXPECT_EQ(published_stack_name("Megatron-LM (PTD-P)", 2021), "megatron-lm-legacy");
  EXPECT_EQ(published_stack_name("Megatron-LM", 2024), "megatron-core");
  EXPECT_EQ(published_stack_name("NVIDIA NeMo", 2024), "megatron-core");
  EXPECT_EQ(published_stack_name("Megatron-DeepSpeed (vTrain measurements, 2024)", 2024),
            "megatron-deepspeed");
  EXPECT_EQ(published_stack_name("Megatron-LM + DeepSpeed ZeRO-3", 2021), "megatron-deepspeed");
  EXPECT_EQ(published_stack_name("DeepSpeed ZeRO-3", 2023), "deepspeed");
  EXPECT_EQ(published_stack_name("MosaicML Composer + llm-foundry (PyTorch FSDP)", 2024),
            "pytorch-fsdp");
  EXPECT_EQ(published_stack_name("nanotron (PyTorch)", 2025), "pytorch-fsdp");
  EXPECT_EQ(published_stack_name("torchtitan (FSDP2, DTensor)", 2024), "torchtitan");
  EXPECT_EQ(published_stack_name("llm.c train_gpt2cu", 2024), "llm.c");
  EXPECT_FALSE(published_stack_name("JAX / MaxText", 2024).has_value());

  Json row = base_row();
  row["source"]["key"] = "narayanan2021";
  row["parallel"]["sequence_parallel"] = nullptr;
  row["training"]["framework"] = "Megatron-LM (2021)";
  PublishedCase c = published_case(row, "runs.json");
  EXPECT_EQ(c.stack.name, "megatron-lm-legacy");
  EXPECT_EQ(c.request.stack.name, "megatron-lm-legacy");
  EXPECT_FALSE(c.request.pins.overlap_grad_reduce.has_value()); // the stack's: after the flush
  EXPECT_FALSE(c.request.stack.overlaps_grad_reduce(1));
  EXPECT_EQ(c.request.pins.sequence_parallel, false); // published in 2022
  EXPECT_EQ(c.model.attention_impl, "standard");      // the stack's kernel
  EXPECT_FALSE(c.model.attention_impl_stated);
  EXPECT_TRUE(c.model.dropout);

  row["training"]["framework"] = "Megatron-LM + DeepSpeed ZeRO-3";
  c = published_case(row, "runs.json");
  EXPECT_EQ(c.stack.name, "megatron-deepspeed");
  EXPECT_TRUE(c.request.stack.overlaps_grad_reduce(3)); // ZeRO-3 reduces from backward hooks
  EXPECT_EQ(c.model.attention_impl, "standard");        // Megatron's model code

  row["training"]["overlap_grad_reduce"] = true; // stated beats the stack
  EXPECT_EQ(published_case(row, "runs.json").request.pins.overlap_grad_reduce, true);

  EXPECT_EQ(published_case(row, "runs.json").model.loss_impl, "fused"); // Megatron's kernel
  row["training"]["framework"] = "PyTorch FSDP";
  c = published_case(row, "runs.json");
  EXPECT_EQ(c.stack.name, "pytorch-fsdp");
  EXPECT_EQ(c.model.loss_impl, "unfused");
  EXPECT_EQ(c.model.attention_impl, "flash2");
  row["model"]["loss_impl"] = "fused (Liger kernel)"; // a stated kernel overrides the stack's
  EXPECT_EQ(published_case(row, "runs.json").model.loss_impl, "fused");
  row["model"]["attention_impl"] = "eager (materialised scores)";
  c = published_case(row, "runs.json");
  EXPECT_EQ(c.model.attention_impl, "standard");
  EXPECT_TRUE(c.model.attention_impl_stated);
  // FlashAttention(-2) and Triton kernels are the Ampere-instruction family; cuDNN and
  // FlashAttention-3 the device's native fused attention.
  row["model"]["attention_impl"] = "flash (llm-foundry attn_impl: flash)";
  EXPECT_EQ(published_case(row, "runs.json").model.attention_impl, "flash2");
  row["model"]["attention_impl"] = "triton";
  EXPECT_EQ(published_case(row, "runs.json").model.attention_impl, "flash2");
  row["model"]["attention_impl"] = "cuDNN fused attention (Transformer Engine)";
  EXPECT_EQ(published_case(row, "runs.json").model.attention_impl, "flash");
  // A precision text that states fp32 gradient accumulation widens the stack's reduction.
  row["training"]["precision"] = "bf16 mixed (fp32 gradient accumulation)";
  EXPECT_TRUE(published_case(row, "runs.json").request.stack.data_parallel.fp32_grad_reduce);
  // A row may name its zoo stack outright; an unknown one is refused naming the field.
  row["training"]["stack"] = "torchtitan";
  EXPECT_EQ(published_case(row, "runs.json").stack.name, "torchtitan");
  row["training"]["stack"] = "no-such-stack";
  EXPECT_EQ(refused_field(row), "/training/stack");
  row["training"].erase("stack");
  row["training"]["framework"] = "JAX / MaxText";
  EXPECT_EQ(refused_field(row), "/training/framework");

  EXPECT_EQ(published_year(row), 2021);
  row["source"] =
      Json::parse(R"({"key": "mpt", "location": "README of 2024-04-22, commit 4952183"})");
  EXPECT_EQ(published_year(row), 2024);
  row["source"] = Json::parse(R"({"key": "llmc", "title": "run 12345"})");
  EXPECT_FALSE(published_year(row).has_value());
}

TEST(PublishedRuns, MeasuredMemoryKeepsWhatTheSourceMeasured) {
  Json row = base_row();
  EXPECT_FALSE(published_case(row, "runs.json").memory.has_value());
  row["measured"]["peak_memory_gib"] = 50.0;
  row["measured"]["memory_definition"] = "torch.cuda.max_memory_reserved() / 2^30 on rank 0";
  PublishedCase c = published_case(row, "runs.json");
  ASSERT_TRUE(c.memory.has_value());
  EXPECT_DOUBLE_EQ(c.memory->bytes, 50.0 * (1 << 30));
  EXPECT_EQ(c.memory->level, MemoryLevel::reserved);
  row["measured"]["memory_definition"] = "torch.cuda.max_memory_allocated()";
  EXPECT_EQ(published_case(row, "runs.json").memory->level, MemoryLevel::allocated);
  row["measured"].erase("peak_memory_gib");
  row["measured"]["peak_memory_gb"] = 70.0;
  row["measured"]["memory_definition"] = "nvidia-smi memory.used";
  c = published_case(row, "runs.json");
  EXPECT_DOUBLE_EQ(c.memory->bytes, 70e9);
  EXPECT_EQ(c.memory->level, MemoryLevel::device);
  row["measured"]["memory_definition"] = "as printed in the paper";
  EXPECT_FALSE(published_case(row, "runs.json").memory->level.has_value()); // not scored
}

TEST(PublishedRuns, UnstatedA100MemoryFollowsThePublicationYear) {
  Json row = base_row();
  row["hardware"]["gpu_type"] = "NVIDIA A100 SXM4 (memory size not stated)";
  row["hardware"]["gpu_memory_gb"] = nullptr;
  row["source"]["key"] = "vtrain2024";
  EXPECT_EQ(published_case(row, "runs.json").cluster.name, cluster_load("dgx-a100-80g").name);
  row["source"]["key"] = "readme2020";
  EXPECT_EQ(published_case(row, "runs.json").cluster.name, cluster_load("dgx-a100-40g").name);
}

TEST(PublishedRuns, SchedulesShardingAndPrecision) {
  Json row = base_row();
  row["parallel"]["tp"] = 8;
  row["parallel"]["pp"] = 4;
  row["parallel"]["dp"] = 4;
  row["parallel"]["pipeline_schedule"] = "interleaved 1F1B";
  EXPECT_EQ(published_case(row, "runs.json").request.pins.schedule, Schedule::interleaved);
  row["parallel"]["pipeline_schedule"] = "1F1B (interleaving not stated)";
  EXPECT_FALSE(published_case(row, "runs.json").request.pins.schedule.has_value());
  row["parallel"]["virtual_pipeline_stages"] = 3;
  PlanPins p = published_case(row, "runs.json").request.pins;
  EXPECT_EQ(p.schedule, Schedule::interleaved);
  EXPECT_EQ(p.virtual_stages, 3);

  row = base_row();
  row["parallel"]["fsdp"] = true;
  row["parallel"]["zero_stage"] = nullptr;
  row["parallel"]["fsdp_sharding_strategy"] = "SHARD_GRAD_OP";
  EXPECT_EQ(published_case(row, "runs.json").request.pins.zero_stage, 2);
  row["parallel"]["fsdp_sharding_strategy"] = "FULL_SHARD";
  EXPECT_EQ(published_case(row, "runs.json").request.pins.zero_stage, 3);

  row = base_row();
  row["hardware"]["gpu_type"] = "NVIDIA H100 SXM5";
  row["training"]["precision"] = "FP8 (Transformer Engine, bf16 master weights)";
  EXPECT_EQ(published_case(row, "runs.json").request.pins.precision, Precision::fp8);
  row["training"]["precision"] = "mixed precision";
  EXPECT_EQ(published_case(row, "runs.json").request.pins.precision, Precision::fp16);
}

TEST(PublishedRuns, MeasuredTimeFromThroughputWhenNoStepTime) {
  Json row = base_row();
  row["measured"] = Json::parse(R"({"iteration_time_s": null, "tokens_per_s": 200000,
                                    "derived": {"note": "none"}})");
  EXPECT_DOUBLE_EQ(published_case(row, "runs.json").measured_s, 1024.0 * 2048 / 200000);
  row["measured"]["derived"] = Json::parse(R"({"iteration_time_s_from_eq3": 12.5})");
  EXPECT_DOUBLE_EQ(published_case(row, "runs.json").measured_s, 12.5);
}

TEST(PublishedRuns, RowsThatCannotBeModelledNameTheirField) {
  struct Refused {
    const char* what;
    const char* patch; // JSON merge patch on the complete row (null removes a field)
    const char* field;
  };
  const Refused cases[] = {
      {"context parallelism not dividing the GPUs", R"({"parallel": {"cp": 3}})", "/parallel/cp"},
      {"2 x 1 x 64 x 2 is not 128", R"({"parallel": {"cp": 2}})", "/parallel"},
      {"expert parallelism of a dense model", R"({"parallel": {"ep": 8}})", "/parallel/ep"},
      {"more experts per token than experts",
       R"({"model": {"moe": {"num_experts": 4, "experts_per_token": 8,
                             "expert_ffn_hidden_size": 64}}})",
       "/model/moe"},
      {"hybrid sharding",
       R"({"parallel": {"fsdp": true, "fsdp_sharding_strategy": "HYBRID_SHARD"}})",
       "/parallel/fsdp_sharding_strategy"},
      {"2 x 1 x 32 is not 128", R"({"parallel": {"dp": 32}})", "/parallel"},
      {"malformed dimension", R"({"parallel": {"tp": "eight"}})", "/parallel/tp"},
      {"no profile", R"({"hardware": {"gpu_type": "AMD MI250X"}})", "/hardware/gpu_type"},
      {"PCIe card", R"({"hardware": {"gpu_type": "NVIDIA A100 PCIe 40GB"}})", "/hardware/gpu_type"},
      {"NVL card", R"({"hardware": {"gpu_type": "NVIDIA H100 NVL"}})", "/hardware/gpu_type"},
      {"FP8 on an A100", R"({"training": {"precision": "fp8"}})", "/training/precision"},
      {"no step time", R"({"measured": {"iteration_time_s": null, "tflops_per_gpu": 150}})",
       "/measured"},
      {"no hidden size", R"({"model": {"hidden_size": null}})", "/model/hidden_size"},
      {"kv heads not dividing", R"({"model": {"num_kv_heads": 7}})", "/model/num_kv_heads"},
      {"activation offload", R"({"training": {"activation_cpu_offload": true}})",
       "/training/activation_cpu_offload"},
  };
  for (const Refused& c : cases) {
    SCOPED_TRACE(c.what);
    Json row = base_row();
    row.merge_patch(Json::parse(c.patch));
    EXPECT_EQ(refused_field(row), c.field);
  }
  EXPECT_EQ(refused_field(Json::array()), "/");
  EXPECT_EQ(refused_field(Json::parse(R"({"id": 3})")), "/id");
}

TEST(PublishedRuns, FileDefaultsAreMergedUnderEveryRow) {
  const Json doc = Json::parse(R"({
    "defaults": {"source": {"key": "shared", "title": "t"}, "training": {"precision": "bf16",
                 "framework": "Megatron-LM"}},
    "runs": [{"id": "a", "training": {"micro_batch": 2}},
             {"id": "b", "source": {"key": "own"}, "training": {"precision": null}}]
  })");
  const Json rows = published_rows(doc, "runs.json");
  ASSERT_EQ(rows.size(), 2U);
  EXPECT_EQ(rows[0]["source"]["key"], "shared");
  EXPECT_EQ(rows[0]["training"]["precision"], "bf16");
  EXPECT_EQ(rows[0]["training"]["micro_batch"], 2);
  EXPECT_EQ(rows[1]["source"]["key"], "own"); // the row's own field wins
  EXPECT_EQ(rows[1]["source"]["title"], "t");
  EXPECT_FALSE(rows[1]["training"].contains("precision")); // null removes a default
  EXPECT_EQ(rows[1]["training"]["framework"], "Megatron-LM");
  // A plain array is its own rows; anything else names the field.
  EXPECT_EQ(published_rows(Json::array({Json{{"id", "x"}}}), "runs.json").size(), 1U);
  for (const char* bad : {R"({"rows": []})", R"({"runs": {}})", R"({"runs": [], "defaults": []})",
                          R"({"runs": [], "extra": 1})", "3"}) {
    SCOPED_TRACE(bad);
    EXPECT_THROW(published_rows(Json::parse(bad), "runs.json"), InputError);
  }
}

TEST(PublishedRuns, EveryPublishedRowIsModelled) {
  const std::filesystem::path file = PARALLAX_VALIDATION_FILE;
  if (!std::filesystem::exists(file)) {
    GTEST_SKIP() << "no published runs at " << file;
  }
  const Json rows = json_load_file(file);
  ASSERT_TRUE(rows.is_array());
  for (const Json& row : rows) {
    const PublishedCase c = published_case(row, file.string());
    EXPECT_GT(c.measured_s, 0) << c.id;
    // The rows state the zoo's machines: resizing to the row's nodes changes nothing else.
    EXPECT_EQ(c.cluster.device, cluster_load(c.cluster.name).device) << c.id;
  }
}

} // namespace
} // namespace parallax
