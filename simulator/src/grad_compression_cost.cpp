#include "parallax/simulator/grad_compression_cost.hpp"

#include "parallax/simulator/compute_model.hpp"

#include <algorithm>
#include <cmath>

namespace parallax {

namespace {

// Bytes of memory traffic per gradient element of each pass (fp32 gradients and residuals).
constexpr double kBf16CastBytes = 4 + 2 + 2 + 4;     // round to 16 bits, widen the sum back
constexpr double kErrorFeedbackBytes = 4 + 4 + 4;    // M = g + e: read both, write M
constexpr double kTopkSelectBytes = 4 * 4;           // radix select: about four passes over |M|
constexpr double kTopkResidualBytes = 4 + 4;         // the residual keeps M less the k sent
constexpr double kScatterAddBytes = 8 + 4 + 4;       // per received pair: read it, add into g
constexpr double kPowerSgdPassBytes = 3 * 4 + 4 + 8; // M read by M·Q, Mᵀ·P̂, P̂·Qᵀ written,
                                                     // residual updated
constexpr double kIndexBytes = 4; // int32 index beside each top-k value

double topk_elements(const Plan& p, double n) {
  return std::ceil(p.grad_compression.fraction * n);
}

} // namespace

double compressed_elements(const Plan& p, const ReducedGradients& g) {
  const GradCompression& c = p.grad_compression;
  switch (c.kind) {
  case CompressionKind::none:
  case CompressionKind::bf16:
    return g.params;
  case CompressionKind::topk:
    return 2 * topk_elements(p, g.params); // value and index
  case CompressionKind::powersgd:
    return g.params - g.matrix_params + c.rank * g.matrix_dims;
  }
  return g.params;
}

double compression_compute_s(const Cluster& cluster, const Plan& p, const ReducedGradients& g) {
  const GradCompression& c = p.grad_compression;
  const Device& d = cluster.device;
  const double feedback = p.error_feedback && c.lossy() ? kErrorFeedbackBytes : 0.0;
  switch (c.kind) {
  case CompressionKind::none:
    return 0;
  case CompressionKind::bf16:
    return memory_time_s(cluster, kBf16CastBytes * g.params) + 2 * kernel_overhead_s(d);
  case CompressionKind::topk: {
    const double k = topk_elements(p, g.params);
    const double n = p.dp_cp();
    const double bytes =
        (feedback + kTopkSelectBytes + (p.error_feedback ? kTopkResidualBytes : 0) +
         4.0 /* zero the dense sum */) *
            g.params +
        kScatterAddBytes * n * k;
    return memory_time_s(cluster, bytes) + 4 * kernel_overhead_s(d);
  }
  case CompressionKind::powersgd: {
    // Memory-bound products for small r, compute-bound only for large ones; plus the
    // Gram-Schmidt orthonormalisation of P (2·rows·r² FLOPs, small) left to the overheads.
    const double flops = 6.0 * c.rank * g.matrix_params;
    const auto fp32_entry = d.peak_tflops.find(Precision::fp32);
    const double fp32 = 1e12 * (fp32_entry != d.peak_tflops.end() ? fp32_entry->second
                                : d.peak_tflops.empty()           ? 0.0
                                                                  : d.peak_tflops.begin()->second);
    const double mem = memory_time_s(cluster, (feedback + kPowerSgdPassBytes) * g.matrix_params);
    return std::max(mem, fp32 > 0 ? flops / fp32 : 0.0) + 6 * kernel_overhead_s(d);
  }
  }
  return 0;
}

CollectiveCost gradient_all_reduce_cost(const Cluster& cluster, const Plan& p,
                                        const ReducedGradients& g, double elem_bytes,
                                        double expert_params) {
  const GradCompression& c = p.grad_compression;
  if (!c.enabled() || p.dp_cp() <= 1) {
    return data_parallel_cost(cluster, p, Collective::all_reduce, g.params * elem_bytes,
                              expert_params * elem_bytes, p.grad_sync);
  }
  const GroupSpan span = dp_span(p, cluster);
  CollectiveCost out;
  switch (c.kind) {
  case CompressionKind::none:
    break;
  case CompressionKind::bf16:
    out = collective_cost(cluster, Collective::all_reduce, g.params * std::min(elem_bytes, 2.0),
                          span, p.grad_sync);
    break;
  case CompressionKind::topk: {
    // Each rank's pairs, gathered on every rank: n·k pairs arrive.
    const double pair_bytes = std::min(elem_bytes, 4.0) + kIndexBytes;
    out = collective_cost(cluster, Collective::all_gather,
                          p.dp_cp() * topk_elements(p, g.params) * pair_bytes, span);
    break;
  }
  case CompressionKind::powersgd: {
    // P with the vectors, then Q: half the factors' dimensions each.
    const double half = 0.5 * c.rank * g.matrix_dims;
    const CollectiveCost first =
        collective_cost(cluster, Collective::all_reduce,
                        (g.params - g.matrix_params + half) * elem_bytes, span, p.grad_sync);
    const CollectiveCost second =
        collective_cost(cluster, Collective::all_reduce, half * elem_bytes, span, p.grad_sync);
    out = {first.latency_s + second.latency_s, first.transfer_s + second.transfer_s,
           first.network || second.network};
    break;
  }
  }
  out.latency_s += compression_compute_s(cluster, p, g);
  return out;
}

} // namespace parallax
