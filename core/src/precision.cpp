#include "parallax/core/precision.hpp"

namespace parallax {

std::string_view precision_name(Precision p) {
  return kPrecisionNames.at(static_cast<int>(p));
}

std::optional<Precision> precision_parse(std::string_view name) {
  for (std::size_t i = 0; i < kPrecisionNames.size(); ++i) {
    if (kPrecisionNames[i] == name) {
      return static_cast<Precision>(i);
    }
  }
  return std::nullopt;
}

double precision_storage_bytes(Precision p) {
  switch (p) {
  case Precision::fp32:
  case Precision::tf32:
    return 4.0;
  case Precision::fp16:
  case Precision::bf16:
  case Precision::fp8:
    return 2.0;
  }
  return 4.0;
}

bool precision_is_mixed(Precision p) {
  return p == Precision::fp16 || p == Precision::bf16 || p == Precision::fp8;
}

} // namespace parallax
