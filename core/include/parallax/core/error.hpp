// Errors: InputError for anything a user supplied (files, flags), PARALLAX_CHECK for invariants.
//
// An InputError names the file, the JSON pointer (or flag) of the offending field, what was
// expected and what was found, so a message alone tells the user what to change.
#pragma once

#include <stdexcept>
#include <string>

namespace parallax {

class InputError : public std::runtime_error {
public:
  InputError(std::string file, std::string field, std::string expected, std::string found,
             std::string hint = {});

  const std::string& file() const { return file_; }
  const std::string& field() const { return field_; }
  const std::string& expected() const { return expected_; }
  const std::string& found() const { return found_; }

private:
  std::string file_;
  std::string field_;
  std::string expected_;
  std::string found_;
};

// An internal invariant was broken: a bug in Parallax, not in the input.
class CheckError : public std::logic_error {
public:
  using std::logic_error::logic_error;
};

[[noreturn]] void check_fail(const char* file, int line, const char* condition,
                             const std::string& message);

} // namespace parallax

#define PARALLAX_CHECK(cond, msg)                                                                  \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      ::parallax::check_fail(__FILE__, __LINE__, #cond, (msg));                                    \
    }                                                                                              \
  } while (false)
