// Planner speed: a full search (every dp × tp × pp, ZeRO stage, micro-batch, schedule with each
// v, recomputation, sequence parallel) for the two reference cases. Counters report
// candidates generated and evaluated per second; the target is under 1 s per search.
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/hardware_profiles/stack_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/planner/planner.hpp"

#include <benchmark/benchmark.h>

namespace {

void run_search(benchmark::State& state, const char* model_name, int gpus, std::int64_t batch,
                int simulate_top) {
  const parallax::LoadedModel model = parallax::model_load(model_name);
  const parallax::Cluster cluster = parallax::cluster_load("dgx-a100-80g");
  parallax::PlanRequest req;
  req.gpus = gpus;
  req.global_batch_size = batch;
  req.simulate_top = simulate_top;
  // The stack `parallax plan` assumes on this cluster (megatron-core on a GPU profile).
  req.stack = parallax::stack_load(parallax::stack_default_name(cluster));
  std::int64_t candidates = 0;
  std::int64_t evaluated = 0;
  for (auto _ : state) {
    parallax::PlanSearchResult r = parallax::plan_search(model.graph, cluster, req);
    benchmark::DoNotOptimize(r.plans.data());
    candidates += r.candidates;
    evaluated += r.evaluated;
  }
  state.counters["candidates_per_s"] =
      benchmark::Counter(static_cast<double>(candidates), benchmark::Counter::kIsRate);
  state.counters["timed_per_s"] =
      benchmark::Counter(static_cast<double>(evaluated), benchmark::Counter::kIsRate);
  state.counters["candidates"] =
      static_cast<double>(candidates) / static_cast<double>(state.iterations());
}

// Argument: how many of the analytic ranking's best plans the simulator re-ranks (0: none;
// 20: the default of `parallax plan`).
void BM_PlanGpt3_175B_1024xA100(benchmark::State& state) {
  run_search(state, "gpt3-175b", 1024, 1536, static_cast<int>(state.range(0)));
}
void BM_PlanMegatron1T_3072xA100(benchmark::State& state) {
  run_search(state, "megatron-1t", 3072, 3072, static_cast<int>(state.range(0)));
}

BENCHMARK(BM_PlanGpt3_175B_1024xA100)->Arg(0)->Arg(20)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_PlanMegatron1T_3072xA100)
    ->Arg(0)
    ->Arg(20)
    ->Unit(benchmark::kMillisecond)
    ->MinTime(2.0);

} // namespace

// main: bench_main.cpp
