#include "parallax/core/step_program.hpp"

#include "parallax/core/enum_names.hpp"
#include "parallax/core/error.hpp"
#include "parallax/core/pipeline_schedule.hpp"

#include <fmt/format.h>

#include <array>
#include <utility>

namespace parallax {

namespace {

constexpr std::array<std::string_view, 11> kStepOpKindNames = {
    "gather", "forward",        "recompute", "backward",  "send",   "recv",
    "reduce", "embedding_sync", "sp_sync",   "optimizer", "publish"};

std::string_view collective_label(StepCollective c) {
  switch (c) {
  case StepCollective::all_reduce:
    return "all-reduce";
  case StepCollective::reduce_scatter:
    return "reduce-scatter";
  case StepCollective::reduce_to_root:
    return "reduce";
  case StepCollective::all_gather:
    return "all-gather";
  case StepCollective::broadcast:
    return "broadcast";
  case StepCollective::none:
    break;
  }
  return "sync";
}

class ProgramBuilder {
public:
  ProgramBuilder(const Plan& plan, const StepShape& shape, int rank)
      : plan_(plan), shape_(shape), last_mb_(static_cast<int>(plan.num_microbatches()) - 1),
        dp_(data_parallel_comm(plan, shape.reshard_after_forward)) {
    p_.rank = rank;
    p_.pp_rank = rank_coords(plan, rank).pp;
    p_.stages =
        plan.stages.empty() ? stages_even(shape.units, plan.pp * plan.virtual_stages) : plan.stages;
    PARALLAX_CHECK(static_cast<int>(p_.stages.size()) == plan.pp * plan.virtual_stages,
                   "step program: one stage range per model chunk");
  }

  StepProgram build() {
    for (const PipelineOp& op : pipeline_schedule(plan_, p_.pp_rank)) {
      if (op.forward) {
        forward(op.chunk, op.micro_batch);
      } else {
        backward(op.chunk, op.micro_batch);
      }
      p_.phases.push_back({.forward = op.forward,
                           .chunk = op.chunk,
                           .micro_batch = op.micro_batch,
                           .last_op = static_cast<int>(p_.ops.size()) - 1});
    }
    flush_deferred();
    finish();
    return std::move(p_);
  }

private:
  int add(StepOp op) {
    p_.ops.push_back(std::move(op));
    const int id = static_cast<int>(p_.ops.size()) - 1;
    if (p_.ops.back().compute()) {
      computes_.push_back(id);
    }
    return id;
  }

  bool has_params(int unit) const {
    return shape_.unit_has_params.empty() || shape_.unit_has_params[static_cast<std::size_t>(unit)];
  }
  int chunks() const { return static_cast<int>(p_.stages.size()); }

  // ZeRO-3: prefetched one unit ahead, so it waits only for the compute two compute ops back.
  int gather(int unit, int chunk, int mb, bool in_backward) {
    StepOp g{.kind = StepOpKind::gather,
             .unit = unit,
             .chunk = chunk,
             .micro_batch = mb,
             .collective = StepCollective::all_gather,
             .async = true,
             .in_backward = in_backward};
    if (computes_.size() >= 2) {
      g.after.push_back(computes_[computes_.size() - 2]);
    }
    return add(std::move(g));
  }

  static std::vector<int> deps(std::initializer_list<int> ids) {
    std::vector<int> out;
    for (int id : ids) {
      if (id >= 0) {
        out.push_back(id);
      }
    }
    return out;
  }

  void forward(int chunk, int mb) {
    const auto [first, last] = p_.stages[static_cast<std::size_t>(chunk)];
    const int recv = chunk > 0 ? add({.kind = StepOpKind::recv,
                                      .unit = first,
                                      .chunk = chunk,
                                      .micro_batch = mb,
                                      .peer_chunk = chunk - 1})
                               : -1;
    for (int u = first; u < last; ++u) {
      const int g = dp_.gathers_per_micro_batch > 0 ? gather(u, chunk, mb, false) : -1;
      add({.kind = StepOpKind::forward,
           .unit = u,
           .chunk = chunk,
           .micro_batch = mb,
           .after = deps({g, u == first ? recv : -1})});
    }
    if (chunk + 1 < chunks()) {
      add({.kind = StepOpKind::send,
           .unit = last - 1,
           .chunk = chunk,
           .micro_batch = mb,
           .peer_chunk = chunk + 1});
    }
  }

