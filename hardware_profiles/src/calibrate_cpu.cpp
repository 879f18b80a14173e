#include "parallax/hardware_profiles/calibrate.hpp"

#include "parallax/executor/comm.hpp"
#include "parallax/executor/ops.hpp"
#include "parallax/executor/tensor.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

namespace parallax {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median wall time of `reps` runs of f after `warmup` runs, every rank starting each run
// together.
double median_time(Communicator& world, int warmup, int reps, const std::function<void()>& f) {
  for (int i = 0; i < warmup; ++i)
    f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    world.barrier();
    const double s = now_s();
    f();
    t.push_back(now_s() - s);
  }
  std::nth_element(t.begin(), t.begin() + static_cast<std::ptrdiff_t>(t.size() / 2), t.end());
  return t[t.size() / 2];
}

double mean_over_ranks(Communicator& world, double v) {
  double x[1] = {v};
  world.all_reduce_sum(std::span<double>(x));
  return x[0] / world.size();
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

double memory_gib_total() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  double kib = 0;
  std::string unit;
  while (f >> key >> kib >> unit) {
    if (key == "MemTotal:")
      return kib / (1024.0 * 1024.0);
  }
  return 24.0;
}

} // namespace

Cluster calibrate_cpu(const CalibrationOptions& options) {
  auto world = mpi_world(options.comm_timeout);
  const int n = world->size();
  const int reps = options.quick ? 3 : 7;

  // GEMM grid: square shapes and the skinny ones transformer layers run (tokens × hidden ×
  // ffn, and the vocabulary projection).
  struct Shape {
    Eigen::Index m, k, n;
  };
  std::vector<Shape> shapes = {
      {32, 32, 32},   {64, 64, 64},     {128, 128, 128},  {256, 256, 256},   {512, 512, 512},
      {256, 64, 256}, {512, 256, 1024}, {1024, 512, 512}, {1024, 512, 2048}, {1024, 2048, 512}};
  if (!options.quick) {
    shapes.push_back({1024, 1024, 1024});
    shapes.push_back({2048, 2048, 2048});
    shapes.push_back({1024, 512, 8192});
  }
  std::vector<std::pair<double, double>> rates; // (flops, FLOP/s)
  for (const Shape& s : shapes) {
    const Mat a = Mat::Random(s.m, s.k);
    const Mat b = Mat::Random(s.k, s.n);
    Mat c(s.m, s.n);
    const double flops = 2.0 * static_cast<double>(s.m * s.k * s.n);
    // Enough repetitions inside one timing to last a few milliseconds.
    const int inner = std::max(1, static_cast<int>(2e8 / flops));
    const double t = median_time(*world, 1, reps, [&] {
      for (int i = 0; i < inner; ++i)
        c.noalias() = a * b;
    });
    rates.emplace_back(flops, mean_over_ranks(*world, flops * inner / t));
  }
  std::sort(rates.begin(), rates.end());
  double peak = 0;
  for (const auto& [f, r] : rates)
    peak = std::max(peak, r);

  // Memory bandwidth: a streaming copy (read + write) of buffers far larger than the caches.
  const auto elems = static_cast<Eigen::Index>(options.quick ? (4 << 20) : (32 << 20));
  Tensor src(1, elems);
  Tensor dst(1, elems);
  src.m().setConstant(0.5f);
  const double t_copy = median_time(*world, 1, reps, [&] { dst.m() = src.m(); });
  const double bandwidth = mean_over_ranks(*world, 2.0 * 4.0 * static_cast<double>(elems) / t_copy);
  const double t_gelu = median_time(*world, 1, reps, [&] { ops::gelu_forward(src, dst); });
  const double gelu_rate = mean_over_ranks(*world, 2.0 * 4.0 * static_cast<double>(elems) / t_gelu);

  Cluster c;
  c.name = "cpu-calibrated";
  c.device.name = cpu_model() + " core";
  c.device.kind = "cpu";
  c.device.peak_tflops[Precision::fp32] = peak / 1e12;
  c.device.memory_gib = memory_gib_total() / n;
  c.device.memory_bandwidth_gbps = bandwidth / 1e9;
  c.device.elementwise_efficiency = std::clamp(gelu_rate / bandwidth, 0.05, 1.0);
  // The cost model's curve is a function of GEMM FLOPs: one point per FLOP count (the best
  // shape of that size), made non-decreasing — a larger GEMM can always be blocked at least as
  // well as a smaller one, and single pathological shapes (Eigen's 256³ runs at a fifth of its
  // 512³ rate here) must not drag down every GEMM of similar size.
  double envelope = 0;
  for (std::size_t i = 0; i < rates.size();) {
    std::size_t j = i;
    double best = 0;
    while (j < rates.size() && rates[j].first == rates[i].first)
      best = std::max(best, rates[j++].second);
    envelope = std::max(envelope, best / peak);
    c.device.gemm_efficiency.push_back({rates[i].first, envelope});
    i = j;
  }

  // All-reduce over every rank: latency from the smallest message, bus bandwidth from the
  // largest (ring volume 2(n − 1)/n of the message per rank).
  double latency_us = 1.0;
  double bus_gbps = c.device.memory_bandwidth_gbps / 2;
  if (n > 1) {
    // Least-squares fit of t = a + b · bytes over messages of 4 KiB … 4 MiB (the activation,
    // gradient-bucket and parameter sizes CPU runs exchange): a is 2(n − 1) ring steps of
    // latency, b the inverse bus bandwidth over the ring volume 2(n − 1)/n of the message.
    std::vector<double> xs, ts;
    for (std::size_t count = 1024; count <= (1u << 20); count *= 4) {
      std::vector<float> buf(count, 1.0f);
      const double t =
          median_time(*world, 2, reps, [&] { world->all_reduce_sum(std::span<float>(buf)); });
      xs.push_back(4.0 * static_cast<double>(count) * 2.0 * (n - 1) / n);
      ts.push_back(mean_over_ranks(*world, t));
    }
    double mx = 0, mt = 0;
    for (std::size_t i = 0; i < xs.size(); ++i) {
      mx += xs[i] / static_cast<double>(xs.size());
      mt += ts[i] / static_cast<double>(xs.size());
    }
    double sxx = 0, sxt = 0;
    for (std::size_t i = 0; i < xs.size(); ++i) {
      sxx += (xs[i] - mx) * (xs[i] - mx);
      sxt += (xs[i] - mx) * (ts[i] - mt);
    }
    const double slope = std::max(sxt / sxx, 1e-12);
    const double intercept = std::max(mt - slope * mx, 1e-7);
    latency_us = intercept / (2.0 * (n - 1)) * 1e6;
    bus_gbps = 1.0 / slope / 1e9;
  }
  c.node.devices_per_node = n;
  c.node.intra_bandwidth_gbps = bus_gbps;
  c.node.intra_latency_us = latency_us;
  c.network.num_nodes = 1;
  c.network.inter_bandwidth_gbps = bus_gbps;
  c.network.inter_latency_us = latency_us;
  c.network.topology = Topology::single_switch;
  // The bandwidths above are achieved rates already.
  c.collectives.intra = 1.0;
  c.collectives.inter = 1.0;
  c.notes = fmt::format(
      "Measured by `parallax calibrate --backend cpu` with {} MPI rank(s) running at once on "
      "{}: fp32 GEMM peak {:.1f} GFLOP/s per rank (Eigen, best of {} shapes, medians of {} "
      "repetitions), streaming copy {:.1f} GB/s per rank, GELU at {:.0f}% of that, all-reduce "
      "latency {:.1f} us per ring step and bus bandwidth {:.2f} GB/s per rank.",
      n, cpu_model(), peak / 1e9, shapes.size(), reps, bandwidth / 1e9,
      100 * c.device.elementwise_efficiency, latency_us, bus_gbps);
  return c;
}

} // namespace parallax
