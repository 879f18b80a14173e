#include "parallax/exporters/launch_config.hpp"

#include "parallax/core/error.hpp"
#include "parallax/core/grad_compression.hpp"
#include "parallax/core/json_reader.hpp"
#include "parallax/core/plan_json.hpp"
#include "parallax/core/precision.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace parallax {

namespace {

[[noreturn]] void cannot(const LaunchInput& in, std::string_view target, const std::string& field,
                         const std::string& accepts, const std::string& found) {
  throw InputError(in.source, field, fmt::format("{} for a {} export", accepts, target), found);
}

// What no target here expresses: Parallax's own reductions and layouts.
void common_checks(const LaunchInput& in, std::string_view target) {
  const Plan& p = *in.plan;
  if (p.grad_sync != GradSync::allreduce && p.grad_sync != GradSync::tree) {
    cannot(in, target, "/grad_sync", "\"allreduce\" or \"tree\" (NCCL's own algorithms)",
           "\"" + std::string(grad_sync_name(p.grad_sync)) + "\"");
  }
  if (p.grad_compression.enabled()) {
    cannot(in, target, "/grad_compression", "\"none\"",
           "\"" + grad_compression_name(p.grad_compression) + "\"");
  }
  if (!p.dp_shares.empty()) {
    cannot(in, target, "/dp_shares", "even data-parallel shares", "uneven shares");
  }
  if (!p.stages.empty() && p.stages != stages_even(in.model->num_layers, p.pp * p.virtual_stages)) {
    cannot(in, target, "/stages", "the even split of the layers over the stages",
           "uneven stage ranges");
  }
}

std::string precision_flags_megatron(Precision p) {
  switch (p) {
  case Precision::bf16:
    return " --bf16";
  case Precision::fp16:
    return " --fp16";
  case Precision::fp8:
    return " --bf16 --fp8-format hybrid";
  case Precision::tf32:
  case Precision::fp32:
    return "";
  }
  return "";
}

std::string megatron(const LaunchInput& in) {
  const Plan& p = *in.plan;
  const GraphInfo& g = *in.model;
  common_checks(in, "Megatron-LM");
  if (p.zero_stage >= 2) {
    cannot(in, "Megatron-LM", "/zero_stage",
           "0 or 1 (--use-distributed-optimizer shards the optimizer state only)",
           std::to_string(p.zero_stage));
  }
  if (p.schedule == Schedule::gpipe && p.pp > 1) {
    cannot(in, "Megatron-LM", "/schedule", "\"1f1b\" or \"interleaved\"", "\"gpipe\"");
  }
  const NodeLayout n = node_layout(p, *in.cluster);
  std::string a =
      fmt::format("torchrun --nnodes {} --nproc-per-node {} pretrain_gpt.py \\\n"
                  "  --num-layers {} --hidden-size {} --num-attention-heads {} --seq-length {} "
                  "--max-position-embeddings {} \\\n",
                  n.nodes, n.per_node, g.num_layers, g.hidden_size, g.num_attention_heads,
                  g.seq_length, g.seq_length);
  if (g.ffn_hidden_size > 0) {
    a += fmt::format("  --ffn-hidden-size {} \\\n", g.ffn_hidden_size);
  }
  if (g.num_kv_heads < g.num_attention_heads) {
    a += fmt::format("  --group-query-attention --num-query-groups {} \\\n", g.num_kv_heads);
  }
  if (g.family == "llama") {
    a += "  --swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear \\\n";
  }
  if (!g.tied_embeddings) {
    a += "  --untie-embeddings-and-output-weights \\\n";
  }
  if (g.num_experts > 0) {
    a += fmt::format("  --num-experts {} --moe-router-topk {} \\\n", g.num_experts,
                     g.experts_per_token);
  }
  a += fmt::format("  --micro-batch-size {} --global-batch-size {} \\\n", p.micro_batch_size,
                   p.global_batch_size);
  a += fmt::format("  --tensor-model-parallel-size {} --pipeline-model-parallel-size {}", p.tp,
                   p.pp);
  if (p.schedule == Schedule::interleaved && p.virtual_stages > 1) {
    a += fmt::format(" --num-layers-per-virtual-pipeline-stage {}",
                     g.num_layers / (p.pp * p.virtual_stages));
  }
  if (p.cp > 1) {
    a += fmt::format(" --context-parallel-size {} --cp-comm-type {}", p.cp,
                     p.cp_comm == CpComm::p2p ? "p2p" : "all_gather");
  }
  if (p.ep > 1) {
    a += fmt::format(" --expert-model-parallel-size {}", p.ep);
  }
  if (g.num_experts > 0 && p.expert_tp() != p.tp) {
    a += fmt::format(" --expert-tensor-parallel-size {}", p.expert_tp());
  }
  a += " \\\n ";
  if (p.sequence_parallel) {
    a += " --sequence-parallel";
  }
  if (p.recompute == Recompute::selective) {
    a += " --recompute-granularity selective";
  } else if (p.recompute == Recompute::full) {
    a += " --recompute-granularity full --recompute-method uniform --recompute-num-layers 1";
  }
  if (p.zero_stage == 1) {
    a += " --use-distributed-optimizer";
  }
  if (p.overlap_grad_reduce) {
    a += " --overlap-grad-reduce";
  }
  a += precision_flags_megatron(p.precision);
  a += "\n";
  if (p.grad_sync == GradSync::tree) {
    a = "NCCL_ALGO=Tree " + a;
  }
  return "#!/bin/bash\n# Megatron-LM (core_r0.10) arguments for " + plan_label(p) + "\n" + a;
}

std::string toml_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
    }
    out += c;
  }
  return out + "\"";
}

