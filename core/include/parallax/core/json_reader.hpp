// Strict, validating access to a JSON document.
//
// Every loader in Parallax reads through a JsonReader so that each error names the file, the JSON
// pointer of the field, the expected type or range, and what the document holds instead:
//
//   JsonReader root(doc, "cluster.json");
//   root.reject_unknown({"name", "device"});
//   JsonReader device = root.child("device");
//   double bw = device.positive("memory_bandwidth_gbps");   // "/device/memory_bandwidth_gbps"
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace parallax {

using Json = nlohmann::json;

// Reads and parses a JSON file; missing, unreadable, truncated or non-JSON files are InputErrors.
Json json_load_file(const std::filesystem::path& path);
// Parses text already in memory; `source` names it in errors.
Json json_parse_text(std::string_view text, std::string_view source);
// Writes `doc` atomically (temporary file, fsync, rename) with two-space indentation.
void json_write_file(const std::filesystem::path& path, const Json& doc);
// The same for any text (DOT, SVG, HTML): written to a temporary file, then renamed.
void text_write_file(const std::filesystem::path& path, const std::string& text);

// A short human description of a JSON value's type and content, for error messages.
std::string json_describe(const Json& value);

class JsonReader {
public:
  JsonReader(const Json& value, std::string file, std::string pointer = "");

  const Json& value() const { return *value_; }
  const std::string& file() const { return file_; }
  const std::string& pointer() const { return pointer_; }
  std::string pointer_of(std::string_view key) const;

  bool has(std::string_view key) const;
  JsonReader child(std::string_view key) const; // a required object field
  JsonReader array(std::string_view key) const; // a required array field
  JsonReader element(std::size_t index) const;
  std::size_t array_size() const; // requires this value to be an array

  std::string string(std::string_view key) const;
  std::string string_or(std::string_view key, std::string fallback) const;
  // One of `allowed`; the error lists them.
  std::string choice(std::string_view key, std::span<const std::string_view> allowed) const;
  std::string choice_or(std::string_view key, std::span<const std::string_view> allowed,
                        std::string fallback) const;
  bool boolean(std::string_view key) const;
  bool boolean_or(std::string_view key, bool fallback) const;
  std::int64_t integer(std::string_view key, std::int64_t min = INT64_MIN,
                       std::int64_t max = INT64_MAX) const;
  std::int64_t integer_or(std::string_view key, std::int64_t fallback, std::int64_t min = INT64_MIN,
                          std::int64_t max = INT64_MAX) const;
  double number(std::string_view key) const;
  double number_or(std::string_view key, double fallback) const;
  double positive(std::string_view key) const; // > 0, finite
  double positive_or(std::string_view key, double fallback) const;
  double non_negative_or(std::string_view key, double fallback) const;

  // Fails on any key of this object not in `allowed`, naming the closest allowed key.
  void reject_unknown(std::initializer_list<std::string_view> allowed) const;

  [[noreturn]] void fail(std::string_view key, std::string expected, std::string found,
                         std::string hint = {}) const;
  [[noreturn]] void fail_here(std::string expected, std::string found, std::string hint = {}) const;

private:
  const Json& at(std::string_view key) const;
  void require_object() const;

  const Json* value_;
  std::string file_;
  std::string pointer_;
};

} // namespace parallax