  void backward(int chunk, int mb) {
    const auto [first, last] = p_.stages[static_cast<std::size_t>(chunk)];
    const bool reduce_now = dp_.per_micro_batch || mb == last_mb_;
    const int recv = chunk + 1 < chunks() ? add({.kind = StepOpKind::recv,
                                                 .unit = last - 1,
                                                 .chunk = chunk,
                                                 .micro_batch = mb,
                                                 .peer_chunk = chunk + 1})
                                          : -1;
    for (int u = last - 1; u >= first; --u) {
      const int g = dp_.gathers_per_micro_batch > 1 ? gather(u, chunk, mb, true) : -1;
      const int r = u == last - 1 ? recv : -1;
      int rc = -1;
      if (plan_.recompute == Recompute::full) {
        rc = add({.kind = StepOpKind::recompute,
                  .unit = u,
                  .chunk = chunk,
                  .micro_batch = mb,
                  .after = deps({g, r})});
      }
      const int b = add({.kind = StepOpKind::backward,
                         .unit = u,
                         .chunk = chunk,
                         .micro_batch = mb,
                         .after = rc >= 0 ? std::vector<int>{} : deps({g, r})});
      if (dp_.gradients != StepCollective::none && has_params(u) && reduce_now) {
        if (plan_.overlap_grad_reduce) {
          reduce(u, chunk, mb, true, b);
        } else {
          deferred_.push_back({u, chunk, mb});
        }
      }
    }
    if (chunk > 0) {
      add({.kind = StepOpKind::send,
           .unit = first,
           .chunk = chunk,
           .micro_batch = mb,
           .peer_chunk = chunk - 1});
    }
    if (dp_.per_micro_batch) {
      flush_deferred();
    }
  }

  void reduce(int unit, int chunk, int mb, bool async, int after) {
    reductions_.push_back(add({.kind = StepOpKind::reduce,
                               .unit = unit,
                               .chunk = chunk,
                               .micro_batch = mb,
                               .collective = dp_.gradients,
                               .async = async,
                               .after = deps({after})}));
  }

  // Reductions of a stack that does not overlap them: launched after the backward pass, in
  // the order their backwards ran, holding the rank.
  void flush_deferred() {
    for (const Deferred& d : deferred_) {
      reduce(d.unit, d.chunk, d.mb, false, -1);
    }
    deferred_.clear();
  }

  void finish() {
    std::vector<int> before_optimizer = reductions_;
    const bool first_stage = p_.pp_rank == 0;
    const bool last_stage = p_.pp_rank == plan_.pp - 1;
    if (shape_.tied_embeddings && plan_.pp > 1 && (first_stage || last_stage)) {
      before_optimizer.push_back(add({.kind = StepOpKind::embedding_sync,
                                      .unit = first_stage ? 0 : shape_.units - 1,
                                      .collective = StepCollective::all_reduce,
                                      .after = reductions_}));
    }
    if (plan_.sequence_parallel && plan_.tp > 1) {
      before_optimizer.push_back(add({.kind = StepOpKind::sp_sync,
                                      .collective = StepCollective::all_reduce,
                                      .after = reductions_}));
    }
    const int opt = add({.kind = StepOpKind::optimizer, .after = before_optimizer});
    if (dp_.publish != StepCollective::none) {
      add({.kind = StepOpKind::publish, .collective = dp_.publish, .async = true, .after = {opt}});
    }
  }

  struct Deferred {
    int unit, chunk, mb;
  };

