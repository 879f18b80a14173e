#include "parallax/core/json_reader.hpp"

#include "parallax/core/atomic_file.hpp"

#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <system_error>

#include <fcntl.h>
#include <unistd.h>

namespace parallax {

namespace {

std::string escape_pointer_token(std::string_view key) {
  std::string out;
  for (char c : key) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out += c;
    }
  }
  return out;
}

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) {
    row[j] = j;
  }
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string join_quoted(std::span<const std::string_view> items) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) {
    out += fmt::format("{}\"{}\"", i == 0 ? "" : ", ", items[i]);
  }
  return out;
}

} // namespace

Json json_parse_text(std::string_view text, std::string_view source) {
  try {
    return Json::parse(text);
  } catch (const Json::exception& e) { // parse_error, and out_of_range for numbers like 1e505
    std::string what = e.what();
    // nlohmann messages start with "[json.exception.parse_error.101] "; keep the useful part.
    if (auto pos = what.find("] "); pos != std::string::npos) {
      what = what.substr(pos + 2);
    }
    throw InputError(std::string(source), "", "a JSON document",
                     fmt::format("text that does not parse ({})", what),
                     text.empty() ? "the file is empty" : "is the file truncated or not JSON?");
  }
}

Json json_load_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    throw InputError(path.string(), "", "an existing JSON file", "no such file");
  }
  if (std::filesystem::is_directory(path, ec)) {
    throw InputError(path.string(), "", "a JSON file", "a directory");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw InputError(path.string(), "", "a readable JSON file", "a file that cannot be opened");
  }
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return json_parse_text(buffer.str(), path.string());
}

void json_write_file(const std::filesystem::path& path, const Json& doc) {
  text_write_file(path, doc.dump(2) + "\n");
}

void text_write_file(const std::filesystem::path& path, const std::string& text) {
  try {
    AtomicFile out(path, "writing");
    out.write(text.data(), text.size());
    out.commit();
  } catch (const std::runtime_error& e) {
    throw InputError(path.string(), "", "a writable path", e.what());
  }
}

std::string json_describe(const Json& value) {
  std::string text = value.dump();
  if (text.size() > 40) {
    text = text.substr(0, 37) + "...";
  }
  return fmt::format("{} {}", value.type_name(), text);
}

JsonReader::JsonReader(const Json& value, std::string file, std::string pointer)
    : value_(&value), file_(std::move(file)), pointer_(std::move(pointer)) {}

std::string JsonReader::pointer_of(std::string_view key) const {
  return pointer_ + "/" + escape_pointer_token(key);
}

void JsonReader::require_object() const {
  if (!value_->is_object()) {
    fail_here("an object", json_describe(*value_));
  }
}

bool JsonReader::has(std::string_view key) const {
  require_object();
  auto it = value_->find(key);
  return it != value_->end() && !it->is_null();
}

const Json& JsonReader::at(std::string_view key) const {
  require_object();
  auto it = value_->find(key);
  if (it == value_->end() || it->is_null()) {
    fail(key, "a value (the field is required)", "nothing");
  }
  return *it;
}

JsonReader JsonReader::child(std::string_view key) const {
  const Json& v = at(key);
  if (!v.is_object()) {
    fail(key, "an object", json_describe(v));
  }
  return {v, file_, pointer_of(key)};
}

JsonReader JsonReader::array(std::string_view key) const {
  const Json& v = at(key);
  if (!v.is_array()) {
    fail(key, "an array", json_describe(v));
  }
  return {v, file_, pointer_of(key)};
}

std::size_t JsonReader::array_size() const {
  if (!value_->is_array()) {
    fail_here("an array", json_describe(*value_));
  }
  return value_->size();
}

JsonReader JsonReader::element(std::size_t index) const {
  PARALLAX_CHECK(index < array_size(), "array index out of range");
  return {(*value_)[index], file_, fmt::format("{}/{}", pointer_, index)};
}

std::string JsonReader::string(std::string_view key) const {
  const Json& v = at(key);
  if (!v.is_string()) {
    fail(key, "a string", json_describe(v));
  }
  return v.get<std::string>();
}

