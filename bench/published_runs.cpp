#include "published_runs.hpp"

#include "published_detail.hpp"

#include "parallax/core/error.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/hardware_profiles/stack_loader.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <vector>

namespace parallax {

using namespace published_detail;

namespace {

ModelConfig model_of(const Row& r, const Stack& stack_kernels) {
  ModelConfig c;
  c.name = r.text("model", "name");
  const std::string family = lower(r.text("model", "family"));
  const std::string activation = lower(r.text("model", "ffn_activation"));
  const std::string position = lower(r.text("model", "position_embedding"));
  const std::string stack = lower(r.text("training", "framework"));
  const bool gated = has(activation, "glu") || has(activation, "silu");
  const bool rope = has(position, "rope") || has(position, "rotary");
  const bool llama = has(family, "llama") || has(family, "mistral") || has(family, "qwen") ||
                     (gated && rope && !has(family, "gpt"));
  c.family = llama ? ModelFamily::llama : ModelFamily::gpt;
  c.num_layers = static_cast<int>(r.required_integer("model", "num_layers"));
  c.hidden_size = r.required_integer("model", "hidden_size");
  c.num_attention_heads = static_cast<int>(r.required_integer("model", "num_attention_heads"));
  c.num_kv_heads =
      static_cast<int>(r.integer("model", "num_kv_heads").value_or(c.num_attention_heads));
  c.activation = gated ? "swiglu" : "gelu";
  // Without a stated FFN width: 4h for GELU, Llama's 8h/3 rounded up to 256 for gated units.
  const std::int64_t gated_ffn = (8 * c.hidden_size / 3 + 255) / 256 * 256;
  c.ffn_hidden_size =
      r.integer("model", "ffn_hidden_size").value_or(gated ? gated_ffn : 4 * c.hidden_size);
  c.vocab_size = r.required_integer("model", "vocab_size");
  const std::optional<std::int64_t> seq = r.integer("training", "seq_len");
  c.seq_length = seq ? *seq : r.required_integer("model", "seq_len");
  c.max_position_embeddings = c.seq_length;
  const std::string norm = lower(r.text("model", "norm"));
  c.norm = has(norm, "rms") || (norm.empty() && llama) ? "rmsnorm" : "layernorm";
  c.position_embedding = has(position, "alibi") ? "alibi" : rope ? "rope" : "learned";
  c.bias = r.boolean("model", "bias").value_or(!has(family, "no bias") && !llama);
  c.tied_embeddings = r.boolean("model", "tied_embeddings").value_or(!llama);
  c.dropout = has(stack, "megatron");
  // The stack's attention and cross-entropy kernels, unless the row names the ones it ran.
  c.attention_impl = std::string(attention_kernel_name(stack_kernels.attention));
  c.loss_impl = std::string(loss_kernel_name(stack_kernels.loss));
  const std::string attention = lower(r.text("model", "attention_impl"));
  if (has(attention, "cudnn") || has(attention, "flash3") || has(attention, "flashattention-3") ||
      has(attention, "fa3") || has(attention, "transformer engine") || has(attention, "fused")) {
    c.attention_impl = "flash"; // the device's native fused kernel
    c.attention_impl_stated = true;
  } else if (has(attention, "flash") || has(attention, "triton")) {
    c.attention_impl = "flash2"; // FlashAttention(-2) or Triton kernels: Ampere instructions
    c.attention_impl_stated = true;
  } else if (has(attention, "standard") || has(attention, "materiali") || has(attention, "naive") ||
             has(attention, "eager")) {
    c.attention_impl = "standard";
    c.attention_impl_stated = true;
  }
  const std::string loss = lower(r.text("model", "loss_impl"));
  if (!loss.empty()) {
    c.loss_impl = has(loss, "unfused") || has(loss, "eager") ? "unfused" : "fused";
    c.loss_impl_stated = true;
  }
  if (c.num_kv_heads < 1 || c.num_attention_heads % c.num_kv_heads != 0) {
    r.fail("/model/num_kv_heads", "a divisor of num_attention_heads",
           r.describe("model", "num_kv_heads"));
  }
  moe_and_mla_of(r, c);
  return c;
}

// The zoo profile for the stated GPU, resized and re-wired to the node and network the row
// states: GPUs per node, memory, and the per-GPU share of the node's network bandwidth.
Cluster cluster_of(const Row& r, std::optional<int> year) {
  const std::string gpu = lower(r.text("hardware", "gpu_type"));
  const std::optional<double> memory_gb = r.number("hardware", "gpu_memory_gb");
  std::string profile;
  // The export parts: an A800 or H800 is an A100 or H100 with NVLink cut to 400 GB/s both ways
  // (NVIDIA A800 / H800 SXM datasheets), 200 GB/s per direction.
  const bool export_part = has(gpu, "a800") || has(gpu, "h800");
  if (has(gpu, "pcie") || (has(gpu, " nvl") && !has(gpu, "nvlink"))) {
    // Lower power limits and clocks, and PCIe or NVLink bridges between pairs of GPUs: none of
    // the zoo's SXM profiles describes them.
  } else if (has(gpu, "v100")) {
    profile = "dgx2-v100";
  } else if (has(gpu, "h200")) {
    profile = "dgx-h200";
  } else if (has(gpu, "h100") || has(gpu, "h800")) {
    profile = "dgx-h100";
  } else if (has(gpu, "a100") || has(gpu, "a800")) {
    // Unstated size: the 80 GB part for sources from 2022 on (it shipped at the end of 2020 and
    // is the one the later clusters were built from), the 40 GB part before.
    const bool big = memory_gb ? *memory_gb > 60
                               : has(gpu, "80") || (!has(gpu, "40") && year.value_or(0) >= 2022);
    profile = big ? "dgx-a100-80g" : "dgx-a100-40g";
  }
  if (profile.empty()) {
    r.fail("/hardware/gpu_type", "an SXM V100, A100 / A800 (40 or 80 GB), H100 / H800 or H200",
           r.describe("hardware", "gpu_type"), "the hardware zoo has profiles for these only");
  }
  Cluster c = cluster_load(profile);
  if (export_part) {
    c.node.intra_bandwidth_gbps = std::min(c.node.intra_bandwidth_gbps, 200.0);
  }
  if (memory_gb && *memory_gb > 0 &&
      std::abs(*memory_gb - c.device.memory_gib) > 0.05 * c.device.memory_gib) {
    // Another memory size of the same GPU (a 16 GB V100). A nominal size close to the profile's
    // (80 GB beside the 79.65 GiB an H100 reports) keeps the profile's measured figure.
    c.device.memory_gib = *memory_gb;
  }
  if (const std::optional<std::int64_t> per_node = r.integer("hardware", "gpus_per_node")) {
    if (*per_node > 64) {
      r.fail("/hardware/gpus_per_node", "at most 64", r.describe("hardware", "gpus_per_node"));
    }
    c.node.devices_per_node = static_cast<int>(*per_node);
  }
  if (const std::optional<double> gbps = r.number("hardware", "inter_node_bw_per_node_gbps")) {
    if (*gbps <= 0) {
      r.fail("/hardware/inter_node_bw_per_node_gbps", "a positive number",
             fmt::format("{}", *gbps));
    }
    c.network.inter_bandwidth_gbps = *gbps / 8.0 / c.node.devices_per_node;
  }
  return c;
}

std::optional<Precision> precision_of(const std::string& stated) {
  const std::string p = lower(stated);
  if (has(p, "fp8") || has(p, "float8")) {
    return Precision::fp8;
  }
  if (has(p, "bf16") || has(p, "bfloat16")) {
    return Precision::bf16;
  }
  if (has(p, "fp16") || has(p, "float16") || has(p, "half")) {
    return Precision::fp16;
  }
  if (has(p, "tf32")) {
    return Precision::tf32;
  }
  if (has(p, "fp32") || has(p, "float32")) {
    return Precision::fp32;
  }
  return std::nullopt;
}

std::optional<Recompute> recompute_of(const std::string& stated) {
  const std::string rc = lower(stated);
  if (rc.starts_with("full") || rc.starts_with("activation checkpointing") ||
      rc.starts_with("yes")) {
    return Recompute::full;
  }
  if (rc.starts_with("selective")) {
    return Recompute::selective;
  }
  if (rc.starts_with("none") || rc == "no" || rc.starts_with("no ") || rc.starts_with("off") ||
      rc == "false") {
    return Recompute::none;
  }
  return std::nullopt;
}

void pin_parallelism(const Row& r, PlanPins& pins, int gpus) {
  auto dim = [&](const char* key) -> std::optional<int> {
    const std::optional<std::int64_t> v = r.integer("parallel", key);
    if (v && (*v > gpus || gpus % *v != 0)) {
      r.fail(Row::path("parallel", key), fmt::format("a divisor of the {} GPUs", gpus),
             r.describe("parallel", key));
    }
    return v ? std::optional<int>(static_cast<int>(*v)) : std::nullopt;
  };
  pins.tp = dim("tp");
  pins.pp = dim("pp");
  pins.dp = dim("dp");
  // Context parallelism splits sequences over cp ranks beside dp (Megatron-Core's
  // --context-parallel-size, world = tp·cp·dp·pp); expert parallelism is carved out of dp.
  pins.cp = dim("cp").value_or(1);
  pins.ep = dim("ep").value_or(1);
  // Megatron-Core's --expert-tensor-parallel-size: tp (the default) or 1 (whole experts).
  if (const std::optional<std::int64_t> etp = r.integer("parallel", "expert_tensor_parallel")) {
    if (*etp != 1 && (!pins.tp || *etp != *pins.tp)) {
      r.fail("/parallel/expert_tensor_parallel", "1 or the row's tp",
             r.describe("parallel", "expert_tensor_parallel"),
             "other expert tensor-parallel sizes are not modelled");
    }
    pins.etp = *etp == 1 && pins.tp.value_or(1) > 1 ? 1 : 0;
  }
  if (*pins.cp > 1) { // Megatron-Core's default exchange, and ring attention's
    pins.cp_comm = has(lower(r.text("parallel", "cp_comm_type")), "all_gather") ? CpComm::all_gather
                                                                                : CpComm::p2p;
  }
  if (pins.tp && pins.pp && pins.dp && *pins.tp * *pins.pp * *pins.dp * *pins.cp != gpus) {
    r.fail("/parallel", fmt::format("tp × pp × dp × cp = {} GPUs", gpus),
           fmt::format("{} × {} × {} × {}", *pins.tp, *pins.pp, *pins.dp, *pins.cp));
  }
  if (const std::optional<double> z = r.number("parallel", "zero_stage")) {
    if (*z > 3 || *z != std::floor(*z)) {
      r.fail("/parallel/zero_stage", "0, 1, 2, 3 or null", r.describe("parallel", "zero_stage"));
    }
    pins.zero_stage = static_cast<int>(*z);
  }
  const std::string framework = lower(r.text("training", "framework"));
  if (!pins.zero_stage && has(framework, "distributed optimizer")) {
    pins.zero_stage = 1; // Megatron-LM's distributed optimizer shards the optimizer state
  }
  if (r.boolean("parallel", "fsdp").value_or(false)) {
    const std::string strategy = lower(r.text("parallel", "fsdp_sharding_strategy"));
    if (has(strategy, "hybrid")) {
      r.fail("/parallel/fsdp_sharding_strategy", "FULL_SHARD, SHARD_GRAD_OP or NO_SHARD",
             r.describe("parallel", "fsdp_sharding_strategy"),
             "hybrid sharding (sharded in a node, replicated across) is not modelled");
    }
    if (has(strategy, "shard_grad_op")) {
      pins.zero_stage = 2;
    } else if (has(strategy, "no_shard")) {
      pins.zero_stage = 0;
    } else if (!pins.zero_stage) {
      pins.zero_stage = 3;
    }
  }
  if (!pins.zero_stage) {
    pins.zero_stage = 0; // every stack's default is replicated state (plain data parallelism)
  }
  if (const std::optional<std::int64_t> v = r.integer("parallel", "virtual_pipeline_stages")) {
    pins.virtual_stages = static_cast<int>(*v);
    if (*v > 1) {
      pins.schedule = Schedule::interleaved;
    }
  }
  const std::string schedule = lower(r.text("parallel", "pipeline_schedule"));
  if (pins.pp.value_or(2) > 1 && !pins.schedule) {
    if (schedule.starts_with("interleaved")) {
      pins.schedule = Schedule::interleaved;
    } else if (schedule.starts_with("gpipe")) {
      pins.schedule = Schedule::gpipe;
    } else if (schedule.starts_with("1f1b") && !has(schedule, "interleav")) {
      pins.schedule = Schedule::one_f_one_b;
    }
  }
  if (const std::optional<bool> sp = r.boolean("parallel", "sequence_parallel")) {
    pins.sequence_parallel = *sp;
  }
}

Stack stack_from_zoo(const Row& r, const char* field, const std::string& name) {
  try {
    return stack_load(name);
  } catch (const InputError& e) {
    r.fail(field, "a zoo stack name", fmt::format("'{}'", name), e.what());
  }
}

// The peak memory one rank reports, when the row states it and what it measured.
std::optional<MeasuredMemory> measured_memory(const Row& r) {
  double bytes = 0;
  if (const std::optional<double> gib = r.number("measured", "peak_memory_gib"); gib && *gib > 0) {
    bytes = *gib * (1 << 30);
  } else if (const std::optional<double> gb = r.number("measured", "peak_memory_gb");
             gb && *gb > 0) {
    bytes = *gb * 1e9;
  } else {
    return std::nullopt;
  }
  MeasuredMemory m;
  m.bytes = bytes;
  m.definition = r.text("measured", "memory_definition");
  const std::string what = lower(m.definition);
  if (has(what, "max_memory_reserved") || has(what, "memory_reserved")) {
    m.level = MemoryLevel::reserved;
  } else if (has(what, "max_memory_allocated") || has(what, "memory_allocated")) {
    m.level = MemoryLevel::allocated;
  } else if (has(what, "nvidia-smi") || has(what, "nvml")) {
    m.level = MemoryLevel::device;
  } else {
    m.level = std::nullopt; // a figure without its measuring call: reported, not scored
  }
  return m;
}

double measured_time(const Row& r, const PlanRequest& req, std::int64_t seq_length) {
  if (const std::optional<double> t = r.number("measured", "iteration_time_s"); t && *t > 0) {
    return *t;
  }
  const Json* derived = r.at("measured", "derived");
  if (derived != nullptr && derived->is_object()) {
    for (const auto& [key, value] : derived->items()) {
      if (key.starts_with("iteration_time_s") && value.is_number() && value.get<double>() > 0) {
        return value.get<double>();
      }
    }
  }
  if (const std::optional<double> tps = r.number("measured", "tokens_per_s"); tps && *tps > 0) {
    const auto tokens = r.number("training", "global_batch_tokens")
                            .value_or(static_cast<double>(req.global_batch_size * seq_length));
    return tokens / *tps;
  }
  r.fail("/measured", "iteration_time_s, a derived iteration_time_s* or tokens_per_s", "none");
}

} // namespace

std::optional<int> published_year(const Json& row) {
  if (!row.is_object() || !row.contains("source") || !row["source"].is_object()) {
    return std::nullopt;
  }
  for (const char* key : {"key", "title", "location"}) {
    const Json& s = row["source"];
    if (s.contains(key) && s[key].is_string()) {
      if (const std::optional<int> year = year_in_text(s[key].get<std::string>())) {
        return year;
      }
    }
  }
  return std::nullopt;
}

Json published_rows(const Json& doc, const std::string& file) {
  if (doc.is_array()) {
    return doc;
  }
  if (!doc.is_object() || !doc.contains("runs") || !doc["runs"].is_array()) {
    throw InputError(file, "/runs", "an array of runs (or a document that is one)",
                     doc.is_object() && doc.contains("runs") ? json_describe(doc["runs"])
                                                             : json_describe(doc));
  }
  for (const auto& [key, value] : doc.items()) {
    if (key != "runs" && key != "defaults") {
      throw InputError(file, "/" + key, "runs or defaults", "an unknown field");
    }
  }
  if (!doc.contains("defaults")) {
    return doc["runs"];
  }
  const Json& defaults = doc["defaults"];
  if (!defaults.is_object()) {
    throw InputError(file, "/defaults", "an object (fields every row shares)",
                     json_describe(defaults));
  }
  Json rows = Json::array();
  for (const Json& row : doc["runs"]) {
    Json merged = defaults;
    merged.merge_patch(row);
    rows.push_back(std::move(merged));
  }
  return rows;
}

PublishedCase published_case(const Json& row, const std::string& file) {
  const Row r(row, file);
  const std::optional<int> year = published_year(row);
  PublishedCase out;
  out.id = r.id();
  out.source = r.text("source", "key");
  out.framework = r.text("training", "framework");
  if (const std::optional<std::string> named = r.string_or("training", "stack")) {
    out.stack = stack_from_zoo(r, "/training/stack", *named);
  } else if (const FrameworkStack* entry = framework_entry(out.framework, year)) {
    out.stack = stack_load(entry->stack);
    if (entry->loss) {
      out.stack.loss = *entry->loss; // the model code's loss kernel (see the table)
    }
  } else {
    r.fail("/training/framework", "a framework the adapter's stack table names",
           r.describe("training", "framework"),
           "or name a zoo stack in training.stack (`parallax stacks` lists them)");
  }
  out.model = model_of(r, out.stack);
  out.cluster = cluster_of(r, year);
  out.memory = measured_memory(r);

  PlanRequest& req = out.request;
  req.gpus = static_cast<int>(r.required_integer("hardware", "num_gpus"));
  if (req.gpus % out.cluster.node.devices_per_node != 0 &&
      req.gpus > out.cluster.node.devices_per_node) {
    r.fail("/hardware/num_gpus",
           fmt::format("a multiple of the {} GPUs per node", out.cluster.node.devices_per_node),
           r.describe("hardware", "num_gpus"));
  }
  if (const std::optional<std::int64_t> batch = r.integer("training", "global_batch")) {
    req.global_batch_size = *batch;
  } else if (const std::optional<std::int64_t> tokens =
                 r.integer("training", "global_batch_tokens")) {
    req.global_batch_size = std::max<std::int64_t>(1, *tokens / out.model.seq_length);
  } else {
    r.fail("/training/global_batch", "a positive integer (or global_batch_tokens)", "nothing");
  }

  PlanPins& pins = req.pins;
  pin_parallelism(r, pins, req.gpus);
  if (*pins.ep > 1 && !out.model.moe.enabled()) {
    r.fail("/parallel/ep", "1 (the model states no mixture of experts)",
           r.describe("parallel", "ep"));
  }
  if (!pins.sequence_parallel && year && *year <= 2021) {
    // Sequence parallelism was published in 2022 (Korthikanti et al.): earlier runs lack it.
    pins.sequence_parallel = false;
  }
  pins.micro_batch_size = r.integer("training", "micro_batch");
  const std::optional<std::int64_t> accum = r.integer("training", "grad_accum_steps");
  if (!pins.micro_batch_size && accum && pins.dp) {
    // A stated accumulation count fixes the micro-batch: B = global batch / (dp × steps).
    const std::int64_t per_step = *pins.dp * *accum;
    if (req.global_batch_size % per_step == 0) {
      pins.micro_batch_size = req.global_batch_size / per_step;
    }
  }
  pins.recompute = recompute_of(r.text("training", "recompute"));
  const std::string stated_precision = r.text("training", "precision");
  pins.precision = precision_of(stated_precision);
  if (!pins.precision) {
    const std::string p = lower(stated_precision);
    if (!stated_precision.empty() && !has(p, "mixed") && !has(p, "amp")) {
      r.fail("/training/precision", "fp8, bf16, fp16, tf32 or fp32 in the text",
             r.describe("training", "precision"));
    }
    pins.precision = Precision::fp16;
  }
  if (has(lower(stated_precision), "fp32 gradient") || has(lower(stated_precision), "fp32 grad")) {
    // The row states the stack accumulates (and so reduces) gradients in fp32.
    out.stack.data_parallel.fp32_grad_reduce = true;
  }
  if (!out.cluster.supports(*pins.precision)) {
    r.fail("/training/precision", fmt::format("a precision the {} profile has", out.cluster.name),
           stated_precision);
  }
  if (r.boolean("training", "activation_cpu_offload").value_or(false)) {
    r.fail("/training/activation_cpu_offload", "false or null", "true",
           "activation offload to host memory is not modelled");
  }
  // Unstated: the planner takes the stack's (PlanRequest::stack).
  pins.overlap_grad_reduce = r.boolean("training", "overlap_grad_reduce");
  req.stack = out.stack;
  out.measured_s = measured_time(r, req, out.model.seq_length);
  return out;
}

std::optional<Recompute> published_recompute_from_flops(const Json& row, const LayerGraph& graph) {
  const auto number = [&](const char* section, const char* key) -> std::optional<double> {
    if (!row.contains(section) || !row[section].is_object() || !row[section].contains(key) ||
        !row[section][key].is_number()) {
      return std::nullopt;
    }
    return row[section][key].get<double>();
  };
  const std::optional<double> tflops = number("measured", "tflops_per_gpu");
  const std::optional<double> time = number("measured", "iteration_time_s");
  const std::optional<double> gpus = number("hardware", "num_gpus");
  const std::optional<double> batch = number("training", "global_batch");
  if (!tflops || !time || !gpus || !batch) {
    return std::nullopt;
  }
  const double reported = *tflops * 1e12 * *gpus * *time;
  double fwd = 0;
  double fwd_blocks = 0;
  for (std::size_t v = 0; v < graph.num_layers(); ++v) {
    fwd += graph.layer(v).fwd_flops;
    fwd_blocks += graph.layer(v).block >= 0 ? graph.layer(v).fwd_flops : 0.0;
  }
  const double without = *batch * 3 * fwd;
  const double with_full = without + *batch * fwd_blocks;
  return std::abs(reported - with_full) < std::abs(reported - without) ? Recompute::full
                                                                       : Recompute::none;
}

} // namespace parallax
