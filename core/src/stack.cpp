#include "parallax/core/stack.hpp"

#include "parallax/core/enum_names.hpp"

#include <cmath>

namespace parallax {

std::string_view attention_kernel_name(AttentionKernel k) {
  return enum_name(kAttentionKernelNames, k);
}

std::string_view loss_kernel_name(LossKernel k) {
  return enum_name(kLossKernelNames, k);
}

std::string_view fp8_recipe_name(Fp8Recipe r) {
  return enum_name(kFp8RecipeNames, r);
}

double fp8_cast_traffic_factor(Fp8Recipe r) {
  // A cast-transpose reads 2 bytes and writes 1 + 1 per element; finding the scale first reads the
  // 2 bytes again: (4 + 2) / 4.
  return r == Fp8Recipe::delayed ? 1.0 : 1.5;
}

double allocator_round_bytes(const Stack& stack, double bytes) {
  if (bytes <= 0) {
    return 0;
  }
  constexpr double kMinBlock = 512; // PyTorch's caching allocator rounds every request to 512 B
  double rounded = std::ceil(bytes / kMinBlock) * kMinBlock;
  // Requests of 1 MiB and more come from the large pool in whole segments; smaller ones share
  // segments (PyTorch's kSmallSize), so they cost only their 512-byte rounding.
  constexpr double kSmallSize = 1 << 20;
  const double segment = stack.memory.segment_bytes;
  if (segment > 0 && rounded >= kSmallSize) {
    rounded = std::ceil(rounded / segment) * segment;
  }
  return rounded;
}

double allocator_reserved_bytes(const Stack& stack, std::span<const double> allocations) {
  double total = 0;
  for (const double bytes : allocations) {
    total += allocator_round_bytes(stack, bytes);
  }
  return total;
}

} // namespace parallax
