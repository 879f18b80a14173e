#include "parallax/core/grad_compression.hpp"

#include <fmt/format.h>

#include <charconv>
#include <cmath>

namespace parallax {

std::string grad_compression_name(const GradCompression& c) {
  switch (c.kind) {
  case CompressionKind::none:
    return "none";
  case CompressionKind::bf16:
    return "bf16";
  case CompressionKind::topk:
    return fmt::format("topk:{:g}", c.fraction);
  case CompressionKind::powersgd:
    return fmt::format("powersgd:{}", c.rank);
  }
  return "none";
}

std::optional<GradCompression> grad_compression_parse(std::string_view text, std::string* why) {
  const auto fail = [&](std::string reason) -> std::optional<GradCompression> {
    if (why) {
      *why = std::move(reason);
    }
    return std::nullopt;
  };
  if (text == "none") {
    return GradCompression{};
  }
  if (text == "bf16") {
    return GradCompression{.kind = CompressionKind::bf16};
  }
  const std::size_t colon = text.find(':');
  const std::string_view method = text.substr(0, colon);
  const std::string_view arg = colon == std::string_view::npos ? "" : text.substr(colon + 1);
  const char* end = arg.data() + arg.size();
  if (method == "topk") {
    double f = 0;
    const auto [ptr, ec] = std::from_chars(arg.data(), end, f);
    if (arg.empty() || ec != std::errc() || ptr != end || !std::isfinite(f) || f <= 0 || f > 1) {
      return fail(fmt::format("topk:<fraction> with a fraction in (0, 1], e.g. topk:0.05 (found "
                              "\"{}\")",
                              arg));
    }
    return GradCompression{.kind = CompressionKind::topk, .fraction = f};
  }
  if (method == "powersgd") {
    int r = 0;
    const auto [ptr, ec] = std::from_chars(arg.data(), end, r);
    if (arg.empty() || ec != std::errc() || ptr != end || r < 1 || r > 4096) {
      return fail(fmt::format(
          "powersgd:<rank> with an integer rank in [1, 4096], e.g. powersgd:4 (found \"{}\")",
          arg));
    }
    return GradCompression{.kind = CompressionKind::powersgd, .rank = r};
  }
  return fail(std::string(kGradCompressionForms));
}

} // namespace parallax
