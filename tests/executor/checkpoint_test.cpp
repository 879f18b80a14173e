#include "parallax/executor/checkpoint.hpp"

#include "parallax/core/error.hpp"

#include <gtest/gtest.h>

#include "temp_dir.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

namespace parallax {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class TempDir : public parallax_test::TempDir {
public:
  TempDir() : parallax_test::TempDir("parallax_checkpoint_test") {}
};

std::vector<float> ramp(std::size_t n, float start) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    v[i] = start + 0.25f * static_cast<float>(i);
  }
  return v;
}

CheckpointTensor make_tensor(std::string name, std::vector<std::int64_t> shape, float start) {
  std::size_t n = 1;
  for (std::int64_t d : shape) {
    n *= static_cast<std::size_t>(d);
  }
  return {std::move(name), std::move(shape), ramp(n, start), ramp(n, -start), ramp(n, start * 2)};
}

// Matrices, a vector, a scalar (empty shape) and an empty tensor; a seed above INT64_MAX.
Checkpoint make_checkpoint(std::int64_t step) {
  Checkpoint c;
  c.step = step;
  c.samples = step * 32;
  c.seed = std::numeric_limits<std::uint64_t>::max() - 5;
  c.model = "gpt2-tiny";
  c.extra =
      Json::parse(R"json({"plan": {"tp": 2, "pp": 1}, "lr": 0.0006, "data": "synthetic(seed=1)",
                            "history": [1.5, -2, null, true]})json");
  c.tensors.push_back(make_tensor("embed.wte", {16, 8}, static_cast<float>(step)));
  c.tensors.push_back(make_tensor("block0.ln1.gamma", {8}, 1.0f));
  c.tensors.push_back(make_tensor("scale", {}, 3.0f));
  c.tensors.push_back(make_tensor("empty", {0, 4}, 0.0f));
  return c;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

std::set<std::string> names_in(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) {
    names.insert(entry.path().filename().string());
  }
  return names;
}

// Calls `read` and expects an InputError naming `file` whose message contains `words`.
void expect_input_error(const std::function<void()>& read, const fs::path& file,
                        const std::string& words) {
  try {
    read();
    ADD_FAILURE() << "expected InputError for " << file;
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), file.string()) << e.what();
    EXPECT_NE(std::string(e.what()).find(file.string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
  }
}

// A .ckpt assembled by hand from a manifest and a data area, for manifest validation tests.
void write_raw_checkpoint(const fs::path& file, const Json& manifest,
                          const std::vector<float>& data) {
  const std::string text = manifest.dump();
  const auto length = static_cast<std::uint64_t>(text.size());
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write("PLXCKPT1", 8);
  out.write(reinterpret_cast<const char*>(&length), sizeof(length));
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  out.write(reinterpret_cast<const char*>(data.data()),
            static_cast<std::streamsize>(data.size() * sizeof(float)));
}

// ---- Round trip, latest, keep ----------------------------------------------------------------

TEST(Checkpoint, RoundTripIsExact) {
  TempDir dir;
  const Checkpoint written = make_checkpoint(42);
  const fs::path file = write_checkpoint(dir.path(), written);
  EXPECT_EQ(file, dir.path() / "step-00000042.ckpt");
  const Checkpoint read = read_checkpoint(file);
  EXPECT_EQ(read, written);
  EXPECT_EQ(read.seed, written.seed);
  EXPECT_EQ(read.extra, written.extra);
  ASSERT_EQ(read.tensors.size(), 4u);
  EXPECT_EQ(read.tensors[2].value, std::vector<float>{3.0f}); // scalar: one element
  EXPECT_TRUE(read.tensors[3].value.empty());
}

TEST(Checkpoint, RoundTripWithoutTensors) {
  TempDir dir;
  Checkpoint empty;
  empty.model = "m";
  EXPECT_EQ(read_checkpoint(write_checkpoint(dir.path(), empty)), empty);
}

