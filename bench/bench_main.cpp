// The benchmarks' main: as the parallax binary does, freed memory stays in the heap for the
// next simulation (see keep_freed_memory).
#include "parallax/core/memory_policy.hpp"

#include <benchmark/benchmark.h>

int main(int argc, char** argv) {
  parallax::keep_freed_memory();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
    return 1;
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
