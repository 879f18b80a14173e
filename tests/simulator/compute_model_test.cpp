#include "parallax/core/error.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/simulator/compute_model.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace parallax {
namespace {

// 100 TFLOP/s bf16 (50 fp32, 200 fp8), 1000 GB/s of which element-wise kernels reach 50%, and a
// two-point GEMM efficiency curve: 10% at 1 MFLOP rising to 80% at 1 TFLOP.
Cluster hand_cluster() {
  Cluster c;
  c.name = "hand";
  c.device.name = "hand-gpu";
  c.device.peak_tflops = {
      {Precision::bf16, 100.0}, {Precision::fp32, 50.0}, {Precision::fp8, 200.0}};
  c.device.memory_gib = 16;
  c.device.memory_bandwidth_gbps = 1000;
  c.device.elementwise_efficiency = 0.5;
  c.device.gemm_efficiency = {{1e6, 0.1}, {1e12, 0.8}};
  c.node.devices_per_node = 8;
  c.node.intra_bandwidth_gbps = 100;
  c.network.inter_bandwidth_gbps = 10;
  return c;
}

constexpr double kAttainedBw = 1000e9 * 0.5;

TEST(GemmEfficiencyDefault, IsASortedCurveOfFractions) {
  const auto& curve = gemm_efficiency_default();
  ASSERT_GE(curve.size(), 2U);
  for (std::size_t i = 0; i < curve.size(); ++i) {
    EXPECT_GT(curve[i].flops, 0.0);
    EXPECT_GT(curve[i].efficiency, 0.0);
    EXPECT_LE(curve[i].efficiency, 1.0);
    if (i > 0) {
      EXPECT_GT(curve[i].flops, curve[i - 1].flops);
      EXPECT_GE(curve[i].efficiency, curve[i - 1].efficiency);
    }
  }
}

TEST(GemmEfficiency, DefaultCurveMonotoneAndClamped) {
  Device d; // no curve: the default
  const auto& curve = gemm_efficiency_default();
  double previous = 0;
  for (double lg = 0; lg <= 16; lg += 0.05) {
    const double eff = gemm_efficiency(d, std::pow(10.0, lg));
    EXPECT_GE(eff, previous) << "at 1e" << lg;
    EXPECT_GT(eff, 0.0);
    EXPECT_LE(eff, 1.0);
    previous = eff;
  }
  EXPECT_DOUBLE_EQ(gemm_efficiency(d, curve.front().flops / 1000), curve.front().efficiency);
  EXPECT_DOUBLE_EQ(gemm_efficiency(d, 1.0), curve.front().efficiency);
  EXPECT_DOUBLE_EQ(gemm_efficiency(d, curve.back().flops * 1000), curve.back().efficiency);
  EXPECT_DOUBLE_EQ(gemm_efficiency(d, 1e30), curve.back().efficiency);
  for (const auto& point : curve) {
    EXPECT_NEAR(gemm_efficiency(d, point.flops), point.efficiency, 1e-12) << point.flops;
  }
}

TEST(GemmEfficiency, UsesTheProfilesCurveLogLinearly) {
  Device d;
  d.gemm_efficiency = {{1e6, 0.1}, {1e8, 0.5}, {1e10, 0.6}};
  EXPECT_DOUBLE_EQ(gemm_efficiency(d, 1e3), 0.1);
  EXPECT_DOUBLE_EQ(gemm_efficiency(d, 1e6), 0.1);
  EXPECT_NEAR(gemm_efficiency(d, 1e7), 0.3, 1e-12); // halfway in log(flops)
  EXPECT_NEAR(gemm_efficiency(d, 1e8), 0.5, 1e-12);
  EXPECT_NEAR(gemm_efficiency(d, 1e9), 0.55, 1e-12);
  EXPECT_NEAR(gemm_efficiency(d, std::sqrt(10.0) * 1e6), 0.2, 1e-12); // a quarter of the way
  EXPECT_DOUBLE_EQ(gemm_efficiency(d, 1e10), 0.6);
  EXPECT_DOUBLE_EQ(gemm_efficiency(d, 1e14), 0.6);
  // Differs from the default curve: the profile's own is used.
  Device plain;
  EXPECT_NE(gemm_efficiency(d, 1e7), gemm_efficiency(plain, 1e7));
  double previous = 0;
  for (double lg = 3; lg <= 14; lg += 0.1) {
    const double eff = gemm_efficiency(d, std::pow(10.0, lg));
    EXPECT_GE(eff, previous);
    previous = eff;
  }
}

TEST(ElementwiseEfficiency, ProfileOverridesDefault) {
  Device d;
  EXPECT_GT(elementwise_efficiency(d), 0.0);
  EXPECT_LE(elementwise_efficiency(d), 1.0);
  d.elementwise_efficiency = 0.42;
  EXPECT_DOUBLE_EQ(elementwise_efficiency(d), 0.42);
  EXPECT_GE(kernel_overhead_s(d), 0.0);
}

TEST(MemoryTime, BytesOverAttainedBandwidth) {
  const Cluster c = hand_cluster();
  EXPECT_NEAR(memory_time_s(c, 1e9), 1e9 / kAttainedBw, 1e-15);
  EXPECT_NEAR(memory_time_s(c, 3e9), 3.0 * memory_time_s(c, 1e9), 1e-15);
  EXPECT_EQ(memory_time_s(c, 0.0), 0.0);
}

TEST(GemmTime, NeverFasterThanPeak) {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> dim_log(0, 14);
  for (const Cluster& c :
       {hand_cluster(), cluster_load("dgx-a100-80g"), cluster_load("dgx-h100")}) {
    for (int i = 0; i < 300; ++i) {
      Gemm g{std::int64_t{1} << (dim_log(rng) / 3), std::int64_t{1} << dim_log(rng),
             std::int64_t{1} << dim_log(rng), std::int64_t{1} << dim_log(rng)};
      for (Precision p : {Precision::bf16, Precision::fp32}) {
        for (bool fused : {false, true}) {
          const double t = gemm_time_s(c, p, g, fused);
          EXPECT_GE(t, g.flops() / c.peak_flops(p) * (1 - 1e-12))
              << c.name << " " << g.batch << "x" << g.m << "x" << g.n << "x" << g.k;
          EXPECT_TRUE(std::isfinite(t));
        }
      }
    }
  }
}

TEST(GemmTime, LargeSquareGemmIsComputeBound) {
  const Cluster c = hand_cluster();
  const Gemm g{1, 8192, 8192, 8192}; // 1.1 TFLOP: the top of the curve, 80%
  const double expect = g.flops() / (100e12 * 0.8);
  EXPECT_NEAR(gemm_time_s(c, Precision::bf16, g, false), expect, 1e-12 * expect);
  // Its operands would take far less time to move.
  const double bytes = 3.0 * 8192 * 8192 * 2;
  EXPECT_LT(memory_time_s(c, bytes), expect);
}

TEST(GemmTime, ThinGemmIsMemoryBound) {
  const Cluster c = hand_cluster();
  // An outer product: k = 1, 33.5 MFLOP but a 4096×4096 result to write.
  const Gemm g{1, 4096, 4096, 1};
  const double bytes_bf16 = (4096.0 * 1 + 1 * 4096.0 + 4096.0 * 4096.0) * 2;
  const double t = gemm_time_s(c, Precision::bf16, g, false);
  EXPECT_NEAR(t, bytes_bf16 / kAttainedBw, 1e-12 * t);
  EXPECT_GT(t, g.flops() / (100e12 * gemm_efficiency(c.device, g.flops())));
  // Four-byte operands take twice as long to move; fp8 GEMMs read one-byte operands.
  EXPECT_NEAR(gemm_time_s(c, Precision::fp32, g, false), 2.0 * t, 1e-12 * t);
  EXPECT_NEAR(gemm_time_s(c, Precision::fp8, g, false), 0.5 * t, 1e-12 * t);
  // Batched: b independent products move b times the bytes.
  const Gemm batched{6, 4096, 4096, 1};
  EXPECT_NEAR(gemm_time_s(c, Precision::bf16, batched, false), 6.0 * t, 1e-12 * t);
}

TEST(GemmTime, FusedSkipsTheMemoryTerm) {
  const Cluster c = hand_cluster();
  const Gemm thin{1, 4096, 4096, 1};
  const double unfused = gemm_time_s(c, Precision::bf16, thin, false);
  const double fused = gemm_time_s(c, Precision::bf16, thin, true);
  EXPECT_LT(fused, unfused);
  // Only the compute term, at no more than the plain GEMM efficiency.
  const double at_curve = thin.flops() / (100e12 * gemm_efficiency(c.device, thin.flops()));
  EXPECT_GE(fused, at_curve * (1 - 1e-12));
  EXPECT_LT(fused, memory_time_s(c, (4096.0 * 4096.0) * 2));
  // Fused time is pure compute: linear in batch once the efficiency is clamped at the top.
  const Gemm big{1, 8192, 8192, 8192};
  const Gemm big2{2, 8192, 8192, 8192};
  EXPECT_NEAR(gemm_time_s(c, Precision::bf16, big2, true),
              2.0 * gemm_time_s(c, Precision::bf16, big, true), 1e-12);
  // On a compute-bound GEMM the fused kernel is no faster than the plain one.
  EXPECT_GE(gemm_time_s(c, Precision::bf16, big, true),
            gemm_time_s(c, Precision::bf16, big, false) * (1 - 1e-12));
}

TEST(GemmTime, BiggerGemmNeverFaster) {
  for (const Cluster& c : {hand_cluster(), cluster_load("dgx-a100-80g")}) {
    for (bool fused : {false, true}) {
      double previous = 0;
      for (std::int64_t n = 1; n <= 32768; n *= 2) {
        const double t = gemm_time_s(c, Precision::bf16, Gemm{1, n, n, n}, fused);
        EXPECT_GE(t, previous) << c.name << " n=" << n;
        previous = t;
      }
      previous = 0;
      for (std::int64_t m = 1; m <= (1 << 20); m *= 2) {
        const double t = gemm_time_s(c, Precision::bf16, Gemm{1, m, 4096, 4096}, fused);
        EXPECT_GE(t, previous) << c.name << " m=" << m;
        previous = t;
      }
    }
  }
}

TEST(GemmTime, Fp8SitsOnTheCurveWhereA16BitGemmOfTheSameDurationWould) {
  const Cluster c = hand_cluster();
  // 1000³: 2 GFLOP, compute-bound in both precisions (6 MB / 3 MB of operands at 500 GB/s).
  const Gemm g{1, 1000, 1000, 1000};
  // bf16: η(2e9) = 0.1 + 0.7·log10(2000)/6 = 0.485120.
  const double eta16 = 0.1 + 0.7 * std::log10(2000.0) / 6.0;
  EXPECT_NEAR(gemm_time_s(c, Precision::bf16, g, false), 2e9 / (100e12 * eta16), 1e-15);
  // fp8: twice the peak, so the 2 GFLOP take as long as a 1 GFLOP 16-bit GEMM: η(1e9) = 0.45.
  EXPECT_NEAR(gemm_time_s(c, Precision::fp8, g, false), 2e9 / (200e12 * 0.45), 1e-15);
  // Less than twice as fast: the fixed costs do not shrink with the arithmetic.
  EXPECT_GT(gemm_time_s(c, Precision::fp8, g, false),
            0.5 * gemm_time_s(c, Precision::bf16, g, false));
}

TEST(GemmTime, Flash2AttentionIsCappedByTheDevicesCeiling) {
  Cluster c = hand_cluster();
  // 1e12 FLOPs: η = 0.8, fused attention 0.85·0.8 = 0.68 of the 100 TFLOP/s peak.
  const Gemm g{1000, 1000, 1000, 500};
  ASSERT_DOUBLE_EQ(g.flops(), 1e12);
  const double native = 1e12 / (100e12 * 0.68);
  EXPECT_NEAR(gemm_time_s(c, Precision::bf16, g, true), native, 1e-12);
  // Without a ceiling in the profile, FlashAttention-2 kernels are the native ones.
  EXPECT_NEAR(gemm_time_s(c, Precision::bf16, g, true, true), native, 1e-12);
  c.device.flash2_attention_efficiency = 0.35; // e.g. FlashAttention-2 on an H100
  EXPECT_NEAR(gemm_time_s(c, Precision::bf16, g, true, true), 1e12 / (100e12 * 0.35), 1e-12);
  EXPECT_NEAR(gemm_time_s(c, Precision::bf16, g, true), native, 1e-12);
  // A ceiling above what the curve gives changes nothing.
  c.device.flash2_attention_efficiency = 0.9;
  EXPECT_NEAR(gemm_time_s(c, Precision::bf16, g, true, true), native, 1e-12);
}

TEST(Fp8Recipe, OnlyTransformerBlockLinearsRunInFp8) {
  Layer block_linear;
  block_linear.kind = LayerKind::linear;
  block_linear.block = 3;
  Layer head = block_linear;
  head.block = -1; // the output (logit) layer
  Layer core;
  core.kind = LayerKind::attention;
  core.block = 3;
  core.fused = true;
  EXPECT_EQ(gemm_precision(block_linear, Precision::fp8), Precision::fp8);
  EXPECT_EQ(gemm_precision(head, Precision::fp8), Precision::bf16);
  EXPECT_EQ(gemm_precision(core, Precision::fp8), Precision::bf16);
  for (Precision p : {Precision::fp32, Precision::tf32, Precision::fp16, Precision::bf16}) {
    EXPECT_EQ(gemm_precision(block_linear, p), p);
    EXPECT_EQ(gemm_precision(core, p), p);
  }
  // Forward: the activation (2·8×2) read in 16 bits and written as FP8 and FP8 transposed, 4
  // bytes per element; backward: the output gradient (2·8×4) likewise. Weights: once per step.
  const auto [fwd, bwd] = fp8_cast_bytes(Gemm{2, 8, 4, 2});
  EXPECT_DOUBLE_EQ(fwd, 4.0 * 32);
  EXPECT_DOUBLE_EQ(bwd, 4.0 * 64);
}

TEST(GemmTime, EmptyGemmIsFreeAndUnsupportedPrecisionThrows) {
  Cluster c = hand_cluster();
  EXPECT_EQ(gemm_time_s(c, Precision::bf16, Gemm{1, 0, 16, 16}, false), 0.0);
  EXPECT_THROW(gemm_time_s(c, Precision::fp16, Gemm{1, 16, 16, 16}, false), InputError);
}

} // namespace
} // namespace parallax
