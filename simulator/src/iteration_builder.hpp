// The discrete-event simulation's builder: each simulated rank's step program (core/
// step_program) turned into engine tasks with costs, the cross-rank links (pipeline sends,
// collective groups) wired, and the figures read back from the engine's times.
// iteration_simulator.cpp builds and runs; iteration_estimate.cpp reads the results.
#pragma once

#include "parallax/core/step_program.hpp"
#include "parallax/simulator/collectives.hpp"
#include "parallax/simulator/cost_model.hpp"
#include "parallax/simulator/event_engine.hpp"
#include "parallax/simulator/iteration_simulator.hpp"

#include <map>
#include <unordered_map>
#include <vector>

namespace parallax::detail {

using Id = EventEngine::Id;

// What a task means, for the timeline and the breakdown.
struct TaskInfo {
  int rank = 0;
  int slot = 0; // index of the simulated rank
  Stream stream = Stream::compute;
  Category category = Category::forward;
  int unit = -1;
  int micro_batch = -1;
  int op = -1;          // the step-program op the task runs
  bool tp_part = false; // the op's tensor-parallel collective
  double flops = 0;
  double bytes = 0;
};

struct RankSim {
  int rank = 0; // global rank this simulated rank stands for
  int slot = 0; // index among the simulated ranks
  int pp_rank = 0;
  int dp = 0;
  int tp = 0;
  StepProgram program;
  Id compute = 0, tp_stream = 0, pp_stream = 0, dp_stream = 0;
  Id gather_stream = 0; // ZeRO-3 parameter all-gathers (FSDP runs them beside reductions)
  Id nvlink = 0;
  Id network = 0;            // the uplink of this rank's node, shared with the node's other ranks
  double network_weight = 1; // ranks on the node this rank's network flows stand for
  std::vector<Id> anchor;    // per op: its main task (-1 for a receive)
  // Receives: (op, the rank's last task before it, the task that consumes it).
  struct Receive {
    int op;
    Id before;
    Id consumer;
  };
  std::vector<Receive> receives;
  std::vector<std::pair<Id, bool>> op_ends; // last task of each schedule op, forward?
  std::vector<int> op_chunks;
};

// Collective instances in the unreduced simulation: members synchronise through a barrier.
struct GroupKey {
  int kind; // 0 TP, 1 DP, 2 tied embedding (first and last stage)
  int group;
  int sequence;
  auto operator<=>(const GroupKey&) const = default;
};

class IterationBuilder {
public:
  // `replica` >= 0: the plan is replica_plan(·, replica) of uneven dp_shares, costed on that
  // replica's devices.
  IterationBuilder(CostModel& model, const Plan& plan, const SimulationOptions& options,
                   int replica = -1);

  SimulationResult run();

private:
  Id add_compute(RankSim& r, double duration, const StepOp& op, int op_index, double flops);
  Id add_comm(RankSim& r, const StepOp& op, int op_index, const CollectiveCost& cost, double bytes,
              bool tp_part = false);
  void chain(Id task);
  void record_group(int kind, int group, RankSim& r, Id trigger, Id task);
  void build_rank(RankSim& r);
  void run_op(RankSim& r, int i);
  void wait_for(RankSim& r, const StepOp& op, Id task);
  // The op's in-layer collectives after it on the rank's chain: `seconds` of them, of which
  // `ep_s` are expert-parallel all-to-alls (a flow on the node's NICs when the EP group spans
  // nodes, sharing them with the data-parallel traffic).
  Id tp_collective(RankSim& r, const StepOp& op, int i, double seconds, Id trigger,
                   double ep_s = 0.0);
  double unit_reduction_bytes(int unit) const;
  Id node_link(int node);
  double replicas_on_node(const RankSim& r) const;
  void wire_groups();
  PlanEstimate estimate_from(const std::vector<RankSim>& ranks,
                             std::vector<double>& stage_peaks) const;
  Timeline timeline_from(const std::vector<RankSim>& ranks) const;

  CostModel& model_;
  const Plan& plan_;
  const SimulationOptions& options_;
  const Cluster& cluster_;
  std::vector<StageRange> stages_;
  const std::vector<UnitCost>& units_; // the first node group's (sizes; the same on every group)
  double w_bytes_;
  std::vector<CostModel::RankLoad> loads_; // per pipeline rank
  // Per pipeline rank: the unit costs on its node group's devices (heterogeneous clusters).
  std::vector<const std::vector<UnitCost>*> stage_units_;
  StepShape shape_;
  EventEngine engine_;
  std::vector<TaskInfo> info_;
  Id prev_ = -1; // last task of the current rank's critical chain
  // Pipeline sends by (direction, chunk, micro-batch, dp, tp), packed into one index.
  std::int64_t send_key(bool forward, int chunk, int mb, int dp, int tp) const {
    const auto chunks = static_cast<std::int64_t>(stages_.size());
    return (((static_cast<std::int64_t>(forward) * chunks + chunk) * plan_.num_microbatches() +
             mb) *
                plan_.dp +
            dp) *
               plan_.tp +
           tp;
  }
  std::unordered_map<std::int64_t, Id> sends_;
  std::vector<std::pair<std::int64_t, Id>> receives_;
  std::map<GroupKey, std::vector<std::pair<Id, Id>>> groups_; // trigger, task
  std::unordered_map<int, Id> node_links_;
  std::map<std::pair<int, int>, int> group_sequence_;
};

} // namespace parallax::detail
