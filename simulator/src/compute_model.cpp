#include "parallax/simulator/compute_model.hpp"

#include <algorithm>
#include <cmath>

namespace parallax {

namespace {
// Fused attention kernels reach a lower fraction of the GEMM curve: the softmax, masking and
// rescaling run between the two matrix products inside the kernel (FlashAttention-2 reports
// 50–73% of peak on A100 where plain GEMMs of the same size reach ~80%).
constexpr double kFusedAttentionFactor = 0.85;
constexpr double kDefaultElementwiseEfficiency = 0.70;
constexpr double kGpuKernelOverheadS = 4e-6;
constexpr double kCpuKernelOverheadS = 1e-6;
} // namespace

const std::vector<GemmEfficiencyPoint>& gemm_efficiency_default() {
  // Sustained (clock-throttled) fractions of dense peak under training load, not isolated
  // cuBLAS peaks: an A100 running back-to-back large GEMMs settles near 78% of its 312 TFLOP/s.
  static const std::vector<GemmEfficiencyPoint> curve = {{1e6, 0.015}, {1e7, 0.05},  {1e8, 0.16},
                                                         {1e9, 0.38},  {1e10, 0.58}, {1e11, 0.72},
                                                         {1e12, 0.78}};
  return curve;
}

double gemm_efficiency(const Device& device, double flops) {
  const auto& curve =
      device.gemm_efficiency.empty() ? gemm_efficiency_default() : device.gemm_efficiency;
  if (flops <= curve.front().flops) {
    return curve.front().efficiency;
  }
  if (flops >= curve.back().flops) {
    return curve.back().efficiency;
  }
  auto hi = std::upper_bound(curve.begin(), curve.end(), flops,
                             [](double f, const GemmEfficiencyPoint& p) { return f < p.flops; });
  auto lo = hi - 1;
  const double t =
      (std::log(flops) - std::log(lo->flops)) / (std::log(hi->flops) - std::log(lo->flops));
  return lo->efficiency + t * (hi->efficiency - lo->efficiency);
}

double elementwise_efficiency(const Device& device) {
  return device.elementwise_efficiency > 0 ? device.elementwise_efficiency
                                           : kDefaultElementwiseEfficiency;
}

double kernel_overhead_s(const Device& device) {
  if (device.kernel_overhead_us > 0) {
    return device.kernel_overhead_us * 1e-6;
  }
  return device.kind == "cpu" ? kCpuKernelOverheadS : kGpuKernelOverheadS;
}

bool device_overlaps_communication(const Device& device) {
  return device.kind != "cpu";
}

double gemm_time_s(const Cluster& cluster, Precision precision, const Gemm& gemm, bool fused,
                   bool flash2, bool grouped) {
  const double flops = gemm.flops();
  if (flops <= 0) {
    return 0;
  }
  double curve_flops = grouped ? flops / static_cast<double>(gemm.batch) : flops;
  if (precision == Precision::fp8) {
    const Precision sixteen = cluster.supports(Precision::bf16) ? Precision::bf16 : Precision::fp16;
    if (cluster.supports(sixteen)) {
      curve_flops = curve_flops * cluster.peak_flops(sixteen) / cluster.peak_flops(Precision::fp8);
    }
  }
  double eff = gemm_efficiency(cluster.device, curve_flops) * (fused ? kFusedAttentionFactor : 1.0);
  if (fused && flash2 && cluster.device.flash2_attention_efficiency > 0) {
    eff = std::min(eff, cluster.device.flash2_attention_efficiency);
  }
  const double compute_s = flops / (cluster.peak_flops(precision) * eff);
  if (fused) {
    return compute_s;
  }
  // Operands and result in the storage precision (fp8 GEMMs read 1-byte operands).
  const double elem_bytes = precision == Precision::fp8 ? 1.0 : precision_storage_bytes(precision);
  const auto b = static_cast<double>(gemm.batch);
  const auto m = static_cast<double>(gemm.m);
  const auto n = static_cast<double>(gemm.n);
  const auto k = static_cast<double>(gemm.k);
  const double bytes = b * (m * k + k * n + m * n) * elem_bytes;
  return std::max(compute_s, memory_time_s(cluster, bytes));
}

Precision gemm_precision(const Layer& layer, Precision precision) {
  if (precision != Precision::fp8) {
    return precision;
  }
  return layer.kind == LayerKind::linear && layer.block >= 0 ? Precision::fp8 : Precision::bf16;
}

std::pair<double, double> fp8_cast_bytes(const Gemm& gemm) {
  const auto b = static_cast<double>(gemm.batch);
  const auto m = static_cast<double>(gemm.m);
  const auto n = static_cast<double>(gemm.n);
  const auto k = static_cast<double>(gemm.k);
  constexpr double kCastTranspose = 2.0 + 1.0 + 1.0; // read 16-bit, write FP8 and its transpose
  return {kCastTranspose * b * m * k, kCastTranspose * b * m * n};
}

double memory_time_s(const Cluster& cluster, double bytes) {
  return bytes /
         (cluster.device.memory_bandwidth_gbps * 1e9 * elementwise_efficiency(cluster.device));
}

} // namespace parallax
