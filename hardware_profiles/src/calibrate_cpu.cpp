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

struct AllReduceFit {
  double latency_us = 0; // per ring step
  double bus_gbps = 0;
};

// Least-squares fit of t = a + b · bytes over all-reduces of 4 KiB … 4 MiB (the activation,
// gradient-bucket and parameter sizes CPU runs exchange) on `comm`, every rank of `world`
// timing its own group at once: a is 2(n − 1) ring steps of latency, b the inverse bus
// bandwidth over the ring volume 2(n − 1)/n of the message.
AllReduceFit fit_all_reduce(Communicator& world, Communicator& comm, int reps) {
  const int n = comm.size();
  std::vector<double> xs, ts;
  for (std::size_t count = 1024; count <= (1u << 20); count *= 4) {
    std::vector<float> buf(count, 1.0f);
    const double t =
        median_time(world, 2, reps, [&] { comm.all_reduce_sum(std::span<float>(buf)); });
    xs.push_back(4.0 * static_cast<double>(count) * 2.0 * (n - 1) / n);
    ts.push_back(mean_over_ranks(world, t));
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
  double slope = sxt / sxx;
  double intercept = mt - slope * mx;
  if (slope <= 0 || intercept < 0) {
    // Time not growing with size (scheduling noise, e.g. more ranks than cores): bound the
    // bandwidth by the largest message alone and the latency by the smallest.
    slope = ts.back() / xs.back();
    intercept = ts.front();
  }
  intercept = std::max(intercept, 1e-7);
  return {intercept / (2.0 * (n - 1)) * 1e6, 1.0 / slope / 1e9};
}

// The rate of the executor's element-wise layers in the cost model's terms: bytes charged per
// second, where the model charges a layer its forward traffic (fwd_mem_elems: LayerNorm and
// GELU read and write [T, n], cross-entropy reads [T, V]) once forward and twice backward.
// Measured on LayerNorm, GELU and cross-entropy, forward and backward, over tensors larger than
// the caches — what these layers cost inside a step, which a plain copy does not show (GELU's
// tanh and the exponentials are arithmetic, not traffic).
double elementwise_bytes_per_s(Communicator& world, const CalibrationOptions& options, int reps) {
  const Eigen::Index tokens = options.quick ? 512 : 2048;
  const Eigen::Index h = 512;
  const Eigen::Index f = 2048;
  const Eigen::Index vocab = 8192;
  Tensor x(tokens, h), y(tokens, h), dx(tokens, h), dy(tokens, h);
  Tensor gamma(1, h), beta(1, h), dgamma(1, h), dbeta(1, h), mean(tokens, 1), rstd(tokens, 1);
  Tensor a(tokens, f), b(tokens, f), da(tokens, f), db(tokens, f);
  Tensor logits(tokens, vocab), dlogits(tokens, vocab), max(tokens, 1), sum(tokens, 1);
  std::vector<std::int32_t> targets(static_cast<std::size_t>(tokens));
  for (std::size_t i = 0; i < targets.size(); ++i) {
    targets[i] = static_cast<std::int32_t>((i * 7919) % static_cast<std::size_t>(vocab));
  }
  for (Tensor* t : {&x, &dy, &a, &db, &logits}) {
    t->m().setRandom();
  }
  gamma.m().setOnes();
  const double t = median_time(world, 1, reps, [&] {
    ops::layernorm_forward(x, gamma, beta, y, mean, rstd, 1e-5f);
    ops::layernorm_backward(x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
    ops::gelu_forward(a, b);
    ops::gelu_backward(a, db, da);
    ops::row_max(logits, max);
    ops::row_sum_exp(logits, max, sum);
    ops::cross_entropy_backward(logits, max, sum, targets, 0, 1.0f, dlogits);
  });
  const auto T = static_cast<double>(tokens);
  const double charged = 3.0 * 4.0 * (2.0 * T * h + 2.0 * T * f + T * static_cast<double>(vocab));
  return mean_over_ranks(world, charged / t);
}

// The rate of the executor's AdamW update in the cost model's terms: it charges an fp32
// parameter 28 bytes (read and write the parameter and both moments, read the gradient; see
// kAdamBytesFp32 in simulator/src/cost_model.cpp). The update's square root and division make
// it slower than a copy of that traffic on CPUs.
double optimizer_bytes_per_s(Communicator& world, const CalibrationOptions& options, int reps) {
  const std::int64_t n = options.quick ? (1 << 20) : (8 << 20);
  std::vector<float> p(static_cast<std::size_t>(n), 0.1f), g(p.size(), 0.01f), m1(p.size(), 0.0f),
      m2(p.size(), 0.0f);
  const ops::AdamwStep step{0.9f, 0.95f, 1.0f, 0.9999f, 1e-4f, 1.0f, 1e-8f};
  const double t = median_time(world, 1, reps, [&] {
    ops::adamw_update(p.data(), g.data(), m1.data(), m2.data(), n, step);
  });
  return mean_over_ranks(world, 28.0 * static_cast<double>(n) / t);
}

} // namespace

Cluster calibrate_cpu(const CalibrationOptions& options) {
  auto world = mpi_world(options.comm_timeout);
  const int n = world->size();
  const int reps = options.quick ? 3 : 7;

  // GEMM rates as training sees them: the executor's own linear layer, forward (y = x·W) and
  // backward (dx = dy·Wᵀ, dW += xᵀ·dy), on the token × feature shapes transformer layers run,
  // cycling through enough independent operand sets that each call finds its inputs in memory
  // rather than in the caches (in a training step every layer reads activations written long
  // before). Isolated products of cache-resident matrices run ~1.5× faster than that here.
  struct Shape {
    Eigen::Index tokens, in, out;
  };
  std::vector<Shape> shapes;
  const std::vector<Eigen::Index> token_counts =
      options.quick ? std::vector<Eigen::Index>{128, 1024}
                    : std::vector<Eigen::Index>{64, 128, 256, 512, 1024, 2048};
  const std::vector<std::pair<Eigen::Index, Eigen::Index>> features =
      options.quick
          ? std::vector<std::pair<Eigen::Index, Eigen::Index>>{{64, 64}, {256, 256}, {256, 1024}}
          : std::vector<std::pair<Eigen::Index, Eigen::Index>>{
                {64, 64},   {128, 128},  {256, 256},  {256, 768},  {256, 1024}, {1024, 256},
                {512, 512}, {512, 2048}, {2048, 512}, {256, 4096}, {1024, 1024}};
  for (Eigen::Index t : token_counts) {
    for (const auto& [in, out] : features) {
      shapes.push_back({t, in, out});
    }
  }
  constexpr double kColdBytes = 48.0 * (1 << 20); // operand sets together exceed the caches
  std::vector<std::pair<double, double>> rates;   // (forward GEMM FLOPs, FLOP/s over fwd + bwd)
  for (const Shape& s : shapes) {
    const double set_bytes =
        4.0 * static_cast<double>(2 * s.tokens * s.in + 2 * s.tokens * s.out + 2 * s.in * s.out);
    const int sets = std::clamp(static_cast<int>(kColdBytes / set_bytes) + 1, 2, 64);
    struct Operands {
      Tensor x, w, y, dy, dx, dw;
    };
    std::vector<Operands> ops_sets;
    for (int i = 0; i < sets; ++i) {
      Operands o{Tensor(s.tokens, s.in),  Tensor(s.in, s.out),    Tensor(s.tokens, s.out),
                 Tensor(s.tokens, s.out), Tensor(s.tokens, s.in), Tensor(s.in, s.out)};
      o.x.m().setRandom();
      o.w.m().setRandom();
      o.dy.m().setRandom();
      o.dw.m().setZero();
      ops_sets.push_back(std::move(o));
    }
    const double fwd_flops = 2.0 * static_cast<double>(s.tokens * s.in * s.out);
    // Enough passes over the sets inside one timing to last a few milliseconds.
    const int passes = std::max(1, static_cast<int>(2e8 / (3 * fwd_flops * sets)));
    const double t = median_time(*world, 1, reps, [&] {
      for (int p = 0; p < passes; ++p) {
        for (Operands& o : ops_sets) {
          ops::linear_forward(o.x, o.w, {}, o.y);
          ops::linear_backward(o.x, o.w, o.dy, o.dx, o.dw, {});
        }
      }
    });
    const double per_call = t / (passes * sets);
    rates.emplace_back(fwd_flops, mean_over_ranks(*world, 3 * fwd_flops / per_call));
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
  const double elementwise_rate = elementwise_bytes_per_s(*world, options, reps);
  const double optimizer_rate = optimizer_bytes_per_s(*world, options, reps);
  Cluster c;
  c.name = "cpu-calibrated";
  c.device.name = cpu_model() + " core";
  c.device.kind = "cpu";
  c.device.peak_tflops[Precision::fp32] = peak / 1e12;
  c.device.memory_gib = memory_gib_total() / n;
  c.device.memory_bandwidth_gbps = bandwidth / 1e9;
  c.device.elementwise_efficiency = std::clamp(elementwise_rate / bandwidth, 0.05, 1.0);
  c.device.optimizer_efficiency = std::clamp(optimizer_rate / bandwidth, 0.05, 1.0);
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

  // All-reduce over every rank, and over every smaller group the executor can form: for each
  // group size g dividing n, adjacent ranks (stride 1, like tensor-parallel groups) and ranks
  // n/g apart (like data-parallel groups), all groups at once as in training.
  double latency_us = 1.0;
  double bus_gbps = c.device.memory_bandwidth_gbps / 2;
  std::vector<MeasuredCollective> measured;
  for (int g = 2; g <= n; ++g) {
    if (n % g != 0) {
      continue;
    }
    std::vector<int> strides = {1};
    if (n / g > 1) {
      strides.push_back(n / g);
    }
    for (int stride : strides) {
      const int me = world->rank();
      const int first = stride == 1 ? me - me % g : me % stride;
      std::vector<int> members;
      for (int i = 0; i < g; ++i) {
        members.push_back(first + i * stride);
      }
      auto group = g == n ? nullptr
                          : mpi_group(members, fmt::format("calibrate-g{}-s{}", g, stride),
                                      options.comm_timeout);
      Communicator& comm = group ? *group : *world;
      const AllReduceFit fit = fit_all_reduce(*world, comm, reps);
      measured.push_back({g, stride, fit.latency_us, fit.bus_gbps});
      if (g == n) {
        latency_us = fit.latency_us;
        bus_gbps = fit.bus_gbps;
      }
    }
  }
  c.node.devices_per_node = n;
  c.node.intra_bandwidth_gbps = bus_gbps;
  c.node.intra_latency_us = latency_us;
  c.node.measured_collectives = measured;
  c.network.num_nodes = 1;
  c.network.inter_bandwidth_gbps = bus_gbps;
  c.network.inter_latency_us = latency_us;
  c.network.topology = Topology::single_switch;
  // The bandwidths above are achieved rates already.
  c.collectives.intra = 1.0;
  c.collectives.inter = 1.0;
  c.notes = fmt::format(
      "Measured by `parallax calibrate --backend cpu` with {} MPI rank(s) running at once on "
      "{}: fp32 GEMM peak {:.1f} GFLOP/s per rank (the executor's linear layer forward + "
      "backward with operands from memory, best of {} shapes, medians of {} repetitions), "
      "streaming copy {:.1f} GB/s per rank, element-wise layers at {:.0f}% of that, AdamW at "
      "{:.0f}%, all-reduce latency {:.1f} us per ring step and bus bandwidth {:.2f} GB/s per "
      "rank.",
      n, cpu_model(), peak / 1e9, shapes.size(), reps, bandwidth / 1e9,
      100 * c.device.elementwise_efficiency, 100 * c.device.optimizer_efficiency, latency_us,
      bus_gbps);
  return c;
}

} // namespace parallax
