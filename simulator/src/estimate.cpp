#include "parallax/simulator/estimate.hpp"

#include "parallax/core/plan_json.hpp"

namespace parallax {

Json estimate_to_json(const PlanEstimate& e) {
  const auto& m = e.memory;
  const auto& b = e.breakdown;
  Json j = {{"plan", plan_to_json(e.plan)},
            {"iteration_time_s", e.iteration_time_s},
            {"tokens_per_s", e.tokens_per_s},
            {"tflops_per_gpu", e.tflops_per_gpu},
            {"mfu", e.mfu},
            {"stack", e.stack},
            {"peak_memory_bytes", static_cast<std::int64_t>(m.allocated())},
            {"peak_reserved_bytes", static_cast<std::int64_t>(m.reserved())},
            {"peak_device_bytes", static_cast<std::int64_t>(m.total())},
            {"memory_capacity_bytes", static_cast<std::int64_t>(e.memory_capacity_bytes)},
            {"fits", e.fits},
            {"memory",
             {{"params", m.params},
              {"grads", m.grads},
              {"optimizer", m.optimizer},
              {"activations", m.activations},
              {"buffers", m.buffers},
              {"allocator", m.allocator},
              {"runtime", m.runtime}}},
            {"breakdown",
             {{"compute", b.compute},
              {"tp_comm", b.tp_comm},
              {"pp_comm", b.pp_comm},
              {"dp_comm", b.dp_comm},
              {"bubble", b.bubble},
              {"optimizer", b.optimizer}}},
            {"bottleneck", e.bottleneck}};
  if (e.plan.grad_sync == GradSync::parameter_server_async) {
    j["staleness"] = e.staleness;
  }
  return j;
}

} // namespace parallax