  const Plan& plan_;
  const StepShape& shape_;
  int last_mb_;
  DataParallelComm dp_;
  StepProgram p_;
  std::vector<int> computes_;
  std::vector<int> reductions_;
  std::vector<Deferred> deferred_;
};

} // namespace

std::string_view step_op_kind_name(StepOpKind k) {
  return enum_name(kStepOpKindNames, k);
}

Category StepOp::category() const {
  switch (kind) {
  case StepOpKind::forward:
    return Category::forward;
  case StepOpKind::recompute:
    return Category::recompute;
  case StepOpKind::backward:
    return Category::backward;
  case StepOpKind::optimizer:
    return Category::optimizer;
  case StepOpKind::send:
  case StepOpKind::recv:
    return Category::pp_comm;
  case StepOpKind::sp_sync:
    return Category::tp_comm;
  case StepOpKind::gather:
  case StepOpKind::reduce:
  case StepOpKind::embedding_sync:
  case StepOpKind::publish:
    return Category::dp_comm;
  }
  return Category::forward;
}

Stream StepOp::stream() const {
  switch (category()) {
  case Category::pp_comm:
    return Stream::pp_comm;
  case Category::tp_comm:
    return Stream::tp_comm;
  case Category::dp_comm:
    return Stream::dp_comm;
  default:
    return Stream::compute;
  }
}

std::string StepOp::name() const {
  switch (kind) {
  case StepOpKind::gather:
    return fmt::format("gather{} u{} mb{}", in_backward ? " bwd" : "", unit, micro_batch);
  case StepOpKind::forward:
  case StepOpKind::recompute:
  case StepOpKind::backward:
    return fmt::format("{} u{} mb{}", step_op_kind_name(kind), unit, micro_batch);
  case StepOpKind::send:
  case StepOpKind::recv:
    return fmt::format("{} {} c{}>c{} mb{}", step_op_kind_name(kind), activation() ? "act" : "grad",
                       kind == StepOpKind::send ? chunk : peer_chunk,
                       kind == StepOpKind::send ? peer_chunk : chunk, micro_batch);
  case StepOpKind::reduce:
    return micro_batch >= 0 && collective == StepCollective::reduce_scatter
               ? fmt::format("{} u{} mb{}", collective_label(collective), unit, micro_batch)
               : fmt::format("{} u{}", collective_label(collective), unit);
  case StepOpKind::embedding_sync:
    return "embedding grad sync";
  case StepOpKind::sp_sync:
    return "sp grad sync";
  case StepOpKind::optimizer:
    return "optimizer";
  case StepOpKind::publish:
    return fmt::format("{} params", collective_label(collective));
  }
  return "op";
}

DataParallelComm data_parallel_comm(const Plan& plan, bool reshard_after_forward) {
  if (plan.dp_cp() <= 1) {
    return {};
  }
  const bool server = is_parameter_server(plan.grad_sync);
  switch (plan.zero_stage) {
  case 0:
    return {.gradients = server ? StepCollective::reduce_to_root : StepCollective::all_reduce,
            .publish = server ? StepCollective::broadcast : StepCollective::none};
  case 1:
    return {.gradients = StepCollective::reduce_scatter, .publish = StepCollective::all_gather};
  case 2:
    return {.gradients = StepCollective::reduce_scatter,
            .per_micro_batch = true,
            .publish = StepCollective::all_gather};
  default:
    return {.gradients = StepCollective::reduce_scatter,
            .per_micro_batch = true,
            .gathers_per_micro_batch = reshard_after_forward ? 2 : 1};
  }
}

StepProgram step_program(const Plan& plan, const StepShape& shape, int rank) {
  PARALLAX_CHECK(shape.units > 0, "step program: a model with no units");
  PARALLAX_CHECK(shape.unit_has_params.empty() ||
                     static_cast<int>(shape.unit_has_params.size()) == shape.units,
                 "step program: one has-params flag per unit");
  return ProgramBuilder(plan, shape, rank).build();
}

} // namespace parallax
