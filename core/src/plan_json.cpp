#include "parallax/core/plan_json.hpp"

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <array>

namespace parallax {

namespace {

std::vector<StageRange> stages_from_json(const JsonReader& root) {
  std::vector<StageRange> out;
  JsonReader list = root.array("stages");
  int expected_first = 0;
  for (std::size_t i = 0; i < list.array_size(); ++i) {
    JsonReader item = list.element(i);
    const Json& v = item.value();
    if (!v.is_array() || v.size() != 2 || !v[0].is_number_integer() || !v[1].is_number_integer()) {
      item.fail_here("a [first, last) pair of integers", json_describe(v));
    }
    auto first = v[0].get<std::int64_t>();
    auto last = v[1].get<std::int64_t>();
    if (first != expected_first) {
      item.fail_here(
          fmt::format("a range starting at {} (ranges are contiguous from 0)", expected_first),
          json_describe(v));
    }
    if (last <= first || last > (1 << 24)) {
      item.fail_here("a non-empty range (last > first)", json_describe(v));
    }
    out.emplace_back(static_cast<int>(first), static_cast<int>(last));
    expected_first = static_cast<int>(last);
  }
  return out;
}

} // namespace

Plan plan_from_json(const Json& doc, const std::string& source) {
  JsonReader r(doc, source);
  r.reject_unknown({"dp",
                    "tp",
                    "pp",
                    "ep",
                    "etp",
                    "cp",
                    "cp_comm",
                    "zero_stage",
                    "micro_batch_size",
                    "global_batch_size",
                    "schedule",
                    "virtual_stages",
                    "recompute",
                    "sequence_parallel",
                    "precision",
                    "grad_sync",
                    "overlap_grad_reduce",
                    "grad_compression",
                    "error_feedback",
                    "compression_warmup_steps",
                    "max_staleness",
                    "ps_deterministic",
                    "parameter_servers",
                    "dp_shares",
                    "stages",
                    "stack"});
  constexpr std::int64_t kMaxDegree = 1 << 20;
  Plan p;
  p.dp = static_cast<int>(r.integer("dp", 1, kMaxDegree));
  p.tp = static_cast<int>(r.integer("tp", 1, kMaxDegree));
  p.pp = static_cast<int>(r.integer("pp", 1, kMaxDegree));
  p.ep = static_cast<int>(r.integer_or("ep", 1, 1, kMaxDegree));   // the rule: ep_problem
  p.cp = static_cast<int>(r.integer_or("cp", 1, 1, kMaxDegree));   // the rule: cp_problem
  p.etp = static_cast<int>(r.integer_or("etp", 0, 0, kMaxDegree)); // 0: tp; the rule: etp_problem
  p.cp_comm = *enum_from_name<CpComm>(kCpCommNames, r.choice_or("cp_comm", kCpCommNames, "p2p"));
  p.zero_stage = static_cast<int>(r.integer_or("zero_stage", 0, 0, 3));
  p.micro_batch_size = r.integer_or("micro_batch_size", 1, 1, 1 << 20);
  p.global_batch_size = r.integer("global_batch_size", 1, std::int64_t{1} << 40);
  p.schedule =
      *enum_from_name<Schedule>(kScheduleNames, r.choice_or("schedule", kScheduleNames, "1f1b"));
  p.virtual_stages = static_cast<int>(r.integer_or("virtual_stages", 1, 1, 1024));
  p.recompute = *enum_from_name<Recompute>(kRecomputeNames,
                                           r.choice_or("recompute", kRecomputeNames, "none"));
  p.sequence_parallel = r.boolean_or("sequence_parallel", false);
  std::string precision =
      r.choice_or("precision", std::span<const std::string_view>(kPrecisionNames), "bf16");
  p.precision = *precision_parse(precision);
  p.grad_sync = *enum_from_name<GradSync>(kGradSyncNames,
                                          r.choice_or("grad_sync", kGradSyncNames, "allreduce"));
  p.overlap_grad_reduce = r.boolean_or("overlap_grad_reduce", true);
  if (r.has("grad_compression")) {
    const std::string text = r.string("grad_compression");
    std::string why;
    const auto c = grad_compression_parse(text, &why);
    if (!c) {
      r.fail("grad_compression", why, "\"" + text + "\"");
    }
    p.grad_compression = *c;
  }
  p.error_feedback = r.boolean_or("error_feedback", true);
  p.compression_warmup_steps =
      static_cast<int>(r.integer_or("compression_warmup_steps", 0, 0, 1 << 30));
  p.max_staleness = static_cast<int>(r.integer_or("max_staleness", 1, 0, 1 << 20));
  p.ps_deterministic = r.boolean_or("ps_deterministic", false);
  p.parameter_servers = static_cast<int>(r.integer_or("parameter_servers", 0, 0, 1 << 16));
  p.stack = r.string_or("stack", "");

  if (static_cast<std::int64_t>(p.dp) * p.cp * p.tp * p.pp > kMaxDegree) {
    r.fail("dp", "dp·cp·tp·pp <= 1048576", fmt::format("{}·{}·{}·{}", p.dp, p.cp, p.tp, p.pp));
  }
  if (r.has("dp_shares")) {
    JsonReader list = r.array("dp_shares");
    std::int64_t sum = 0;
    for (std::size_t i = 0; i < list.array_size(); ++i) {
      const Json& v = list.element(i).value();
      if (!v.is_number_integer() || v.get<std::int64_t>() < 1 ||
          v.get<std::int64_t>() > (1 << 30)) {
        list.element(i).fail_here("a micro-batch count >= 1", json_describe(v));
      }
      p.dp_shares.push_back(v.get<std::int64_t>());
      sum += p.dp_shares.back();
    }
    if (static_cast<int>(p.dp_shares.size()) != p.dp) {
      r.fail("dp_shares", fmt::format("one micro-batch count per data-parallel replica ({})", p.dp),
             fmt::format("{} counts", p.dp_shares.size()));
    }
    if (sum * p.micro_batch_size != p.global_batch_size) {
      r.fail("dp_shares",
             fmt::format("counts adding up to global_batch_size / micro_batch_size = {}",
                         static_cast<double>(p.global_batch_size) /
                             static_cast<double>(p.micro_batch_size)),
             fmt::format("{}", sum));
    }
  } else if (p.global_batch_size % (static_cast<std::int64_t>(p.dp) * p.micro_batch_size) != 0) {
    r.fail("global_batch_size",
           fmt::format("a multiple of dp × micro_batch_size = {}", p.dp * p.micro_batch_size),
           std::to_string(p.global_batch_size));
  }
  if (p.schedule == Schedule::interleaved && p.virtual_stages < 2) {
    r.fail("virtual_stages", "an integer >= 2 with the interleaved schedule",
           std::to_string(p.virtual_stages));
  }
  if (p.schedule != Schedule::interleaved && p.virtual_stages != 1) {
    r.fail("virtual_stages",
           fmt::format("1 with schedule \"{}\" (only \"interleaved\" uses virtual stages)",
                       schedule_name(p.schedule)),
           std::to_string(p.virtual_stages));
  }
  if (p.schedule == Schedule::interleaved && p.pp < 2) {
    r.fail("schedule", "\"gpipe\" or \"1f1b\" when pp = 1 (interleaving needs pp >= 2)",
           "\"interleaved\"");
  }
  if (r.has("stages")) {
    p.stages = stages_from_json(r);
    std::size_t chunks =
        static_cast<std::size_t>(p.pp) * static_cast<std::size_t>(p.virtual_stages);
    if (p.stages.size() != chunks) {
      r.fail("stages", fmt::format("pp × virtual_stages = {} ranges", chunks),
             fmt::format("{} ranges", p.stages.size()));
    }
  }
  return p;
}

Json plan_to_json(const Plan& p) {
  Json doc = {{"dp", p.dp},
              {"tp", p.tp},
              {"pp", p.pp},
              {"zero_stage", p.zero_stage},
              {"micro_batch_size", p.micro_batch_size},
              {"global_batch_size", p.global_batch_size},
              {"schedule", std::string(schedule_name(p.schedule))},
              {"virtual_stages", p.virtual_stages},
              {"recompute", std::string(recompute_name(p.recompute))},
              {"sequence_parallel", p.sequence_parallel},
              {"precision", std::string(precision_name(p.precision))},
              {"grad_sync", std::string(grad_sync_name(p.grad_sync))}};
  if (p.ep > 1) { // written only when it departs from the default
    doc["ep"] = p.ep;
  }
  if (p.etp > 0 && p.etp != p.tp) {
    doc["etp"] = p.etp;
  }
  if (p.cp > 1) {
    doc["cp"] = p.cp;
    doc["cp_comm"] = std::string(cp_comm_name(p.cp_comm));
  }
  if (!p.overlap_grad_reduce) { // written only when it departs from the default
    doc["overlap_grad_reduce"] = false;
  }
  if (p.grad_compression.enabled()) {
    doc["grad_compression"] = grad_compression_name(p.grad_compression);
  }
  if (!p.error_feedback) {
    doc["error_feedback"] = false;
  }
  if (p.compression_warmup_steps > 0) {
    doc["compression_warmup_steps"] = p.compression_warmup_steps;
  }
  if (p.grad_sync == GradSync::parameter_server_async) {
    doc["max_staleness"] = p.max_staleness;
    if (p.ps_deterministic) {
      doc["ps_deterministic"] = true;
    }
  }
  if (p.parameter_servers > 0) {
    doc["parameter_servers"] = p.parameter_servers;
  }
  if (!p.dp_shares.empty()) {
    doc["dp_shares"] = p.dp_shares;
  }
  if (!p.stack.empty()) {
    doc["stack"] = p.stack;
  }
  if (!p.stages.empty()) {
    Json stages = Json::array();
    for (const auto& [first, last] : p.stages) {
      stages.push_back({first, last});
    }
    doc["stages"] = stages;
  }
  return doc;
}

std::optional<PlanProblem> tp_problem(const GraphInfo& info, int tp) {
  if (info.num_attention_heads % tp != 0) {
    return PlanProblem{
        "/tp", fmt::format("a divisor of the model's {} attention heads", info.num_attention_heads),
        std::to_string(tp), ""};
  }
  if (info.num_kv_heads % tp != 0) {
    return PlanProblem{
        "/tp", fmt::format("a divisor of the model's {} key/value heads", info.num_kv_heads),
        std::to_string(tp), ""};
  }
  if (info.ffn_hidden_size > 0 && info.ffn_hidden_size % tp != 0) {
    return PlanProblem{"/tp",
                       fmt::format("a divisor of the model's MLP width {}", info.ffn_hidden_size),
                       std::to_string(tp), ""};
  }
  if (info.expert_ffn_hidden_size > 0 && info.expert_ffn_hidden_size % tp != 0) {
    return PlanProblem{
        "/tp",
        fmt::format("a divisor of the model's expert MLP width {}", info.expert_ffn_hidden_size),
        std::to_string(tp), ""};
  }
  return std::nullopt;
}

std::optional<PlanProblem> ep_problem(const GraphInfo& info, int dp_cp, int ep) {
  if (ep == 1) {
    return std::nullopt;
  }
  if (info.num_experts == 0) {
    return PlanProblem{"/ep", "1 (the model has no mixture-of-experts layers)", std::to_string(ep),
                       ""};
  }
  if (dp_cp % ep != 0) {
    return PlanProblem{"/ep",
                       fmt::format("a divisor of the {} ranks experts are spread over (dp·cp, "
                                   "or tp·dp·cp with etp 1)",
                                   dp_cp),
                       std::to_string(ep), ""};
  }
  if (info.num_experts % ep != 0) {
    return PlanProblem{"/ep", fmt::format("a divisor of the model's {} experts", info.num_experts),
                       std::to_string(ep), ""};
  }
  return std::nullopt;
}

std::optional<PlanProblem> cp_problem(const GraphInfo& info, int cp) {
  if (cp == 1) {
    return std::nullopt;
  }
  if (info.seq_length % (2 * static_cast<std::int64_t>(cp)) != 0) {
    return PlanProblem{
        "/cp",
        fmt::format("a cp whose 2·cp chunks divide the sequence of {} tokens", info.seq_length),
        std::to_string(cp), "causal load balancing splits it into 2·cp chunks"};
  }
  return std::nullopt;
}

// Where the executor and the cost model compress: a data-parallel all-reduce of whole
// gradients (ZeRO shards, a parameter server's reduce to its root and the expert-data-parallel
// groups of expert parallelism are left uncompressed, so they are refused rather than ignored).
std::optional<PlanProblem> compression_problem(const Plan& p) {
  if (!p.grad_compression.enabled()) {
    return std::nullopt;
  }
  const std::string found = "\"" + grad_compression_name(p.grad_compression) + "\"";
  if (p.zero_stage != 0) {
    return PlanProblem{"/grad_compression",
                       "\"none\" with zero_stage 1-3 (compression applies "
                       "to the all-reduce of whole gradients)",
                       found + " with zero_stage " + std::to_string(p.zero_stage),
                       "set zero_stage 0 or drop the compression"};
  }
  if (is_parameter_server(p.grad_sync)) {
    return PlanProblem{"/grad_compression", "\"none\" with a parameter server", found,
                       "use grad_sync allreduce, tree or hierarchical"};
  }
  if (p.ep > 1) {
    return PlanProblem{"/grad_compression", "\"none\" with expert parallelism",
                       found + " with ep " + std::to_string(p.ep), ""};
  }
  return std::nullopt;
}

// Dedicated parameter servers serve pure data parallelism with the whole model on every worker
// (the asynchronous engine runs them; the synchronous server is its k = 0 case).
std::optional<PlanProblem> server_problem(const Plan& p) {
  if (p.parameter_servers == 0) {
    return std::nullopt;
  }
  const std::string found = std::to_string(p.parameter_servers);
  if (!is_parameter_server(p.grad_sync)) {
    return PlanProblem{
        "/parameter_servers",
        "0 unless grad_sync is \"parameter_server\" or \"parameter_server_async\"",
        found + " with grad_sync \"" + std::string(grad_sync_name(p.grad_sync)) + "\"", ""};
  }
  if (p.tp * p.pp * p.cp > 1) {
    return PlanProblem{"/parameter_servers",
                       "0 unless tp = pp = cp = 1 (dedicated servers hold whole-model shards "
                       "for pure data parallelism)",
                       fmt::format("{} with tp {} pp {} cp {}", found, p.tp, p.pp, p.cp),
                       "use parameter_servers 0 (servers co-located with the workers)"};
  }
  if (!p.dp_shares.empty()) {
    return PlanProblem{"/dp_shares", "even shares with dedicated parameter servers",
                       "uneven shares", ""};
  }
  return std::nullopt;
}

std::optional<PlanProblem> plan_problem(const Plan& p, const LayerGraph& graph, int world_size) {
  const GraphInfo& info = graph.info();
  if (p.world_size() != world_size) {
    return PlanProblem{"/dp", fmt::format("dp·cp·tp·pp equal to the GPU count {}", world_size),
                       fmt::format("{}·{}·{}·{} = {}", p.dp, p.cp, p.tp, p.pp, p.world_size()),
                       "change dp, cp, tp or pp, or --gpus"};
  }
  if (auto tp = tp_problem(info, p.tp)) {
    return tp;
  }
  if (p.etp != 0 && p.etp != p.tp && p.etp != 1) {
    return PlanProblem{"/etp", fmt::format("0 or tp = {} (experts split like the MLP) or 1", p.tp),
                       std::to_string(p.etp), ""};
  }
  if (p.expert_tp() != p.tp && info.num_experts == 0) {
    return PlanProblem{"/etp", "0 (the model has no mixture-of-experts layers)",
                       std::to_string(p.etp), ""};
  }
  if (p.expert_tp() != p.tp && !p.sequence_parallel) {
    return PlanProblem{"/etp",
                       "tp with sequence_parallel off (whole experts per TP rank take the "
                       "sequence-parallel share of the tokens)",
                       std::to_string(p.etp), "turn sequence parallelism on"};
  }
  if (auto ep = ep_problem(info, p.expert_ranks(), p.ep)) {
    return ep;
  }
  if (auto cp = cp_problem(info, p.cp)) {
    return cp;
  }
  const int units = graph.num_units();
  const int chunks = p.pp * p.virtual_stages;
  if (chunks > units) {
    return PlanProblem{"/pp", fmt::format("pp × virtual_stages <= the model's {} layers", units),
                       fmt::format("{} × {} = {}", p.pp, p.virtual_stages, chunks), ""};
  }
  if (!p.stages.empty() && p.stages.back().second != units) {
    return PlanProblem{"/stages",
                       fmt::format("ranges that end at the model's layer count {}", units),
                       fmt::format("ranges ending at {}", p.stages.back().second), ""};
  }
  for (int d = 0; d < p.dp && !p.dp_shares.empty(); ++d) {
    if (p.schedule == Schedule::interleaved && p.microbatches_of(d) % p.pp != 0) {
      return PlanProblem{"/dp_shares",
                         fmt::format("micro-batch counts that are multiples of pp = {} for the "
                                     "interleaved schedule",
                                     p.pp),
                         std::to_string(p.microbatches_of(d)), ""};
    }
  }
  if (!p.dp_shares.empty() && p.grad_sync == GradSync::parameter_server_async) {
    return PlanProblem{"/dp_shares", "even shares with the asynchronous parameter server",
                       "uneven shares", ""};
  }
  if (p.schedule == Schedule::interleaved && p.dp_shares.empty() &&
      p.num_microbatches() % p.pp != 0) {
    return PlanProblem{"/global_batch_size",
                       fmt::format("micro-batches per replica (global / (dp·micro) = {}) a "
                                   "multiple of pp = {} for the interleaved schedule",
                                   p.num_microbatches(), p.pp),
                       std::to_string(p.global_batch_size), ""};
  }
  if (p.sequence_parallel && (p.micro_batch_size * info.seq_length / p.cp) % p.tp != 0) {
    return PlanProblem{"/sequence_parallel",
                       fmt::format("micro_batch_size × seq_length / cp divisible by tp = {}", p.tp),
                       "true", ""};
  }
  if (p.grad_sync == GradSync::parameter_server_async && p.tp * p.pp * p.cp > 1) {
    return PlanProblem{"/grad_sync",
                       "\"parameter_server_async\" with tp = pp = cp = 1 (the asynchronous "
                       "server runs pure data parallelism: every worker holds the whole model)",
                       fmt::format("tp {} pp {} cp {}", p.tp, p.pp, p.cp),
                       "use grad_sync parameter_server or an all-reduce"};
  }
  if (is_parameter_server(p.grad_sync) && p.ep > 1) {
    return PlanProblem{"/grad_sync",
                       "\"allreduce\", \"tree\" or \"hierarchical\" with expert parallelism (the "
                       "server holds one copy of every parameter)",
                       "\"parameter_server\" with ep " + std::to_string(p.ep), ""};
  }
  if (is_parameter_server(p.grad_sync) && p.zero_stage != 0 && p.dp_cp() > 1) {
    return PlanProblem{"/grad_sync",
                       "\"allreduce\", \"tree\" or \"hierarchical\" with ZeRO (a parameter "
                       "server holds the whole optimizer state)",
                       "\"parameter_server\" with zero_stage " + std::to_string(p.zero_stage), ""};
  }
  if (auto c = compression_problem(p)) {
    return c;
  }
  return server_problem(p);
}

void plan_validate(const Plan& p, const LayerGraph& graph, int world_size,
                   const std::string& source) {
  if (auto e = plan_problem(p, graph, world_size)) {
    throw InputError(source, e->field, e->expected, e->found, e->hint);
  }
}

} // namespace parallax