TEST(Checkpoint, CreatesDirectory) {
  TempDir dir;
  const fs::path nested = dir.path() / "run1" / "ckpt";
  write_checkpoint(nested, make_checkpoint(1));
  EXPECT_TRUE(fs::exists(nested / "step-00000001.ckpt"));
}

TEST(Checkpoint, LatestNamesNewest) {
  TempDir dir;
  write_checkpoint(dir.path(), make_checkpoint(1));
  EXPECT_EQ(read_text(dir.path() / "latest"), "step-00000001.ckpt\n");
  write_checkpoint(dir.path(), make_checkpoint(2));
  EXPECT_EQ(read_text(dir.path() / "latest"), "step-00000002.ckpt\n");
  const auto latest = read_latest_checkpoint(dir.path());
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(*latest, make_checkpoint(2));
}

TEST(Checkpoint, KeepsNewestN) {
  TempDir dir;
  write_text(dir.path() / "notes.txt", "mine");
  write_text(dir.path() / "step-old.ckpt", "not a checkpoint name");
  for (std::int64_t step = 1; step <= 5; ++step) {
    write_checkpoint(dir.path(), make_checkpoint(step * 100), 2);
  }
  EXPECT_EQ(names_in(dir.path()),
            (std::set<std::string>{"latest", "notes.txt", "step-old.ckpt", "step-00000400.ckpt",
                                   "step-00000500.ckpt"}));
  write_checkpoint(dir.path(), make_checkpoint(600), 1);
  EXPECT_FALSE(fs::exists(dir.path() / "step-00000500.ckpt"));
  EXPECT_TRUE(fs::exists(dir.path() / "step-00000600.ckpt"));
}

TEST(Checkpoint, KeepOrdersByStepNumberNotName) {
  TempDir dir;
  // 9 digits sort before 8 digits as text, after them as numbers.
  write_checkpoint(dir.path(), make_checkpoint(99'999'999), 2);
  write_checkpoint(dir.path(), make_checkpoint(100'000'000), 2);
  write_checkpoint(dir.path(), make_checkpoint(100'000'001), 2);
  EXPECT_EQ(names_in(dir.path()),
            (std::set<std::string>{"latest", "step-100000000.ckpt", "step-100000001.ckpt"}));
}

TEST(Checkpoint, NeverDeletesTheCheckpointLatestNames) {
  TempDir dir;
  write_checkpoint(dir.path(), make_checkpoint(10), 1);
  write_checkpoint(dir.path(), make_checkpoint(5), 1); // a rewind: step 10 is still higher
  EXPECT_TRUE(fs::exists(dir.path() / "step-00000005.ckpt"));
  const auto latest = read_latest_checkpoint(dir.path());
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->step, 5);
}

TEST(Checkpoint, NoTemporaryFilesLeftBehind) {
  TempDir dir;
  for (std::int64_t step = 1; step <= 3; ++step) {
    write_checkpoint(dir.path(), make_checkpoint(step), 3);
  }
  EXPECT_EQ(names_in(dir.path()),
            (std::set<std::string>{"latest", "step-00000001.ckpt", "step-00000002.ckpt",
                                   "step-00000003.ckpt"}));
}

TEST(Checkpoint, FailedWriteRemovesTemporaryAndKeepsLatest) {
  TempDir dir;
  write_checkpoint(dir.path(), make_checkpoint(1));
  // A directory where step 2 should go: the final rename fails.
  fs::create_directories(dir.path() / "step-00000002.ckpt" / "occupied");
  EXPECT_THROW(write_checkpoint(dir.path(), make_checkpoint(2)), std::runtime_error);
  EXPECT_EQ(names_in(dir.path()),
            (std::set<std::string>{"latest", "step-00000001.ckpt", "step-00000002.ckpt"}));
  EXPECT_EQ(read_text(dir.path() / "latest"), "step-00000001.ckpt\n");
  EXPECT_EQ(read_latest_checkpoint(dir.path())->step, 1);
}

// ---- Corruption ------------------------------------------------------------------------------

