// Discrete-event simulator speed: raw engine throughput (events per second on one core) and
// wall time of whole-iteration simulations at scale (target < 1 s each).
#include "parallax/core/plan_json.hpp"
#include "parallax/hardware_profiles/cluster_loader.hpp"
#include "parallax/models/model_loader.hpp"
#include "parallax/simulator/event_engine.hpp"
#include "parallax/simulator/iteration_simulator.hpp"

#include <benchmark/benchmark.h>

namespace {

// Engine alone: `streams` chains of compute tasks, each task followed by a flow on one of a few
// shared links, with cross-stream dependencies every step.
parallax::EventEngine engine_graph(int steps) {
  const int streams = 64;
  parallax::EventEngine e;
  std::vector<parallax::EventEngine::Id> compute(streams), comm(streams), links(4);
  for (int s = 0; s < streams; ++s) {
    compute[s] = e.add_stream();
    comm[s] = e.add_stream();
  }
  for (auto& l : links) {
    l = e.add_link(1e9);
  }
  std::vector<parallax::EventEngine::Id> last(streams, -1);
  for (int i = 0; i < steps; ++i) {
    for (int s = 0; s < streams; ++s) {
      const auto c = e.add_compute(compute[s], 1e-4 * (1 + (i + s) % 3));
      const auto f = e.add_flow(comm[s], links[s % 4], 1e-6, 1e4);
      e.add_dependency(c, f);
      if (last[(s + 1) % streams] >= 0) {
        e.add_dependency(last[(s + 1) % streams], c);
      }
      last[s] = f;
    }
  }
  return e;
}

// Event processing alone (the graph is built outside the timed region).
void BM_EngineEvents(benchmark::State& state) {
  const int steps = static_cast<int>(state.range(0));
  std::int64_t events = 0;
  for (auto _ : state) {
    state.PauseTiming();
    parallax::EventEngine e = engine_graph(steps);
    state.ResumeTiming();
    e.run();
    events += e.events_processed();
    state.PauseTiming();
    { parallax::EventEngine discard = std::move(e); } // freed outside the timed region
    state.ResumeTiming();
  }
  state.counters["events_per_s"] =
      benchmark::Counter(static_cast<double>(events), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_EngineEvents)->Arg(2000)->Unit(benchmark::kMillisecond);

// Building the task graph and running it.
void BM_EngineBuildAndRun(benchmark::State& state) {
  const int steps = static_cast<int>(state.range(0));
  std::int64_t events = 0;
  for (auto _ : state) {
    parallax::EventEngine e = engine_graph(steps);
    e.run();
    events += e.events_processed();
  }
  state.counters["events_per_s"] =
      benchmark::Counter(static_cast<double>(events), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_EngineBuildAndRun)->Arg(2000)->Unit(benchmark::kMillisecond);

void simulate_case(benchmark::State& state, const char* model_name, const char* cluster_name,
                   int gpus, const char* plan_text) {
  const parallax::LoadedModel model = parallax::model_load(model_name);
  const parallax::Cluster cluster = parallax::cluster_load(cluster_name).with_devices(gpus);
  const parallax::Plan plan = parallax::plan_from_json(parallax::Json::parse(plan_text), "bench");
  parallax::plan_validate(plan, model.graph, gpus, "bench");
  std::int64_t events = 0;
  std::int64_t tasks = 0;
  for (auto _ : state) {
    parallax::CostModel cost(model.graph, cluster); // unit costs are computed afresh each time
    parallax::SimulationResult r =
        parallax::simulate_iteration(cost, plan, {.symmetric = true, .record_timeline = false});
    benchmark::DoNotOptimize(r.estimate.iteration_time_s);
    events += r.events;
    tasks = r.tasks;
  }
  state.counters["events_per_s"] =
      benchmark::Counter(static_cast<double>(events), benchmark::Counter::kIsRate);
  state.counters["tasks"] = static_cast<double>(tasks);
}

// Narayanan et al. 2021: the 1T model on 3072 A100s (t = 8, p = 64, d = 6, batch 3072).
void BM_Simulate1T_3072xA100(benchmark::State& state) {
  simulate_case(state, "megatron-1t", "dgx-a100-80g", 3072,
                R"({"dp": 6, "tp": 8, "pp": 64, "micro_batch_size": 1, "global_batch_size": 3072,
                    "schedule": "interleaved", "virtual_stages": 2, "recompute": "full",
                    "precision": "fp16"})");
}
// Llama 3 405B on 16384 H100s (t = 8, p = 16, d = 128, 2048 sequences of 8192 tokens).
void BM_SimulateLlama405B_16384xH100(benchmark::State& state) {
  simulate_case(state, "llama3-405b", "dgx-h100", 16384,
                R"({"dp": 128, "tp": 8, "pp": 16, "zero_stage": 1, "micro_batch_size": 1,
                    "global_batch_size": 2048, "schedule": "interleaved", "virtual_stages": 2,
                    "recompute": "selective", "sequence_parallel": true, "precision": "bf16"})");
}
BENCHMARK(BM_Simulate1T_3072xA100)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SimulateLlama405B_16384xH100)->Unit(benchmark::kMillisecond);

} // namespace

// main: bench_main.cpp
