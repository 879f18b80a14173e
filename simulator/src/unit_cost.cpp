#include "parallax/simulator/unit_cost.hpp"

#include "parallax/simulator/collectives.hpp"
#include "parallax/simulator/compute_model.hpp"

#include <algorithm>
#include <cmath>

namespace parallax {

namespace {

// The GEMM as one tensor-parallel rank runs it for a micro-batch of B sequences. Under expert
// parallelism a rank holds experts / ep of a layer's experts, and each of them takes the tokens
// the ep ranks route to it: ep times the tokens per expert. Under context parallelism a rank
// holds s / cp tokens of each sequence: the linear layers' rows, and the attention's queries
// (against every key of the sequence, which the K/V exchange brings).
Gemm gemm_on_rank(const Layer& layer, const Gemm& g, const UnitCostKey& key) {
  const int tp = key.tp;
  const std::int64_t B = key.micro_batch_size;
  Gemm out = g;
  const bool heads = layer.tp_split == TpSplit::heads;
  if (layer.experts > 0 && key.whole_experts) {
    // Whole experts on this rank's 1/tp of the tokens.
    out.m = std::max<std::int64_t>(1, g.m * B / (key.cp * static_cast<std::int64_t>(tp)));
  } else if (heads) {
    out.batch = std::max<std::int64_t>(1, g.batch * B / tp);
    out.m = std::max<std::int64_t>(1, g.m / key.cp);
  } else {
    out.m = std::max<std::int64_t>(1, g.m * B / key.cp);
    if (layer.tp_split == TpSplit::column || layer.tp_split == TpSplit::vocab) {
      out.n = std::max<std::int64_t>(1, g.n / tp);
    } else if (layer.tp_split == TpSplit::row) {
      out.k = std::max<std::int64_t>(1, g.k / tp);
    }
  }
  if (layer.experts > 0 && key.ep > 1) {
    out.batch = std::max<std::int64_t>(1, g.batch / key.ep);
    out.m *= key.ep;
  }
  return out;
}

// The load of the busiest of ep expert-parallel ranks over the mean, for routing that spreads
// tokens evenly in expectation (a balanced router): N = ep·B·(routed token copies per sequence)
// copies land on ep ranks as a multinomial draw; the largest of ep counts exceeds the mean by
// about σ·√(2 ln ep). Correlated routing (popular experts, skewed batches) is worse and is not
// modelled.
double expert_load_imbalance(const Layer& layer, const UnitCostKey& key) {
  if (layer.gemms.empty()) {
    return 1.0;
  }
  const Gemm& g = layer.gemms.front();
  const double copies =
      static_cast<double>(key.ep) * key.local_sequences() * static_cast<double>(g.batch * g.m);
  const double ep = key.ep;
  return 1.0 + std::sqrt(2.0 * std::log(ep) * (ep - 1.0) / copies);
}

// Forward and backward compute time of one layer on one rank for one micro-batch.
std::pair<double, double> layer_compute_s(const Layer& layer, const Cluster& cluster,
                                          const UnitCostKey& key, const Stack& stack) {
  const double div = layer_flop_divisor(layer, key.tp, key.sequence_parallel);
  const double B = key.local_sequences();
  const double elem_bytes = precision_storage_bytes(key.precision);
  double gemm_fwd = 0;
  double gemm_flops = 0;
  double cast_fwd_bytes = 0;
  double cast_bwd_bytes = 0;
  const Precision gemm_in = gemm_precision(layer, key.precision);
  for (const Gemm& g : layer.gemms) {
    Gemm local = gemm_on_rank(layer, g, key);
    gemm_fwd += gemm_time_s(cluster, gemm_in, local, layer.fused,
                            layer.kernel == FusedKernel::flash2, layer.experts > 0);
    gemm_flops += g.flops();
    if (gemm_in == Precision::fp8) {
      const auto [fwd_bytes, bwd_bytes] = fp8_cast_bytes(local);
      cast_fwd_bytes += fwd_bytes;
      cast_bwd_bytes += bwd_bytes;
    }
  }
  // Non-GEMM work: memory-bound traffic, or vector FLOPs at the fp32 rate, whichever is longer.
  const double other_flops = std::max(0.0, layer.fwd_flops - gemm_flops) * B / div;
  const double vector_peak = cluster.supports(Precision::fp32) ? cluster.peak_flops(Precision::fp32)
                                                               : cluster.peak_flops(key.precision);
  const double mem_bytes = layer.fwd_mem_elems * elem_bytes * B / div;
  const double other_fwd = std::max(memory_time_s(cluster, mem_bytes), other_flops / vector_peak);
  const double overhead = kernel_overhead_s(cluster.device);
  const double cast = fp8_cast_traffic_factor(stack.fp8_recipe);
  double fwd = gemm_fwd + other_fwd + overhead + memory_time_s(cluster, cast * cast_fwd_bytes);
  // Backward: two GEMMs per forward GEMM (input and weight gradients), twice the traffic.
  double bwd = 2.0 * gemm_fwd + 2.0 * other_fwd + 2.0 * overhead +
               memory_time_s(cluster, cast * cast_bwd_bytes);
  if (layer.bwd_extra_flops > 0 && gemm_flops > 0) {
    bwd += gemm_fwd * layer.bwd_extra_flops / gemm_flops;
  }
  if (layer.experts > 0 && key.ep > 1) {
    // The busiest of the ep ranks sets the pace of the layer.
    const double f = expert_load_imbalance(layer, key);
    fwd += (f - 1.0) * gemm_fwd;
    bwd += (f - 1.0) * 2.0 * gemm_fwd;
  }
  // The host dispatches the layer's kernels (its GEMMs and one for the rest) while the device
  // runs them: when they run shorter than their dispatch, the device waits for the host.
  const double kernels = static_cast<double>(layer.gemms.size()) + 1.0;
  const double host_s = stack.host_dispatch_us * 1e-6 * kernels;
  return {std::max(fwd, host_s), std::max(bwd, 2.0 * host_s)};
}

// Tensor-parallel collective time of one layer for one micro-batch: (forward, backward).
std::pair<double, double> layer_tp_comm_s(const Layer& layer, const Cluster& cluster,
                                          const UnitCostKey& key, const Stack& stack) {
  if (key.tp <= 1 || (layer.experts > 0 && key.whole_experts)) {
    return {0.0, 0.0};
  }
  const GroupSpan span = group_span(key.tp, 1, cluster.node.devices_per_node);
  const double bytes_per_elem = precision_storage_bytes(key.precision);
  const double B = key.local_sequences();
  const double fwd_bytes = layer.tp_fwd_comm_elems * B * bytes_per_elem;
  const double bwd_bytes = layer.tp_bwd_comm_elems * B * bytes_per_elem;
  // The share the stack overlaps with GEMMs (async TP, userbuffers) leaves the critical path but
  // slows the GEMMs it hides behind.
  const double hidden = stack.tp_comm_overlap;
  const double exposed = 1.0 - hidden + hidden * stack.overlap_compute_slowdown;
  auto time = [&](Collective kind, double bytes) {
    return exposed * collective_time_s(cluster, kind, bytes, span);
  };
  if (key.sequence_parallel && layer.kind != LayerKind::loss) {
    // Each all-reduce becomes a reduce-scatter after row-parallel layers and an all-gather
    // before column-parallel ones; the backward mirrors it.
    return {time(Collective::reduce_scatter, fwd_bytes) + time(Collective::all_gather, bwd_bytes),
            time(Collective::reduce_scatter, bwd_bytes) + time(Collective::all_gather, fwd_bytes)};
  }
  return {time(Collective::all_reduce, fwd_bytes), time(Collective::all_reduce, bwd_bytes)};
}

// Expert parallelism: the all-to-all that sends a routed-expert layer's tokens to the ranks
// holding their experts (before the up-projection: dispatch) or back (after the
// down-projection: combine); the backward runs it again in reverse. One rank's share is its
// tensor-parallel part of the token copies of the micro-batch, 16-bit or the plan's precision.
double layer_ep_comm_s(const Layer& layer, const Cluster& cluster, const UnitCostKey& key) {
  if (layer.experts == 0 || key.ep <= 1 || layer.gemms.empty()) {
    return 0.0;
  }
  const Gemm& g = layer.gemms.front();
  const bool dispatch = layer.tp_split == TpSplit::column;        // up: tokens in; down: tokens out
  const double width = static_cast<double>(dispatch ? g.k : g.n); // the hidden size
  const double elems = static_cast<double>(g.batch * g.m) * width * key.local_sequences() / key.tp;
  const GroupSpan span =
      group_span(key.ep, key.whole_experts ? 1 : key.tp, cluster.node.devices_per_node);
  return collective_time_s(cluster, Collective::all_to_all,
                           elems * precision_storage_bytes(key.precision), span);
}

} // namespace

double cp_kv_bytes(const Layer& layer, const GraphInfo& info, const UnitCostKey& key) {
  if (layer.kind != LayerKind::attention || key.cp <= 1 || layer.gemms.size() < 2) {
    return 0.0;
  }
  // QKᵀ is (batch heads, m queries, n keys, k head dim); ·V is (heads, m, n value dim, k keys).
  const auto kv_width =
      static_cast<double>(info.num_kv_heads) *
      static_cast<double>(layer.gemms[0].k + layer.gemms[1].n); // K and V per token
  const double local_tokens = static_cast<double>(info.seq_length) * key.local_sequences();
  return local_tokens * kv_width / key.tp * precision_storage_bytes(key.precision);
}

CpExchange cp_exchange_s(const Layer& layer, const GraphInfo& info, const Cluster& cluster,
                         const UnitCostKey& key, double attn_fwd_s, double attn_bwd_s) {
  const double kv = cp_kv_bytes(layer, info, key);
  if (kv <= 0) {
    return {};
  }
  const int dpn = cluster.node.devices_per_node;
  const GroupSpan ring = group_span(key.cp, key.tp, dpn);
  CpExchange out;
  out.bytes = kv;
  if (key.cp_comm == CpComm::all_gather) {
    // K/V gathered before the attention (again before its backward, which keeps only the local
    // part), their gradients reduce-scattered after it; nothing to hide them behind.
    const double gathered = kv * key.cp;
    const double gather = collective_time_s(cluster, Collective::all_gather, gathered, ring);
    out.fwd_s = gather;
    out.bwd_s = gather + collective_time_s(cluster, Collective::reduce_scatter, gathered, ring);
    return out;
  }
  // Ring: cp steps of equal attention work (causal load balancing), each but the last passing
  // the K/V block on to the next rank while the current block is computed. In the backward the
  // K/V gradients travel with them, and the accumulated gradients take one more hop home.
  // A hop crosses a node boundary somewhere once the ring leaves the node: the lock-step ring
  // waits for the slowest hop, one NIC's worth.
  const GroupSpan hop = ring.nodes > 1 ? GroupSpan{2, 1, 2, key.tp} : GroupSpan{2, 2, 1, key.tp};
  const double x = collective_time_s(cluster, Collective::send_recv, kv, hop);
  const double x2 = collective_time_s(cluster, Collective::send_recv, 2.0 * kv, hop);
  const double steps = key.cp - 1;
  out.fwd_s = steps * std::max(0.0, x - attn_fwd_s / key.cp);
  out.bwd_s = steps * std::max(0.0, x2 - attn_bwd_s / key.cp) + x;
  return out;
}

double layer_flop_divisor(const Layer& layer, int tp, bool sequence_parallel) {
  switch (layer.tp_split) {
  case TpSplit::replicated:
    return 1.0;
  case TpSplit::sequence:
    return sequence_parallel ? tp : 1.0;
  default:
    return tp;
  }
}

double layer_activation_divisor(const Layer& layer, int tp, bool sequence_parallel) {
  // A column-parallel (or vocabulary-parallel) linear layer keeps its full input.
  const bool replicated_input =
      layer.kind == LayerKind::linear &&
      (layer.tp_split == TpSplit::column || layer.tp_split == TpSplit::vocab);
  if (replicated_input || layer.tp_split == TpSplit::sequence) {
    return sequence_parallel ? tp : 1.0;
  }
  return layer.tp_split == TpSplit::replicated ? 1.0 : tp;
}

double layer_param_divisor(const Layer& layer, int tp, int ep, bool whole_experts) {
  // Norm weights are replicated; row-parallel biases too (a negligible share).
  const double tp_div =
      layer.tp_split == TpSplit::sequence || layer.tp_split == TpSplit::replicated ? 1.0 : tp;
  if (layer.experts > 0) {
    return (whole_experts ? 1.0 : tp_div) * ep;
  }
  return tp_div;
}

// The weight matrices of a layer as one rank holds them: Σ rows·cols and Σ (rows + cols). A
// linear layer's GEMM (batch, m, n, k) multiplies batch weights of k × n (one per expert);
// column-parallel and vocabulary-parallel layers split n over tp, row-parallel ones k; routed
// experts are spread over ep (and kept whole per TP rank with whole_experts). An embedding
// table is a vocabulary × hidden matrix (split over tp by vocabulary).
std::pair<double, double> layer_matrices(const Layer& layer, const GraphInfo& info,
                                         const UnitCostKey& key) {
  if (layer.params <= 0) {
    return {0.0, 0.0};
  }
  const double tp = key.tp;
  if (layer.kind == LayerKind::embedding) {
    const double cols = static_cast<double>(info.hidden_size);
    const double rows = static_cast<double>(layer.params) / cols / tp;
    return {rows * cols, rows + cols};
  }
  if (layer.kind != LayerKind::linear) {
    return {0.0, 0.0};
  }
  const bool whole = layer.experts > 0 && key.whole_experts;
  double params = 0;
  double dims = 0;
  for (const Gemm& g : layer.gemms) {
    double rows = static_cast<double>(g.k);
    double cols = static_cast<double>(g.n);
    if (!whole && (layer.tp_split == TpSplit::column || layer.tp_split == TpSplit::vocab)) {
      cols /= tp;
    } else if (!whole && layer.tp_split == TpSplit::row) {
      rows /= tp;
    }
    const double count = static_cast<double>(g.batch) / (layer.experts > 0 ? key.ep : 1);
    params += count * rows * cols;
    dims += count * (rows + cols);
  }
  return {params, dims};
}

double layer_kept_act_bytes(const Layer& layer, const UnitCostKey& key, Recompute r,
                            bool unit_has_blocks) {
  if (r == Recompute::full && (layer.block >= 0 || !unit_has_blocks)) {
    return 0.0; // rebuilt from the unit's input during the backward
  }
  const double elem_bytes = precision_storage_bytes(key.precision);
  const double B = key.local_sequences();
  const double adiv = layer_activation_divisor(layer, key.tp, key.sequence_parallel);
  const double act = (layer.saved_act_elems * elem_bytes + layer.saved_mask_bytes) * B / adiv;
  if (r == Recompute::selective && layer.selective_recompute) {
    return act - (layer.selective_saved_elems * elem_bytes + layer.saved_mask_bytes) * B / adiv;
  }
  return act;
}

double full_recompute_input_bytes(const GraphInfo& info, const UnitCostKey& key) {
  // The first layer's output of the previous unit, an (s, h) tensor per sequence (sharded
  // along s with sequence parallelism).
  return static_cast<double>(info.seq_length * info.hidden_size) *
         precision_storage_bytes(key.precision) * key.local_sequences() /
         (key.sequence_parallel ? key.tp : 1);
}

std::vector<UnitCost> unit_costs(const LayerGraph& graph, const Cluster& cluster,
                                 const UnitCostKey& key, const Stack& stack) {
  std::vector<UnitCost> units(static_cast<std::size_t>(graph.num_units()));
  std::vector<bool> has_input(units.size(), false);
  // Units holding transformer blocks recompute only the blocks; in graphs without blocks
  // (generic DAGs) full recomputation covers the whole unit.
  std::vector<bool> has_block(units.size(), false);
  for (std::size_t v = 0; v < graph.num_layers(); ++v) {
    if (graph.layer(v).block >= 0) {
      has_block[static_cast<std::size_t>(graph.layer(v).unit)] = true;
    }
  }
  const double elem_bytes = precision_storage_bytes(key.precision);
  const double B = key.local_sequences();
  for (std::size_t v = 0; v < graph.num_layers(); ++v) {
    const Layer& layer = graph.layer(v);
    UnitCost& u = units[static_cast<std::size_t>(layer.unit)];
    auto [fwd, bwd] = layer_compute_s(layer, cluster, key, stack);
    auto [tp_fwd, tp_bwd] = layer_tp_comm_s(layer, cluster, key, stack);
    const double a2a = layer_ep_comm_s(layer, cluster, key);
    u.ep_fwd_s += a2a;
    u.ep_bwd_s += a2a;
    tp_fwd += a2a;
    tp_bwd += a2a;
    const CpExchange cpx = cp_exchange_s(layer, graph.info(), cluster, key, fwd, bwd);
    u.cp_fwd_s += cpx.fwd_s;
    u.cp_bwd_s += cpx.bwd_s;
    tp_fwd += cpx.fwd_s;
    tp_bwd += cpx.bwd_s;
    if (key.cp_comm == CpComm::all_gather) {
      // The gathered keys and values live while the attention runs.
      u.act_transient_bytes = std::max(u.act_transient_bytes, cpx.bytes * key.cp);
    }
    u.fwd_s += fwd;
    u.bwd_s += bwd;
    u.tp_fwd_s += tp_fwd;
    u.tp_bwd_s += tp_bwd;
    if (layer.selective_recompute) {
      u.selective_s += fwd;
    }
    const bool kept = layer.block < 0 && has_block[static_cast<std::size_t>(layer.unit)];
    if (!kept) {
      u.full_recompute_s += fwd;
      u.full_recompute_tp_s += tp_fwd;
    }
    const double pdiv = layer_param_divisor(layer, key.tp, key.ep, key.whole_experts);
    u.params += static_cast<double>(layer.params) / pdiv;
    if (layer.experts > 0) {
      u.expert_params += static_cast<double>(layer.params) / pdiv;
    }
    if (pdiv == 1.0 && layer.experts == 0) { // whole experts reduce over their expert-DP group
      u.replicated_params += static_cast<double>(layer.params);
    }
    u.max_layer_params = std::max(u.max_layer_params, static_cast<double>(layer.params) / pdiv);
    const auto [mat_params, mat_dims] = layer_matrices(layer, graph.info(), key);
    u.matrix_params += mat_params;
    u.matrix_dims += mat_dims;
    const double adiv = layer_activation_divisor(layer, key.tp, key.sequence_parallel);
    const bool blocks = has_block[static_cast<std::size_t>(layer.unit)];
    u.act_bytes += layer_kept_act_bytes(layer, key, Recompute::none, blocks);
    u.act_selective_bytes += layer_kept_act_bytes(layer, key, Recompute::selective, blocks);
    u.act_outside_blocks_bytes += layer_kept_act_bytes(layer, key, Recompute::full, blocks);
    u.act_transient_bytes =
        std::max(u.act_transient_bytes, layer.working_act_elems * elem_bytes * B / adiv);
    const double fdiv = layer_flop_divisor(layer, key.tp, key.sequence_parallel);
    u.model_flops += (layer.fwd_flops + layer.bwd_flops) * B / fdiv;
    // Full recomputation keeps the unit's input: the first layer's output of the previous unit,
    // an (s, h) tensor (sharded along s with sequence parallel).
    const auto u_index = static_cast<std::size_t>(layer.unit);
    if (!has_input[u_index]) {
      has_input[u_index] = true;
      u.act_full_bytes = full_recompute_input_bytes(graph.info(), key);
    }
  }
  for (UnitCost& u : units) {
    u.act_full_bytes += u.act_outside_blocks_bytes;
  }
  return units;
}

} // namespace parallax