std::string JsonReader::string_or(std::string_view key, std::string fallback) const {
  return has(key) ? string(key) : std::move(fallback);
}

std::string JsonReader::choice(std::string_view key,
                               std::span<const std::string_view> allowed) const {
  std::string s = string(key);
  for (std::string_view a : allowed) {
    if (s == a) {
      return s;
    }
  }
  fail(key, "one of " + join_quoted(allowed), fmt::format("\"{}\"", s));
}

std::string JsonReader::choice_or(std::string_view key, std::span<const std::string_view> allowed,
                                  std::string fallback) const {
  return has(key) ? choice(key, allowed) : std::move(fallback);
}

bool JsonReader::boolean(std::string_view key) const {
  const Json& v = at(key);
  if (!v.is_boolean()) {
    fail(key, "true or false", json_describe(v));
  }
  return v.get<bool>();
}

bool JsonReader::boolean_or(std::string_view key, bool fallback) const {
  return has(key) ? boolean(key) : fallback;
}

std::int64_t JsonReader::integer(std::string_view key, std::int64_t min, std::int64_t max) const {
  const Json& v = at(key);
  std::int64_t result = 0;
  if (v.is_number_unsigned()) {
    auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(INT64_MAX)) {
      fail(key, "an integer in range", json_describe(v));
    }
    result = static_cast<std::int64_t>(u);
  } else if (v.is_number_integer()) {
    result = v.get<std::int64_t>();
  } else {
    fail(key, "an integer", json_describe(v));
  }
  if (result < min || result > max) {
    std::string range = max == INT64_MAX ? fmt::format("an integer >= {}", min)
                                         : fmt::format("an integer in [{}, {}]", min, max);
    fail(key, range, std::to_string(result));
  }
  return result;
}

std::int64_t JsonReader::integer_or(std::string_view key, std::int64_t fallback, std::int64_t min,
                                    std::int64_t max) const {
  return has(key) ? integer(key, min, max) : fallback;
}

double JsonReader::number(std::string_view key) const {
  const Json& v = at(key);
  if (!v.is_number()) {
    fail(key, "a number", json_describe(v));
  }
  double d = v.get<double>();
  if (!std::isfinite(d)) {
    fail(key, "a finite number", json_describe(v));
  }
  return d;
}

double JsonReader::number_or(std::string_view key, double fallback) const {
  return has(key) ? number(key) : fallback;
}

double JsonReader::positive(std::string_view key) const {
  double d = number(key);
  if (!(d > 0.0)) {
    fail(key, "a number > 0", fmt::format("{}", d));
  }
  return d;
}

double JsonReader::positive_or(std::string_view key, double fallback) const {
  return has(key) ? positive(key) : fallback;
}

double JsonReader::non_negative_or(std::string_view key, double fallback) const {
  if (!has(key)) {
    return fallback;
  }
  double d = number(key);
  if (d < 0.0) {
    fail(key, "a number >= 0", fmt::format("{}", d));
  }
  return d;
}

void JsonReader::reject_unknown(std::initializer_list<std::string_view> allowed) const {
  require_object();
  for (const auto& [key, unused] : value_->items()) {
    bool known = false;
    std::string_view closest;
    std::size_t best = SIZE_MAX;
    for (std::string_view a : allowed) {
      if (key == a) {
        known = true;
        break;
      }
      std::size_t d = edit_distance(key, a);
      if (d < best) {
        best = d;
        closest = a;
      }
    }
    if (!known) {
      std::string hint = best <= 3 ? fmt::format("did you mean \"{}\"?", closest) : "";
      std::vector<std::string_view> list(allowed);
      fail(key, "no such field; allowed fields are " + join_quoted(list), "an unknown field", hint);
    }
  }
}

void JsonReader::fail(std::string_view key, std::string expected, std::string found,
                      std::string hint) const {
  throw InputError(file_, pointer_of(key), std::move(expected), std::move(found), std::move(hint));
}

void JsonReader::fail_here(std::string expected, std::string found, std::string hint) const {
  throw InputError(file_, pointer_, std::move(expected), std::move(found), std::move(hint));
}

} // namespace parallax
