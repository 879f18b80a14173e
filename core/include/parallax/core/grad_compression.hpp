// Gradient compression of the data-parallel reduction: what a plan's `grad_compression` field
// names, and how it is written.
//
//   none           fp32 (or the stack's gradient type) reduced as is
//   bf16           each gradient rounded to bfloat16 and summed in 16-bit messages
//   topk:<f>       each rank sends the fraction f of its gradient elements largest in magnitude,
//                  as (index, value) pairs; every rank sums every rank's pairs
//   powersgd:<r>   each gradient matrix M (rows × cols) sent as rank-r factors P = M·Q and
//                  Q = Mᵀ·P̂ (P̂ orthonormalised), two all-reduces of (rows + cols)·r values
//                  instead of rows·cols (Vogels, Karimireddy, Jaggi 2019); vectors unchanged
//
// top-k and PowerSGD keep what they did not send (error feedback, Karimireddy et al. 2019) and
// add it to the next step's gradient, unless the plan's `error_feedback` is false.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace parallax {

enum class CompressionKind { none, bf16, topk, powersgd };

struct GradCompression {
  CompressionKind kind = CompressionKind::none;
  double fraction = 0; // topk: share of each rank's elements sent, in (0, 1]
  int rank = 0;        // powersgd: rank of the factors, >= 1

  bool enabled() const { return kind != CompressionKind::none; }
  // The methods that drop information and so keep an error-feedback residual.
  bool lossy() const { return kind == CompressionKind::topk || kind == CompressionKind::powersgd; }
  bool operator==(const GradCompression&) const = default;
};

// "none", "bf16", "topk:0.05", "powersgd:4".
std::string grad_compression_name(const GradCompression& c);

// Parses a name as grad_compression_name writes it; nullopt with `why` (the allowed forms and
// ranges) when it is none of them.
std::optional<GradCompression> grad_compression_parse(std::string_view text, std::string* why);

// What every message names as the allowed values.
inline constexpr std::string_view kGradCompressionForms =
    "\"none\", \"bf16\", \"topk:<fraction in (0, 1]>\" or \"powersgd:<rank >= 1>\"";

} // namespace parallax