TEST(Checkpoint, FlippedDataByteFailsCrc) {
  TempDir dir;
  const fs::path file = write_checkpoint(dir.path(), make_checkpoint(7));
  std::string bytes = read_text(file);
  bytes[bytes.size() - 3] = static_cast<char>(bytes[bytes.size() - 3] ^ 0x10);
  write_text(file, bytes);
  expect_input_error([&] { read_checkpoint(file); }, file, "CRC");
  // Arrays are laid out in tensor order: the last bytes are the exp_avg_sq of "scale" (the
  // last tensor, "empty", holds no bytes).
  expect_input_error([&] { read_checkpoint(file); }, file, "scale");
}

TEST(Checkpoint, TruncatedFile) {
  TempDir dir;
  const fs::path file = write_checkpoint(dir.path(), make_checkpoint(7));
  const auto full = fs::file_size(file);
  for (std::uintmax_t size :
       {full - 1, full - 100, std::uintmax_t{40}, std::uintmax_t{12}, std::uintmax_t{0}}) {
    fs::copy_file(file, dir.path() / "copy", fs::copy_options::overwrite_existing);
    fs::resize_file(dir.path() / "copy", size);
    expect_input_error([&] { read_checkpoint(dir.path() / "copy"); }, dir.path() / "copy",
                       "truncated");
  }
  try {
    fs::resize_file(file, full - 1);
    read_checkpoint(file);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "size");
    EXPECT_NE(e.expected().find(std::to_string(full)), std::string::npos) << e.what();
    EXPECT_NE(e.found().find(std::to_string(full - 1)), std::string::npos) << e.what();
  }
}

TEST(Checkpoint, TrailingBytes) {
  TempDir dir;
  const fs::path file = write_checkpoint(dir.path(), make_checkpoint(7));
  write_text(file, read_text(file) + "x");
  expect_input_error([&] { read_checkpoint(file); }, file, "after the last array");
}

TEST(Checkpoint, BadMagic) {
  TempDir dir;
  const fs::path file = write_checkpoint(dir.path(), make_checkpoint(7));
  std::string bytes = read_text(file);
  bytes[7] = '2';
  write_text(file, bytes);
  expect_input_error([&] { read_checkpoint(file); }, file, "magic");
  write_text(file, "{\"step\": 1}");
  expect_input_error([&] { read_checkpoint(file); }, file, "magic");
}

TEST(Checkpoint, MissingFile) {
  TempDir dir;
  expect_input_error([&] { read_checkpoint(dir.path() / "step-00000001.ckpt"); },
                     dir.path() / "step-00000001.ckpt", "no such file");
}

