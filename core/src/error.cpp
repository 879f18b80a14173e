#include "parallax/core/error.hpp"

#include <fmt/format.h>

namespace parallax {

namespace {
std::string format_input_error(const std::string& file, const std::string& field,
                               const std::string& expected, const std::string& found,
                               const std::string& hint) {
  std::string message = fmt::format("{}: field '{}': expected {}, found {}", file,
                                    field.empty() ? "/" : field, expected, found);
  if (!hint.empty()) {
    message += fmt::format(" (hint: {})", hint);
  }
  return message;
}
} // namespace

InputError::InputError(std::string file, std::string field, std::string expected, std::string found,
                       std::string hint)
    : std::runtime_error(format_input_error(file, field, expected, found, hint)),
      file_(std::move(file)), field_(std::move(field)), expected_(std::move(expected)),
      found_(std::move(found)) {}

void check_fail(const char* file, int line, const char* condition, const std::string& message) {
  throw CheckError(
      fmt::format("{}:{}: internal check '{}' failed: {}", file, line, condition, message));
}

} // namespace parallax