std::string torchtitan(const LaunchInput& in) {
  const Plan& p = *in.plan;
  const GraphInfo& g = *in.model;
  common_checks(in, "torchtitan");
  if (g.family != "llama") {
    cannot(in, "torchtitan", "model family",
           "a Llama-family model (torchtitan has no GPT-2-style model)", "\"" + g.family + "\"");
  }
  if (p.zero_stage == 1) {
    cannot(in, "torchtitan", "/zero_stage",
           "0 (DDP), 2 (FSDP, no reshard after forward) or 3 (FSDP)", "1");
  }
  if (p.tp > 1 && !p.sequence_parallel) {
    cannot(in, "torchtitan", "/sequence_parallel",
           "true with tp > 1 (torchtitan's tensor parallelism is sequence-parallel)", "false");
  }
  if (p.precision == Precision::fp16) {
    cannot(in, "torchtitan", "/precision", "\"bf16\", \"fp8\", \"fp32\" or \"tf32\"", "\"fp16\"");
  }
  const int replicate = p.zero_stage == 0 ? p.dp : 1;
  const int shard = p.zero_stage == 0 ? 1 : p.dp;
  const std::int64_t local = p.pp > 1 ? p.global_batch_size / p.dp : p.micro_batch_size;
  std::string t = fmt::format("# torchtitan job configuration for {}\n", plan_label(p));
  t += fmt::format(
      "# The model flavor must be registered with these dimensions: {} layers, hidden {}, {} "
      "heads ({} key/value), FFN {}, vocabulary {}.\n",
      g.num_layers, g.hidden_size, g.num_attention_heads, g.num_kv_heads, g.ffn_hidden_size,
      g.vocab_size);
  t += "\n[job]\ndump_folder = \"./outputs\"\ndescription = " + toml_string(g.name) + "\n";
  t += "\n[model]\nname = \"llama3\"\nflavor = " + toml_string(g.name) + "\n";
  if (p.precision == Precision::fp8) {
    t += "converters = [\"float8\"]\n";
  }
  t += fmt::format("\n[training]\nlocal_batch_size = {}\nglobal_batch_size = {}\nseq_len = {}\n",
                   local, p.global_batch_size, g.seq_length);
  t += fmt::format("\n[parallelism]\ndata_parallel_replicate_degree = {}\n"
                   "data_parallel_shard_degree = {}\n"
                   "tensor_parallel_degree = {}\npipeline_parallel_degree = {}\n"
                   "context_parallel_degree = {}\n",
                   replicate, shard, p.tp, p.pp, p.cp);
  if (p.zero_stage == 2) {
    t += "fsdp_reshard_after_forward = \"never\"\n";
  } else if (p.zero_stage == 3) {
    t += "fsdp_reshard_after_forward = \"always\"\n";
  }
  if (p.ep > 1) {
    t += fmt::format("expert_parallel_degree = {}\n", p.ep);
  }
  if (p.pp > 1) {
    const char* schedule = p.schedule == Schedule::gpipe         ? "GPipe"
                           : p.schedule == Schedule::interleaved ? "Interleaved1F1B"
                                                                 : "1F1B";
    t +=
        fmt::format("pipeline_parallel_schedule = \"{}\"\npipeline_parallel_microbatch_size = {}\n",
                    schedule, p.micro_batch_size);
    t += fmt::format("pipeline_parallel_layers_per_stage = {}\n",
                     g.num_layers / (p.pp * p.virtual_stages));
  }
  const char* mode = p.recompute == Recompute::full        ? "full"
                     : p.recompute == Recompute::selective ? "selective"
                                                           : "none";
  t += fmt::format("\n[activation_checkpoint]\nmode = \"{}\"\n", mode);
  if (p.recompute == Recompute::selective) {
    t += "selective_ac_option = \"op\"\n";
  }
  return t;
}

