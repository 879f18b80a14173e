// `parallax models`, `parallax clusters` and `parallax stacks`: the zoos with their key figures.
#include "commands.hpp"

#include "parallax/core/zoo_path.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/hardware_profiles/stack_loader.hpp"
#include "parallax/models/model_loader.hpp"

#include <fmt/format.h>

#include <iostream>

namespace parallax::cli {

namespace {

std::string params_text(double n) {
  if (n >= 1e12) {
    return fmt::format("{:.2f}T", n / 1e12);
  }
  if (n >= 1e9) {
    return fmt::format("{:.2f}B", n / 1e9);
  }
  if (n >= 1e6) {
    return fmt::format("{:.1f}M", n / 1e6);
  }
  return fmt::format("{:.1f}K", n / 1e3);
}

} // namespace

Run register_models(CLI::App& app) {
  auto* cmd = app.add_subcommand("models", "List the model zoo with parameter counts");
  return [cmd]() {
    (void)cmd;
    std::cout << fmt::format("{:<18} {:>6} {:>9} {:>8} {:>4} {:>4} {:>7} {:>7} {:>6}\n", "name",
                             "family", "params", "layers", "h/a", "kv", "ffn", "vocab", "seq");
    for (const auto& name : zoo_list(ZooKind::models)) {
      LoadedModel m = model_load(name);
      const GraphInfo& i = m.graph.info();
      std::cout << fmt::format(
          "{:<18} {:>6} {:>9} {:>8} {:>4} {:>4} {:>7} {:>7} {:>6}\n", name, i.family,
          params_text(static_cast<double>(m.graph.total_params())), i.num_layers,
          fmt::format("{}/{}", i.hidden_size, i.num_attention_heads), i.num_kv_heads,
          m.config ? m.config->ffn_hidden_size : 0, i.vocab_size, i.seq_length);
    }
    return 0;
  };
}

Run register_clusters(CLI::App& app) {
  auto* cmd = app.add_subcommand("clusters", "List the cluster zoo with key figures");
  return [cmd]() {
    (void)cmd;
    std::cout << fmt::format("{:<14} {:<16} {:>7} {:>10} {:>10} {:>8} {:>10} {:>10}\n", "name",
                             "device", "devices", "bf16 TF/s", "fp32 TF/s", "mem GiB", "intra GB/s",
                             "inter GB/s");
    for (const auto& name : zoo_list(ZooKind::clusters)) {
      Cluster c = cluster_load(name);
      // A heterogeneous cluster: one line per node group, its devices and figures.
      for (int g = 0; g < c.num_groups(); ++g) {
        const Cluster view = c.group_view(g);
        const int devices = c.groups.empty() ? c.num_devices()
                                             : c.groups[static_cast<std::size_t>(g)].num_nodes *
                                                   c.node.devices_per_node;
        auto peak = [&](Precision p) {
          return view.supports(p) ? fmt::format("{:.1f}", view.device.peak_tflops.at(p)) : "-";
        };
        std::cout << fmt::format("{:<14} {:<16} {:>7} {:>10} {:>10} {:>8.1f} {:>10.1f} {:>10.2f}\n",
                                 g == 0 ? name : "  +", view.device.name, devices,
                                 peak(Precision::bf16), peak(Precision::fp32),
                                 view.device.memory_gib, view.node.intra_bandwidth_gbps,
                                 c.network.inter_bandwidth_gbps);
      }
    }
    return 0;
  };
}

Run register_stacks(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "stacks", "List the software-stack zoo: kernels, gradient reduction, sharding, memory");
  return [cmd]() {
    (void)cmd;
    std::cout << fmt::format("{:<20} {:<9} {:<8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8}\n",
                             "name", "attention", "loss", "dp ovlp", "fp32 red", "prefetch",
                             "host us", "slowdown", "ctx GiB", "segment");
    for (const auto& name : zoo_list(ZooKind::stacks)) {
      const Stack s = stack_load(name);
      std::cout << fmt::format(
          "{:<20} {:<9} {:<8} {:>8} {:>9} {:>8} {:>8.1f} {:>8.2f} {:>9.2f} {:>8}\n", name,
          attention_kernel_name(s.attention), loss_kernel_name(s.loss),
          s.data_parallel.overlap_grad_reduce ? "yes" : "no",
          s.data_parallel.fp32_grad_reduce ? "yes" : "no", s.sharding.prefetch_layers,
          s.host_dispatch_us, s.overlap_compute_slowdown, s.memory.context_bytes / (1 << 30),
          s.memory.segment_bytes > 0 ? fmt::format("{:.0f} MiB", s.memory.segment_bytes / (1 << 20))
                                     : "-");
    }
    return 0;
  };
}

} // namespace parallax::cli
