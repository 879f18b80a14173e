// Stack ⇄ JSON (the contract in docs/ARCHITECTURE.md). The loader validates every field and
// names the file, the JSON pointer and the allowed values.
#pragma once

#include "parallax/core/json_reader.hpp"
#include "parallax/core/stack.hpp"

namespace parallax {

Stack stack_from_json(const Json& doc, const std::string& source);
Json stack_to_json(const Stack& stack);

} // namespace parallax