std::string deepspeed(const LaunchInput& in) {
  const Plan& p = *in.plan;
  common_checks(in, "DeepSpeed");
  if (p.cp > 1) {
    cannot(in, "DeepSpeed", "/cp", "1", std::to_string(p.cp));
  }
  if (p.ep > 1) {
    cannot(in, "DeepSpeed", "/ep", "1 (experts are placed in the model code)",
           std::to_string(p.ep));
  }
  if (p.pp > 1 && p.zero_stage >= 2) {
    cannot(in, "DeepSpeed", "/zero_stage", "0 or 1 with pipeline parallelism",
           std::to_string(p.zero_stage));
  }
  if (p.pp > 1 && p.schedule != Schedule::one_f_one_b) {
    cannot(in, "DeepSpeed", "/schedule", "\"1f1b\" (DeepSpeed's pipeline engine)",
           std::string("\"") + (p.schedule == Schedule::gpipe ? "gpipe" : "interleaved") + "\"");
  }
  if (p.recompute == Recompute::selective) {
    cannot(in, "DeepSpeed", "/recompute", "\"none\" or \"full\"", "\"selective\"");
  }
  if (p.sequence_parallel) {
    cannot(in, "DeepSpeed", "/sequence_parallel", "false", "true");
  }
  Json ds = {{"train_batch_size", p.global_batch_size},
             {"train_micro_batch_size_per_gpu", p.micro_batch_size},
             {"gradient_accumulation_steps", p.num_microbatches()},
             {"gradient_clipping", 1.0},
             {"zero_optimization",
              {{"stage", p.zero_stage},
               {"overlap_comm", p.overlap_grad_reduce},
               {"contiguous_gradients", true}}}};
  if (p.precision == Precision::bf16) {
    ds["bf16"] = {{"enabled", true}};
  } else if (p.precision == Precision::fp16) {
    ds["fp16"] = {{"enabled", true}};
  } else if (p.precision == Precision::fp8) {
    cannot(in, "DeepSpeed", "/precision", "\"bf16\", \"fp16\" or \"fp32\"", "\"fp8\"");
  }
  if (p.pp > 1) {
    ds["pipeline"] = {{"stages", p.pp}, {"partition", "uniform"}};
  }
  if (p.tp > 1) {
    ds["tensor_parallel"] = {{"autotp_size", p.tp}};
  }
  if (p.recompute == Recompute::full) {
    ds["activation_checkpointing"] = {{"partition_activations", false},
                                      {"contiguous_memory_optimization", false}};
  }
  return ds.dump(2) + "\n";
}

std::string train_command(const LaunchInput& in) {
  return fmt::format("parallax train --backend cuda --model {} --plan {} --steps {} "
                     "--checkpoint-dir {} --checkpoint-every 100 --resume",
                     in.model_arg, in.plan_path, in.steps, in.checkpoint_dir);
}

