// Plan: one way to lay a model out on a cluster — the planner's output, the simulator's and the
// executor's input.
//
// Rank mapping (Megatron-Core order tp-cp-dp-pp, tensor-parallel fastest so TP groups share a
// node, context-parallel next so a CP ring stays inside a node where it can):
//   rank = tp_rank + t · (cp_rank + c · (dp_rank + d · pp_rank))
// and rank r sits on node r / devices_per_node, device r % devices_per_node.
#pragma once

#include "parallax/core/grad_compression.hpp"
#include "parallax/core/precision.hpp"

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace parallax {

enum class Schedule { gpipe, one_f_one_b, interleaved };
enum class Recompute { none, selective, full };
// parameter_server: gradients reduced to data-parallel rank 0, which updates and broadcasts.
// parameter_server_async: every data-parallel rank serves a shard and workers push and pull
// without a barrier, at most max_staleness steps apart (executor/async_ps.hpp).
enum class GradSync { allreduce, tree, hierarchical, parameter_server, parameter_server_async };
// How context-parallel ranks exchange keys and values: passed around the CP ring while the
// attention blocks run (ring attention; Megatron-Core's --cp-comm-type p2p), or all-gathered
// before the attention and reduce-scattered after its backward (all_gather).
enum class CpComm { p2p, all_gather };

inline constexpr std::array<std::string_view, 3> kScheduleNames = {"gpipe", "1f1b", "interleaved"};
inline constexpr std::array<std::string_view, 3> kRecomputeNames = {"none", "selective", "full"};
inline constexpr std::array<std::string_view, 5> kGradSyncNames = {
    "allreduce", "tree", "hierarchical", "parameter_server", "parameter_server_async"};
inline bool is_parameter_server(GradSync g) {
  return g == GradSync::parameter_server || g == GradSync::parameter_server_async;
}
inline constexpr std::array<std::string_view, 2> kCpCommNames = {"p2p", "all_gather"};

std::string_view schedule_name(Schedule s);
std::string_view recompute_name(Recompute r);
std::string_view grad_sync_name(GradSync g);
std::string_view cp_comm_name(CpComm c);

// [first, last) range of partition units (transformer blocks) of one stage chunk.
using StageRange = std::pair<int, int>;

struct Plan {
  int dp = 1;
  int tp = 1;
  int pp = 1;
  // Expert parallelism: each MoE layer's routed experts spread over ep ranks of the
  // data- and context-parallel ranks (ep divides dp·cp; Megatron-Core's expert-model-parallel
  // size). Tokens reach
  // their experts through all-to-all; expert gradients are reduced over the dp / ep ranks that
  // hold the same experts (the expert-data-parallel group).
  int ep = 1;
  // Expert tensor parallelism: how many of a TP group's ranks split each routed expert. 0 (the
  // default, Megatron-Core's): all tp of them, like a dense MLP. 1: none — each TP rank
  // computes whole experts on its sequence-parallel share of the tokens, and the EP group
  // spans the stage's tp·dp·cp ranks (Megatron-Core's --expert-tensor-parallel-size 1, "MoE
  // parallel folding"); needs sequence parallelism when tp > 1.
  int etp = 0;
  // The ranks splitting each expert, and the ranks the EP group is carved from.
  int expert_tp() const { return etp > 0 ? etp : tp; }
  int expert_ranks() const { return tp / expert_tp() * dp * cp; }
  // Context parallelism: every sequence split over cp ranks, in 2·cp chunks of which rank i holds
  // chunks i and 2·cp − 1 − i (so each does the same causal attention work). The cp ranks hold
  // the same parameters: gradients are reduced, and ZeRO shards, over the dp·cp ranks.
  int cp = 1;
  CpComm cp_comm = CpComm::p2p;
  int zero_stage = 0;
  std::int64_t micro_batch_size = 1;
  std::int64_t global_batch_size = 1;
  Schedule schedule = Schedule::one_f_one_b;
  int virtual_stages = 1; // model chunks per pipeline rank (v); > 1 only when interleaved
  Recompute recompute = Recompute::none;
  bool sequence_parallel = false;
  Precision precision = Precision::bf16;
  GradSync grad_sync = GradSync::allreduce;
  // Data-parallel gradient reductions start bucket by bucket while the backward pass runs
  // (PyTorch DDP, FSDP, DeepSpeed, Megatron-LM's --overlap-grad-reduce). false: they start once
  // the rank's backward pass has finished, and the next compute waits for them (Megatron-LM's
  // local DDP before 2023, llm.c before its asynchronous reduction).
  bool overlap_grad_reduce = true;
  // Compression of the data-parallel gradient reduction (grad_compression.hpp), and whether the
  // lossy methods keep what they did not send for the next step (error feedback).
  GradCompression grad_compression;
  bool error_feedback = true;
  // Optimizer steps reduced uncompressed before compression starts: early training is the
  // most sensitive to compression error (PyTorch's PowerSGD start_powerSGD_iter, DGC's
  // warm-up). The simulator predicts the steady state, after it.
  int compression_warmup_steps = 0;
  // The asynchronous parameter server: how many steps a worker may run ahead of the version
  // it computes on (stale synchronous parallel; 0 is the synchronous result), and whether each
  // step takes exactly the oldest version allowed (a fixed arrival order, for tests) instead of
  // the newest that has arrived.
  int max_staleness = 1;
  bool ps_deterministic = false;
  // Dedicated server processes for a parameter server (0: every data-parallel rank serves one
  // shard beside its work). With N > 0 the parameters are sharded over N extra processes, one
  // per host outside the plan's GPUs, launched after the workers (ranks world_size() ..
  // world_size() + N − 1); they hold the optimizer state and apply it, the workers only compute.
  int parameter_servers = 0;
  // Uneven data parallelism (heterogeneous clusters): micro-batches of each data-parallel
  // replica per step, in replica order, adding up to global / micro_batch_size. Empty: every
  // replica takes global / (dp · micro_batch_size). Gradients are summed as always, so each
  // sample weighs the same whatever replica computes it.
  std::vector<std::int64_t> dp_shares;
  // pp × virtual_stages ranges in model order; chunk c runs on pipeline rank c % pp. Empty: the
  // planner's balanced partition.
  std::vector<StageRange> stages;
  // The software stack (zoo name or the name in a stack file) the plan was made for; empty when
  // none was recorded. Tools that take --stack use it when the flag is absent.
  std::string stack;

  int world_size() const { return dp * cp * tp * pp; }
  // Every process the plan runs: the workers and any dedicated parameter servers.
  int process_count() const { return world_size() + parameter_servers; }
  // Shards of a parameter server's state: the dedicated servers, else every data-parallel rank.
  int server_shards() const { return parameter_servers > 0 ? parameter_servers : dp_cp(); }
  // Whether steps run the asynchronous server's engine with its own round trip (a data-parallel
  // group of one with co-located servers is plain training).
  bool async_ps() const {
    return grad_sync == GradSync::parameter_server_async && (dp_cp() > 1 || parameter_servers > 0);
  }
  // Ranks holding the same parameters, over which gradients are reduced and ZeRO shards: the
  // data-parallel ranks with their context-parallel ranks (Megatron-Core's DP-CP group).
  int dp_cp() const { return dp * cp; }
  // Micro-batches per data-parallel replica per iteration (m; with dp_shares the largest).
  std::int64_t num_microbatches() const {
    if (!dp_shares.empty()) {
      std::int64_t most = 0;
      for (const std::int64_t s : dp_shares) {
        most = most > s ? most : s;
      }
      return most;
    }
    return global_batch_size / (dp * micro_batch_size);
  }
  // Micro-batches of replica d, and the first of them in the step's global order.
  std::int64_t microbatches_of(int d) const {
    return dp_shares.empty() ? global_batch_size / (dp * micro_batch_size)
                             : dp_shares[static_cast<std::size_t>(d)];
  }
  std::int64_t first_microbatch_of(int d) const {
    std::int64_t first = 0;
    for (int i = 0; i < d; ++i) {
      first += microbatches_of(i);
    }
    return first;
  }

  bool operator==(const Plan&) const = default;
};

struct RankCoords {
  int dp = 0;
  int pp = 0;
  int tp = 0;
  int cp = 0;
  bool operator==(const RankCoords&) const = default;
};

struct DeviceSlot {
  int node = 0;
  int device = 0;
  bool operator==(const DeviceSlot&) const = default;
};

RankCoords rank_coords(const Plan& plan, int rank);
int rank_of(const Plan& plan, RankCoords coords);
DeviceSlot rank_device(int rank, int devices_per_node);

// Ranks of the groups `rank` belongs to, in group order.
std::vector<int> tp_group(const Plan& plan, int rank);
std::vector<int> dp_group(const Plan& plan, int rank);
std::vector<int> pp_group(const Plan& plan, int rank);
std::vector<int> cp_group(const Plan& plan, int rank);
// The dp·cp ranks holding the rank's parameters, in rank order.
std::vector<int> dp_cp_group(const Plan& plan, int rank);
// Expert parallelism: the ep consecutive ranks of the dp·cp group splitting the experts (expert
// rank = (dp·cp + cp) % ep; Megatron-Core carves EP out of DP×CP), and the dp·cp / ep ranks
// holding the same experts, in rank order.
std::vector<int> ep_group(const Plan& plan, int rank);
// The rank's index among the ranks its stage's experts are spread over (its EP rank is this
// mod ep, its EP group this / ep).
int expert_rank_index(const Plan& plan, int rank);
std::vector<int> expert_dp_group(const Plan& plan, int rank);

// Replica d's view of a plan with dp_shares: the same plan with every replica taking d's
// micro-batches (global_batch_size = dp · micro · its share) and no shares; `plan` itself
// without shares. Programs, schedules and per-replica costs are built from it.
Plan replica_plan(const Plan& plan, int d);

// Which pipeline rank runs stage chunk c (chunks are assigned round-robin for interleaving).
inline int chunk_pp_rank(const Plan& plan, int chunk) {
  return chunk % plan.pp;
}

// "dp2 tp2 pp1 z1 B4 1f1b rc=none sp=off fp32": a plan in one line, for tables and pictures.
std::string plan_label(const Plan& plan);

// Layer units per chunk as even as possible, earlier chunks taking the remainder.
std::vector<StageRange> stages_even(int num_units, int num_chunks);

} // namespace parallax
