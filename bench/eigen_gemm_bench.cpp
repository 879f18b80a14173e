// Single-thread fp32 GEMM throughput of Eigen as the CPU executor builds it: the "peak" that
// executor MFU on CPU is measured against (bench/RESULTS.md, issue 5).
#include "parallax/executor/tensor.hpp"

#include <benchmark/benchmark.h>

namespace {

void BM_EigenSgemm(benchmark::State& state) {
  const auto n = static_cast<Eigen::Index>(state.range(0));
  parallax::Mat a = parallax::Mat::Random(n, n);
  parallax::Mat b = parallax::Mat::Random(n, n);
  parallax::Mat c(n, n);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  const double flops =
      2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  state.counters["GFLOP/s"] = benchmark::Counter(
      flops * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

BENCHMARK(BM_EigenSgemm)->Arg(256)->Arg(512)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond);

} // namespace

BENCHMARK_MAIN();
