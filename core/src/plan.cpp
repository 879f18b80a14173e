#include "parallax/core/plan.hpp"

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <array>

namespace parallax {

std::string_view schedule_name(Schedule s) {
  return enum_name(kScheduleNames, s);
}
std::string_view recompute_name(Recompute r) {
  return enum_name(kRecomputeNames, r);
}
std::string_view grad_sync_name(GradSync g) {
  return enum_name(kGradSyncNames, g);
}
std::string_view cp_comm_name(CpComm c) {
  return enum_name(kCpCommNames, c);
}

RankCoords rank_coords(const Plan& plan, int rank) {
  PARALLAX_CHECK(rank >= 0 && rank < plan.world_size(), "rank out of range");
  RankCoords c;
  c.tp = rank % plan.tp;
  c.cp = (rank / plan.tp) % plan.cp;
  c.dp = (rank / (plan.tp * plan.cp)) % plan.dp;
  c.pp = rank / (plan.tp * plan.cp * plan.dp);
  return c;
}

int rank_of(const Plan& plan, RankCoords c) {
  PARALLAX_CHECK(c.tp >= 0 && c.tp < plan.tp && c.dp >= 0 && c.dp < plan.dp && c.pp >= 0 &&
                     c.pp < plan.pp && c.cp >= 0 && c.cp < plan.cp,
                 "coordinates out of range");
  return c.tp + plan.tp * (c.cp + plan.cp * (c.dp + plan.dp * c.pp));
}

DeviceSlot rank_device(int rank, int devices_per_node) {
  PARALLAX_CHECK(devices_per_node > 0, "devices_per_node must be positive");
  return {rank / devices_per_node, rank % devices_per_node};
}

std::vector<int> tp_group(const Plan& plan, int rank) {
  RankCoords c = rank_coords(plan, rank);
  std::vector<int> out;
  for (int i = 0; i < plan.tp; ++i) {
    out.push_back(rank_of(plan, {c.dp, c.pp, i, c.cp}));
  }
  return out;
}

std::vector<int> dp_group(const Plan& plan, int rank) {
  RankCoords c = rank_coords(plan, rank);
  std::vector<int> out;
  for (int i = 0; i < plan.dp; ++i) {
    out.push_back(rank_of(plan, {i, c.pp, c.tp, c.cp}));
  }
  return out;
}

std::vector<int> cp_group(const Plan& plan, int rank) {
  RankCoords c = rank_coords(plan, rank);
  std::vector<int> out;
  for (int i = 0; i < plan.cp; ++i) {
    out.push_back(rank_of(plan, {c.dp, c.pp, c.tp, i}));
  }
  return out;
}

std::vector<int> dp_cp_group(const Plan& plan, int rank) {
  RankCoords c = rank_coords(plan, rank);
  std::vector<int> out;
  for (int d = 0; d < plan.dp; ++d) {
    for (int i = 0; i < plan.cp; ++i) {
      out.push_back(rank_of(plan, {d, c.pp, c.tp, i}));
    }
  }
  return out;
}

std::vector<int> pp_group(const Plan& plan, int rank) {
  RankCoords c = rank_coords(plan, rank);
  std::vector<int> out;
  for (int i = 0; i < plan.pp; ++i) {
    out.push_back(rank_of(plan, {c.dp, i, c.tp, c.cp}));
  }
  return out;
}

namespace {

// The ranks the expert-parallel grid is carved from, in rank order, and this rank's index
// among them: its dp·cp replicas (experts split over TP), or every rank of its pipeline stage
// (whole experts per TP rank: expert_tp 1).
std::pair<std::vector<int>, int> expert_ranks_of(const Plan& plan, int rank) {
  const RankCoords c = rank_coords(plan, rank);
  if (plan.expert_tp() == plan.tp) {
    return {dp_cp_group(plan, rank), c.dp * plan.cp + c.cp};
  }
  const int stage = plan.tp * plan.cp * plan.dp;
  std::vector<int> out(static_cast<std::size_t>(stage));
  for (int i = 0; i < stage; ++i) {
    out[static_cast<std::size_t>(i)] = c.pp * stage + i;
  }
  return {out, rank - c.pp * stage};
}

} // namespace

int expert_rank_index(const Plan& plan, int rank) {
  return expert_ranks_of(plan, rank).second;
}

std::vector<int> ep_group(const Plan& plan, int rank) {
  const auto [ranks, me] = expert_ranks_of(plan, rank);
  const int first = me - me % plan.ep;
  return {ranks.begin() + first, ranks.begin() + first + plan.ep};
}

std::vector<int> expert_dp_group(const Plan& plan, int rank) {
  const auto [ranks, me] = expert_ranks_of(plan, rank);
  std::vector<int> out;
  for (int i = me % plan.ep; i < static_cast<int>(ranks.size()); i += plan.ep) {
    out.push_back(ranks[static_cast<std::size_t>(i)]);
  }
  return out;
}

std::vector<StageRange> stages_even(int num_units, int num_chunks) {
  PARALLAX_CHECK(num_chunks > 0 && num_units >= num_chunks, "need at least one unit per chunk");
  std::vector<StageRange> out;
  int first = 0;
  for (int c = 0; c < num_chunks; ++c) {
    int size = num_units / num_chunks + (c < num_units % num_chunks ? 1 : 0);
    out.emplace_back(first, first + size);
    first += size;
  }
  return out;
}

Plan replica_plan(const Plan& plan, int d) {
  Plan out = plan;
  if (!plan.dp_shares.empty()) {
    out.global_batch_size = plan.microbatches_of(d) * plan.micro_batch_size * plan.dp;
    out.dp_shares.clear();
  }
  return out;
}

std::string plan_label(const Plan& p) {
  std::string sched = std::string(schedule_name(p.schedule));
  if (p.schedule == Schedule::interleaved) {
    sched += fmt::format("(v={})", p.virtual_stages);
  }
  std::string ep = p.ep > 1 ? fmt::format(" ep{}", p.ep) : "";
  if (p.expert_tp() != p.tp) {
    ep += fmt::format(" etp{}", p.expert_tp());
  }
  if (p.cp > 1) {
    ep += fmt::format(" cp{}{}", p.cp, p.cp_comm == CpComm::all_gather ? "(ag)" : "");
  }
  std::string gc;
  if (p.grad_sync == GradSync::parameter_server_async) {
    gc += fmt::format(" ps-async(k={}{})", p.max_staleness, p.ps_deterministic ? ",det" : "");
  } else if (p.grad_sync != GradSync::allreduce) {
    gc += fmt::format(" {}", grad_sync_name(p.grad_sync));
  }
  if (p.parameter_servers > 0) {
    gc += fmt::format(" servers={}", p.parameter_servers);
  }
  if (!p.dp_shares.empty()) {
    gc += " shares=";
    for (std::size_t i = 0; i < p.dp_shares.size(); ++i) {
      gc += fmt::format("{}{}", i > 0 ? ":" : "", p.dp_shares[i]);
    }
  }
  if (p.grad_compression.enabled()) {
    gc += " gc=" + grad_compression_name(p.grad_compression) +
          (p.grad_compression.lossy() && !p.error_feedback ? "(no-ef)" : "");
  }
  return fmt::format("dp{}{} tp{} pp{} z{} B{} {} rc={} sp={} {}{}", p.dp, ep, p.tp, p.pp,
                     p.zero_stage, p.micro_batch_size, sched, recompute_name(p.recompute),
                     p.sequence_parallel ? "on" : "off", precision_name(p.precision), gc);
}

} // namespace parallax
