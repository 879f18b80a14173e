#include "parallax/core/stack_json.hpp"

#include "parallax/core/enum_names.hpp"

#include <fmt/format.h>

namespace parallax {

namespace {

constexpr double kMaxBytes = 64.0 * (1ULL << 30); // no runtime term larger than 64 GiB

double fraction_or(const JsonReader& r, std::string_view key, double fallback, double max = 1.0) {
  const double v = r.non_negative_or(key, fallback);
  if (v > max) {
    r.fail(key, fmt::format("a fraction in [0, {}]", max), fmt::format("{}", v));
  }
  return v;
}

double bytes_or(const JsonReader& r, std::string_view key, double fallback) {
  const double v = r.non_negative_or(key, fallback);
  if (v > kMaxBytes) {
    r.fail(key, "bytes in [0, 64 GiB]", fmt::format("{}", v));
  }
  return v;
}

template <class Enum, std::size_t N>
Enum enum_or(const JsonReader& r, std::string_view key,
             const std::array<std::string_view, N>& names, Enum fallback) {
  return *enum_from_name<Enum>(names, r.choice_or(key, std::span<const std::string_view>(names),
                                                  std::string(enum_name(names, fallback))));
}

} // namespace

Stack stack_from_json(const Json& doc, const std::string& source) {
  JsonReader root(doc, source);
  root.reject_unknown({"name", "notes", "attention", "loss", "data_parallel", "sharding",
                       "tp_comm_overlap", "fp8_recipe", "host_dispatch_us",
                       "overlap_compute_slowdown", "memory", "checkpoint"});
  const Stack d;
  Stack s;
  s.name = root.string("name");
  if (s.name.empty()) {
    root.fail("name", "a non-empty string", "\"\"");
  }
  s.notes = root.string_or("notes", "");
  s.attention = enum_or(root, "attention", kAttentionKernelNames, d.attention);
  s.loss = enum_or(root, "loss", kLossKernelNames, d.loss);
  if (root.has("checkpoint")) {
    JsonReader r = root.child("checkpoint");
    r.reject_unknown({"sharded", "async"});
    s.checkpoint.sharded = r.boolean_or("sharded", d.checkpoint.sharded);
    s.checkpoint.async = r.boolean_or("async", d.checkpoint.async);
  }
  if (root.has("data_parallel")) {
    JsonReader r = root.child("data_parallel");
    r.reject_unknown({"overlap_grad_reduce", "fp32_grad_reduce"});
    s.data_parallel.overlap_grad_reduce =
        r.boolean_or("overlap_grad_reduce", d.data_parallel.overlap_grad_reduce);
    s.data_parallel.fp32_grad_reduce =
        r.boolean_or("fp32_grad_reduce", d.data_parallel.fp32_grad_reduce);
  }
  if (root.has("sharding")) {
    JsonReader r = root.child("sharding");
    r.reject_unknown(
        {"prefetch_layers", "reshard_after_forward", "retained_layers", "overlap_reduce"});
    s.sharding.prefetch_layers =
        static_cast<int>(r.integer_or("prefetch_layers", d.sharding.prefetch_layers, 0, 16));
    s.sharding.reshard_after_forward =
        r.boolean_or("reshard_after_forward", d.sharding.reshard_after_forward);
    s.sharding.retained_layers =
        static_cast<int>(r.integer_or("retained_layers", d.sharding.retained_layers, 0, 16));
    s.sharding.overlap_reduce = r.boolean_or("overlap_reduce", d.sharding.overlap_reduce);
  }
  s.tp_comm_overlap = fraction_or(root, "tp_comm_overlap", d.tp_comm_overlap);
  s.fp8_recipe = enum_or(root, "fp8_recipe", kFp8RecipeNames, d.fp8_recipe);
  s.host_dispatch_us = root.non_negative_or("host_dispatch_us", d.host_dispatch_us);
  if (s.host_dispatch_us > 1e4) {
    root.fail("host_dispatch_us", "microseconds in [0, 10000]",
              fmt::format("{}", s.host_dispatch_us));
  }
  s.overlap_compute_slowdown =
      fraction_or(root, "overlap_compute_slowdown", d.overlap_compute_slowdown);
  if (root.has("memory")) {
    JsonReader r = root.child("memory");
    r.reject_unknown({"context_bytes", "communicator_bytes", "fragmentation", "segment_bytes"});
    s.memory.context_bytes = bytes_or(r, "context_bytes", d.memory.context_bytes);
    s.memory.communicator_bytes = bytes_or(r, "communicator_bytes", d.memory.communicator_bytes);
    s.memory.fragmentation = fraction_or(r, "fragmentation", d.memory.fragmentation);
    s.memory.segment_bytes = bytes_or(r, "segment_bytes", d.memory.segment_bytes);
    if (s.memory.segment_bytes > 1 << 30) {
      r.fail("segment_bytes", "bytes in [0, 1 GiB]", fmt::format("{}", s.memory.segment_bytes));
    }
  }
  return s;
}

Json stack_to_json(const Stack& s) {
  Json doc = {{"name", s.name},
              {"attention", std::string(attention_kernel_name(s.attention))},
              {"loss", std::string(loss_kernel_name(s.loss))},
              {"data_parallel",
               {{"overlap_grad_reduce", s.data_parallel.overlap_grad_reduce},
                {"fp32_grad_reduce", s.data_parallel.fp32_grad_reduce}}},
              {"sharding",
               {{"prefetch_layers", s.sharding.prefetch_layers},
                {"reshard_after_forward", s.sharding.reshard_after_forward},
                {"retained_layers", s.sharding.retained_layers},
                {"overlap_reduce", s.sharding.overlap_reduce}}},
              {"tp_comm_overlap", s.tp_comm_overlap},
              {"fp8_recipe", std::string(fp8_recipe_name(s.fp8_recipe))},
              {"host_dispatch_us", s.host_dispatch_us},
              {"overlap_compute_slowdown", s.overlap_compute_slowdown},
              {"memory",
               {{"context_bytes", s.memory.context_bytes},
                {"communicator_bytes", s.memory.communicator_bytes},
                {"fragmentation", s.memory.fragmentation},
                {"segment_bytes", s.memory.segment_bytes}}},
              {"checkpoint", {{"sharded", s.checkpoint.sharded}, {"async", s.checkpoint.async}}}};
  if (!s.notes.empty()) {
    doc["notes"] = s.notes;
  }
  return doc;
}

} // namespace parallax
