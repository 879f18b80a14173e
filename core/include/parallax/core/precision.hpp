// Numeric precisions a plan can train in, and their storage sizes.
#pragma once

#include <array>
#include <optional>
#include <string_view>

namespace parallax {

enum class Precision { fp32, tf32, fp16, bf16, fp8 };

inline constexpr std::array<std::string_view, 5> kPrecisionNames = {"fp32", "tf32", "fp16", "bf16",
                                                                    "fp8"};

std::string_view precision_name(Precision p);
std::optional<Precision> precision_parse(std::string_view name);

// Bytes of one weight / activation element as stored during training. Mixed precision (fp16,
// bf16) keeps 2-byte weights, gradients and activations; fp8 training (Transformer Engine style)
// runs GEMMs in fp8 but stores weights, gradients and activations in bf16; fp32 and tf32 store
// 4 bytes.
double precision_storage_bytes(Precision p);
// True when the optimizer keeps separate fp32 master weights (mixed precision).
bool precision_is_mixed(Precision p);

} // namespace parallax
