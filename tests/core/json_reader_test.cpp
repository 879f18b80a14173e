#include "parallax/core/error.hpp"
#include "parallax/core/json_reader.hpp"

#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <fstream>

namespace parallax {
namespace {

TEST(JsonReader, NamesFilePointerExpectedAndFound) {
  Json doc = Json::parse(R"({"device": {"memory_gib": "eighty"}})");
  JsonReader root(doc, "c.json");
  try {
    root.child("device").positive("memory_gib");
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), "c.json");
    EXPECT_EQ(e.field(), "/device/memory_gib");
    EXPECT_EQ(e.expected(), "a number");
    EXPECT_NE(e.found().find("eighty"), std::string::npos);
  }
}

TEST(JsonReader, RejectsUnknownFieldWithSuggestion) {
  Json doc = Json::parse(R"({"hiden_size": 3})");
  JsonReader root(doc, "m.json");
  try {
    root.reject_unknown({"hidden_size", "name"});
    FAIL();
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "/hiden_size");
    EXPECT_NE(std::string(e.what()).find("did you mean \"hidden_size\""), std::string::npos);
  }
}

TEST(JsonReader, IntegerRangeAndType) {
  Json doc = Json::parse(R"({"a": -1, "b": 1.5, "c": 7})");
  JsonReader r(doc, "x.json");
  EXPECT_THROW(r.integer("a", 0), InputError);
  EXPECT_THROW(r.integer("b"), InputError);
  EXPECT_EQ(r.integer("c", 1, 8), 7);
  EXPECT_THROW(r.integer("c", 1, 4), InputError);
  EXPECT_EQ(r.integer_or("missing", 5), 5);
  EXPECT_THROW(r.integer("missing"), InputError);
}

TEST(JsonReader, ChoiceListsAllowedValues) {
  Json doc = Json::parse(R"({"schedule": "zigzag"})");
  JsonReader r(doc, "p.json");
  constexpr std::array<std::string_view, 2> kAllowed = {"gpipe", "1f1b"};
  try {
    r.choice("schedule", kAllowed);
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(e.expected().find("\"gpipe\", \"1f1b\""), std::string::npos);
    EXPECT_NE(e.found().find("zigzag"), std::string::npos);
  }
}

TEST(JsonLoad, MissingTruncatedAndNotJson) {
  auto dir = std::filesystem::temp_directory_path() / "parallax_json_load_test";
  std::filesystem::create_directories(dir);
  EXPECT_THROW(json_load_file(dir / "nope.json"), InputError);
  std::ofstream(dir / "trunc.json") << R"({"name": "x", "device": {)";
  EXPECT_THROW(json_load_file(dir / "trunc.json"), InputError);
  std::ofstream(dir / "text.json") << "hello world";
  EXPECT_THROW(json_load_file(dir / "text.json"), InputError);
  std::ofstream(dir / "empty.json") << "";
  EXPECT_THROW(json_load_file(dir / "empty.json"), InputError);
  EXPECT_THROW(json_load_file(dir), InputError);
  std::filesystem::remove_all(dir);
}

TEST(JsonWrite, AtomicRoundTrip) {
  auto path = std::filesystem::temp_directory_path() / "parallax_json_write_test.json";
  Json doc = {{"a", 1}, {"b", {1.5, 2.25}}};
  json_write_file(path, doc);
  EXPECT_EQ(json_load_file(path), doc);
  std::filesystem::remove(path);
}

} // namespace
} // namespace parallax