std::string slurm(const LaunchInput& in) {
  const Plan& p = *in.plan;
  const NodeLayout n = node_layout(p, *in.cluster);
  return fmt::format("#!/bin/bash\n"
                     "# Parallax's executor running {} on {} GPUs\n"
                     "#SBATCH --job-name=parallax-{}\n"
                     "#SBATCH --nodes={}\n"
                     "#SBATCH --ntasks-per-node={}\n"
                     "#SBATCH --gpus-per-node={}\n"
                     "#SBATCH --exclusive\n\n"
                     "srun --mpi=pmix {}\n",
                     plan_label(p), p.process_count(), in.model->name, n.nodes, n.per_node,
                     n.per_node, train_command(in));
}

std::string yaml_string(const std::string& s) {
  return toml_string(s); // a double-quoted YAML scalar escapes the same two characters
}

std::string mpijob(const LaunchInput& in) {
  const Plan& p = *in.plan;
  const NodeLayout n = node_layout(p, *in.cluster);
  std::string name = "parallax-" + in.model->name;
  std::replace_if(
      name.begin(), name.end(), [](char c) { return !std::isalnum(static_cast<unsigned char>(c)); },
      '-');
  std::transform(name.begin(), name.end(), name.begin(),
                 [](char c) { return static_cast<char>(std::tolower(c)); });
  std::string plan_json = plan_to_json(p).dump();
  LaunchInput mounted = in;
  mounted.plan_path = "/etc/parallax/plan.json";
  std::string command = "[\"mpirun\", \"-np\", \"" + std::to_string(p.process_count()) + "\"";
  std::string rest = train_command(mounted);
  std::size_t at = 0;
  while (at < rest.size()) {
    const std::size_t next = std::min(rest.find(' ', at), rest.size());
    command += ", " + yaml_string(rest.substr(at, next - at));
    at = next + 1;
  }
  command += "]";
  return fmt::format(
      "# Kubeflow MPIJob (kubeflow.org/v2beta1) running {} on {} GPUs\n"
      "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {}-plan\ndata:\n  plan.json: {}\n"
      "---\n"
      "apiVersion: kubeflow.org/v2beta1\nkind: MPIJob\nmetadata:\n  name: {}\nspec:\n"
      "  slotsPerWorker: {}\n  runPolicy:\n    cleanPodPolicy: Running\n  mpiReplicaSpecs:\n"
      "    Launcher:\n      replicas: 1\n      template:\n        spec:\n          containers:\n"
      "          - name: launcher\n            image: {}\n            command: {}\n"
      "            volumeMounts:\n            - name: plan\n              mountPath: "
      "/etc/parallax\n"
      "          volumes:\n          - name: plan\n            configMap:\n              name: "
      "{}-plan\n"
      "    Worker:\n      replicas: {}\n      template:\n        spec:\n          containers:\n"
      "          - name: worker\n            image: {}\n            resources:\n              "
      "limits:\n"
      "                nvidia.com/gpu: {}\n",
      plan_label(p), p.process_count(), name, yaml_string(plan_json), name, n.per_node,
      yaml_string(in.image), command, name, n.nodes, yaml_string(in.image), n.per_node);
}

} // namespace

NodeLayout node_layout(const Plan& plan, const Cluster& cluster) {
  const int gpus = plan.process_count();
  const int per = std::max(1, cluster.node.devices_per_node);
  if (gpus <= per) {
    return {1, gpus};
  }
  return {(gpus + per - 1) / per, per};
}

std::string launch_config(LaunchFormat format, const LaunchInput& in) {
  PARALLAX_CHECK(in.plan && in.model && in.cluster, "launch_config: plan, model and cluster");
  if (format != LaunchFormat::slurm && format != LaunchFormat::mpijob &&
      in.plan->parameter_servers > 0) {
    cannot(in, kLaunchFormatNames[static_cast<std::size_t>(format)], "/parameter_servers", "0",
           std::to_string(in.plan->parameter_servers));
  }
  switch (format) {
  case LaunchFormat::megatron:
    return megatron(in);
  case LaunchFormat::torchtitan:
    return torchtitan(in);
  case LaunchFormat::deepspeed:
    return deepspeed(in);
  case LaunchFormat::slurm:
    return slurm(in);
  case LaunchFormat::mpijob:
    return mpijob(in);
  }
  return {};
}

} // namespace parallax