TEST(Checkpoint, ManifestFieldsAreChecked) {
  TempDir dir;
  const fs::path file = dir.path() / "hand.ckpt";
  const std::vector<float> data = {1, 2, 3, 4, 5, 6};
  const Json good = Json::parse(R"({
      "step": 3, "samples": 12, "seed": 9, "model": "m", "extra": {}, "data_bytes": 24,
      "tensors": [{"name": "w", "shape": [2],
                   "value": {"offset_bytes": 0, "crc32": 0}, "exp_avg": {"offset_bytes": 8,
                   "crc32": 0}, "exp_avg_sq": {"offset_bytes": 16, "crc32": 0}}]})");
  // CRCs of the hand-written arrays, from the writer itself.
  Checkpoint reference;
  reference.step = 3;
  reference.samples = 12;
  reference.seed = 9;
  reference.model = "m";
  reference.tensors.push_back({"w", {2}, {1, 2}, {3, 4}, {5, 6}});
  const Checkpoint round = read_checkpoint(write_checkpoint(dir.path(), reference));
  Json valid = good;
  const Json written = [&] {
    const std::string bytes = read_text(dir.path() / "step-00000003.ckpt");
    std::uint64_t length = 0;
    std::memcpy(&length, bytes.data() + 8, sizeof(length));
    return Json::parse(bytes.substr(16, length));
  }();
  for (const char* array : {"value", "exp_avg", "exp_avg_sq"}) {
    valid["tensors"][0][array]["crc32"] = written["tensors"][0][array]["crc32"];
  }
  write_raw_checkpoint(file, valid, data);
  EXPECT_EQ(read_checkpoint(file), round); // the hand-made file is valid as a baseline

  struct Case {
    const char* name;
    std::function<void(Json&)> damage;
    const char* words; // in what()
  };
  const std::vector<Case> cases = {
      {"missing model", [](Json& m) { m.erase("model"); }, "/model"},
      {"unknown field", [](Json& m) { m["stepp"] = 1; }, "/stepp"},
      {"negative step", [](Json& m) { m["step"] = -1; }, "/step"},
      {"seed not integer", [](Json& m) { m["seed"] = "nine"; }, "/seed"},
      {"negative dim", [](Json& m) { m["tensors"][0]["shape"] = {-2}; }, "/tensors/0/shape/0"},
      {"shape larger than data", [](Json& m) { m["tensors"][0]["shape"] = {3}; },
       "/tensors/0/exp_avg_sq/offset_bytes"},
      {"huge shape",
       [](Json& m) {
         m["tensors"][0]["shape"] = {1LL << 40, 1LL << 40};
       },
       "/tensors/0/shape"},
      {"offset past end", [](Json& m) { m["tensors"][0]["exp_avg"]["offset_bytes"] = 20; },
       "/tensors/0/exp_avg/offset_bytes"},
      {"missing array", [](Json& m) { m["tensors"][0].erase("exp_avg_sq"); },
       "/tensors/0/exp_avg_sq"},
      {"wrong crc", [](Json& m) { m["tensors"][0]["value"]["crc32"] = 12345; }, "CRC"},
      {"data_bytes too large", [](Json& m) { m["data_bytes"] = 28; }, "truncated"},
      {"duplicate name", [](Json& m) { m["tensors"].push_back(m["tensors"][0]); },
       "/tensors/1/name"},
      {"not an object", [](Json& m) { m = Json::array(); }, "object"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Json damaged = valid;
    c.damage(damaged);
    write_raw_checkpoint(file, damaged, data);
    expect_input_error([&] { read_checkpoint(file); }, file, c.words);
  }
  // A manifest that is not JSON.
  std::string bytes = read_text(file);
  bytes[16] = '!';
  write_text(file, bytes);
  expect_input_error([&] { read_checkpoint(file); }, file, "JSON");
}

// ---- read_latest_checkpoint ------------------------------------------------------------------

TEST(ReadLatestCheckpoint, NothingToResumeFrom) {
  TempDir dir;
  EXPECT_FALSE(read_latest_checkpoint(dir.path() / "does-not-exist").has_value());
  EXPECT_FALSE(read_latest_checkpoint(dir.path()).has_value());
}

TEST(ReadLatestCheckpoint, MissingTarget) {
  TempDir dir;
  write_checkpoint(dir.path(), make_checkpoint(3));
  fs::remove(dir.path() / "step-00000003.ckpt");
  expect_input_error([&] { read_latest_checkpoint(dir.path()); }, dir.path() / "latest",
                     "step-00000003.ckpt");
}

TEST(ReadLatestCheckpoint, CorruptTargetNamesTheCheckpoint) {
  TempDir dir;
  const fs::path file = write_checkpoint(dir.path(), make_checkpoint(3));
  fs::resize_file(file, 100);
  expect_input_error([&] { read_latest_checkpoint(dir.path()); }, file, "truncated");
}

TEST(ReadLatestCheckpoint, LatestMustNameAFileInTheDirectory) {
  TempDir dir;
  write_checkpoint(dir.path(), make_checkpoint(3));
  for (const char* text : {"", "\n", "../step-00000003.ckpt\n", "sub/step-00000003.ckpt"}) {
    write_text(dir.path() / "latest", text);
    expect_input_error([&] { read_latest_checkpoint(dir.path()); }, dir.path() / "latest",
                       "file name");
  }
  write_text(dir.path() / "latest", "step-00000003.ckpt"); // the newline is optional
  EXPECT_EQ(read_latest_checkpoint(dir.path())->step, 3);
}

} // namespace
} // namespace parallax
