#include "parallax/executor/data.hpp"

#include "parallax/core/error.hpp"

#include <gtest/gtest.h>

#include "temp_dir.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include <unistd.h>

namespace parallax {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class TempDir : public parallax_test::TempDir {
public:
  TempDir() : parallax_test::TempDir("parallax_data_test") {}
};

void write_bytes(const fs::path& path, const void* data, std::size_t bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::app);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  ASSERT_TRUE(out.good()) << path;
}

void write_raw(const fs::path& path, const std::vector<std::uint16_t>& tokens) {
  fs::remove(path);
  write_bytes(path, tokens.data(), tokens.size() * sizeof(std::uint16_t));
}

std::array<std::int32_t, 256> llmc_header(std::size_t num_tokens) {
  std::array<std::int32_t, 256> header{};
  header[0] = 20240520;
  header[1] = 1;
  header[2] = static_cast<std::int32_t>(num_tokens);
  return header;
}

void write_llmc(const fs::path& path, const std::array<std::int32_t, 256>& header,
                const std::vector<std::uint16_t>& tokens) {
  fs::remove(path);
  write_bytes(path, header.data(), sizeof(header));
  write_bytes(path, tokens.data(), tokens.size() * sizeof(std::uint16_t));
}

// tokens[i] = (7 i + 3) mod vocab: distinct neighbours, so any misplaced offset shows.
std::vector<std::uint16_t> test_tokens(std::size_t n, std::uint16_t vocab) {
  std::vector<std::uint16_t> tokens(n);
  for (std::size_t i = 0; i < n; ++i) {
    tokens[i] = static_cast<std::uint16_t>((7 * i + 3) % vocab);
  }
  return tokens;
}

std::vector<std::int32_t> sample_of(const TokenSource& source, std::int64_t sample,
                                    std::int64_t seq_length) {
  std::vector<std::int32_t> out(static_cast<std::size_t>(seq_length + 1));
  source.sample(sample, out);
  return out;
}

// Calls `open` and expects an InputError whose message names `file` and whose field is `field`.
void expect_input_error(const std::function<void()>& open, const fs::path& file,
                        const std::string& field) {
  try {
    open();
    ADD_FAILURE() << "expected InputError for " << file;
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), file.string());
    EXPECT_NE(std::string(e.what()).find(file.string()), std::string::npos) << e.what();
    EXPECT_EQ(e.field(), field) << e.what();
  }
}

// ---- Synthetic -------------------------------------------------------------------------------

TEST(SyntheticSource, SameSeedGivesSameTokens) {
  auto a = make_synthetic_source(1000, 7);
  auto b = make_synthetic_source(1000, 7);
  for (std::int64_t s = 0; s < 50; ++s) {
    EXPECT_EQ(sample_of(*a, s, 64), sample_of(*b, s, 64)) << "sample " << s;
  }
}

TEST(SyntheticSource, DifferentSeedOrSampleGivesDifferentTokens) {
  auto a = make_synthetic_source(1000, 7);
  auto b = make_synthetic_source(1000, 8);
  std::size_t differ_seed = 0;
  std::size_t differ_sample = 0;
  std::size_t total = 0;
  for (std::int64_t s = 0; s < 20; ++s) {
    const auto x = sample_of(*a, s, 64);
    const auto y = sample_of(*b, s, 64);
    const auto z = sample_of(*a, s + 1, 64);
    for (std::size_t p = 0; p < x.size(); ++p) {
      differ_seed += x[p] != y[p] ? 1 : 0;
      differ_sample += x[p] != z[p] ? 1 : 0;
    }
    total += x.size();
  }
  // Equal by chance with probability about 1/vocab per position.
  EXPECT_GT(static_cast<double>(differ_seed) / static_cast<double>(total), 0.95);
  EXPECT_GT(static_cast<double>(differ_sample) / static_cast<double>(total), 0.95);
}

TEST(SyntheticSource, TokensInRange) {
  for (std::int64_t vocab : {1, 2, 7, 50257}) {
    for (double structure : {0.0, 0.9, 1.0}) {
      auto source = make_synthetic_source(vocab, 3, structure);
      std::vector<std::int64_t> histogram(
          static_cast<std::size_t>(std::min<std::int64_t>(vocab, 8)));
      for (std::int64_t s = 0; s < 200; ++s) {
        for (std::int32_t t : sample_of(*source, s, 32)) {
          ASSERT_GE(t, 0);
          ASSERT_LT(t, vocab) << "vocab " << vocab << " structure " << structure;
          if (t < static_cast<std::int32_t>(histogram.size())) {
            ++histogram[static_cast<std::size_t>(t)];
          }
        }
      }
      if (vocab == 7 && structure == 0.0) { // pure noise reaches every token
        for (std::int64_t count : histogram) {
          EXPECT_GT(count, 0);
        }
      }
    }
  }
}

// The fraction of transitions a → b where b is a's most frequent successor: about
// structure + (1 − structure)/vocab once every token has been seen often.
double successor_following_fraction(const TokenSource& source, std::int64_t vocab,
                                    std::int64_t num_samples, std::int64_t seq_length) {
  std::vector<std::vector<std::int64_t>> counts(
      static_cast<std::size_t>(vocab), std::vector<std::int64_t>(static_cast<std::size_t>(vocab)));
  std::int64_t transitions = 0;
  for (std::int64_t s = 0; s < num_samples; ++s) {
    const auto tokens = sample_of(source, s, seq_length);
    for (std::size_t p = 1; p < tokens.size(); ++p) {
      ++counts[static_cast<std::size_t>(tokens[p - 1])][static_cast<std::size_t>(tokens[p])];
      ++transitions;
    }
  }
  std::int64_t following = 0;
  for (const auto& row : counts) {
    following += *std::max_element(row.begin(), row.end());
  }
  return static_cast<double>(following) / static_cast<double>(transitions);
}

TEST(SyntheticSource, FollowsSuccessorWithProbabilityStructure) {
  constexpr std::int64_t kVocab = 50;
  for (double structure : {0.9, 0.5}) {
    auto source = make_synthetic_source(kVocab, 11, structure);
    const double expected = structure + (1.0 - structure) / kVocab;
    EXPECT_NEAR(successor_following_fraction(*source, kVocab, 4000, 64), expected, 0.01)
        << "structure " << structure;
  }
  // Without structure the best guess is barely better than chance (1/vocab = 0.02).
  auto noise = make_synthetic_source(kVocab, 11, 0.0);
  EXPECT_LT(successor_following_fraction(*noise, kVocab, 4000, 64), 0.05);
}

TEST(SyntheticSource, SampleIndependentOfCallOrder) {
  auto forward = make_synthetic_source(500, 42);
  std::vector<std::vector<std::int32_t>> expected;
  for (std::int64_t s = 0; s < 100; ++s) {
    expected.push_back(sample_of(*forward, s, 16));
  }
  std::vector<std::int64_t> order(100);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(5));
  auto shuffled = make_synthetic_source(500, 42);
  for (std::int64_t s : order) {
    EXPECT_EQ(sample_of(*shuffled, s, 16), expected[static_cast<std::size_t>(s)]) << s;
  }
  // A far sample is computed on its own, and earlier samples are unchanged afterwards.
  const auto far = sample_of(*shuffled, 1'000'000'000'000, 16);
  EXPECT_EQ(far, sample_of(*make_synthetic_source(500, 42), 1'000'000'000'000, 16));
  EXPECT_EQ(sample_of(*shuffled, 0, 16), expected[0]);
  // A longer sample extends a shorter one: tokens depend on (seed, sample, position) only.
  const auto longer = sample_of(*forward, 3, 40);
  EXPECT_TRUE(std::equal(expected[3].begin(), expected[3].end(), longer.begin()));
}

TEST(SyntheticSource, DescribeNamesSeed) {
  EXPECT_NE(make_synthetic_source(10, 1234)->describe().find("seed=1234"), std::string::npos);
}

TEST(SyntheticSource, RejectsStructureOutsideZeroOne) {
  EXPECT_THROW(make_synthetic_source(10, 1, 1.5), InputError);
  EXPECT_THROW(make_synthetic_source(10, 1, -0.1), InputError);
  EXPECT_THROW(make_synthetic_source(10, 1, std::nan("")), InputError);
}

// ---- Token files -----------------------------------------------------------------------------

TEST(TokenFile, RawRoundTrip) {
  TempDir dir;
  const fs::path file = dir.path() / "train.bin";
  const auto tokens = test_tokens(100, 50);
  write_raw(file, tokens);
  auto source = open_token_file(file, 50, 8);
  EXPECT_EQ(source->describe(), file.string());
  for (std::int64_t s = 0; s < 30; ++s) {
    const std::size_t start = static_cast<std::size_t>(s * 8) % (100 - 8 - 1);
    const auto got = sample_of(*source, s, 8);
    const std::vector<std::int32_t> want(tokens.begin() + static_cast<std::ptrdiff_t>(start),
                                         tokens.begin() + static_cast<std::ptrdiff_t>(start + 9));
    EXPECT_EQ(got, want) << "sample " << s;
  }
}

TEST(TokenFile, LlmcRoundTrip) {
  TempDir dir;
  const fs::path file = dir.path() / "fineweb_val_000000.bin";
  const auto tokens = test_tokens(300, 60000);
  write_llmc(file, llmc_header(tokens.size()), tokens);
  auto source = open_token_file(file, 50257 + 10000, 16);
  for (std::int64_t s : {0, 1, 5, 17}) {
    const std::size_t start = static_cast<std::size_t>(s * 16) % (300 - 16 - 1);
    const auto got = sample_of(*source, s, 16);
    const std::vector<std::int32_t> want(tokens.begin() + static_cast<std::ptrdiff_t>(start),
                                         tokens.begin() + static_cast<std::ptrdiff_t>(start + 17));
    EXPECT_EQ(got, want) << "sample " << s; // the header is skipped, not read as tokens
  }
}

TEST(TokenFile, SamplesWrapAround) {
  TempDir dir;
  const fs::path file = dir.path() / "tiny.bin";
  std::vector<std::uint16_t> tokens(20);
  std::iota(tokens.begin(), tokens.end(), std::uint16_t{0}); // token i at offset i
  write_raw(file, tokens);
  auto source = open_token_file(file, 20, 4); // starts are (4 i) mod 15
  EXPECT_EQ(sample_of(*source, 3, 4), (std::vector<std::int32_t>{12, 13, 14, 15, 16}));
  EXPECT_EQ(sample_of(*source, 4, 4), (std::vector<std::int32_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(sample_of(*source, 15, 4), (std::vector<std::int32_t>{0, 1, 2, 3, 4}));
  // 4 · 10^15 mod 15 = 10, computed without overflow.
  EXPECT_EQ(sample_of(*source, 1'000'000'000'000'000, 4),
            (std::vector<std::int32_t>{10, 11, 12, 13, 14}));
  // Shortest legal file (seq_length + 2 tokens): every sample starts at 0.
  write_raw(file, {5, 6, 7, 8, 9, 10});
  auto shortest = open_token_file(file, 20, 4);
  EXPECT_EQ(sample_of(*shortest, 7, 4), (std::vector<std::int32_t>{5, 6, 7, 8, 9}));
}

TEST(TokenFile, MissingFile) {
  TempDir dir;
  const fs::path file = dir.path() / "nope.bin";
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "");
}

TEST(TokenFile, DirectoryIsNotATokenFile) {
  TempDir dir;
  expect_input_error([&] { open_token_file(dir.path(), 10, 4); }, dir.path(), "");
}

TEST(TokenFile, OddSize) {
  TempDir dir;
  const fs::path file = dir.path() / "odd.bin";
  write_raw(file, test_tokens(40, 10));
  const char extra = 1;
  write_bytes(file, &extra, 1);
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "size");
}

TEST(TokenFile, ShorterThanOneSample) {
  TempDir dir;
  const fs::path file = dir.path() / "short.bin";
  write_raw(file, test_tokens(5, 10)); // seq_length 4 needs 6
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "size");
  write_raw(file, {});
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "size");
  // The same tokens behind an llm.c header are just as short.
  write_llmc(file, llmc_header(5), test_tokens(5, 10));
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "size");
}

TEST(TokenFile, LlmcHeaderCutShort) {
  TempDir dir;
  const fs::path file = dir.path() / "cut.bin";
  const std::int32_t magic = 20240520;
  write_bytes(file, &magic, sizeof(magic));
  const auto padding = test_tokens(100, 10); // 4 + 200 bytes < 1024
  write_bytes(file, padding.data(), padding.size() * sizeof(std::uint16_t));
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "size");
}

TEST(TokenFile, LlmcBadMagic) {
  TempDir dir;
  const fs::path file = dir.path() / "magic.bin";
  auto header = llmc_header(50);
  header[0] = 20240521;
  write_llmc(file, header, test_tokens(50, 10));
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "header[0] (magic)");
}

TEST(TokenFile, LlmcBadVersion) {
  TempDir dir;
  const fs::path file = dir.path() / "version.bin";
  auto header = llmc_header(50);
  header[1] = 2;
  write_llmc(file, header, test_tokens(50, 10));
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "header[1] (version)");
}

TEST(TokenFile, LlmcCountMismatch) {
  TempDir dir;
  const fs::path file = dir.path() / "count.bin";
  write_llmc(file, llmc_header(51), test_tokens(50, 10));
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "header[2] (token count)");
  // An odd number of bytes after the header.
  write_llmc(file, llmc_header(50), test_tokens(50, 10));
  const char extra = 0;
  write_bytes(file, &extra, 1);
  expect_input_error([&] { open_token_file(file, 10, 4); }, file, "size");
}

TEST(TokenFile, TokenOutOfVocabReportsOffset) {
  TempDir dir;
  const fs::path file = dir.path() / "vocab.bin";
  auto tokens = test_tokens(2000, 100);
  tokens[1234] = 100; // == vocab_size
  tokens[1500] = 200;
  write_raw(file, tokens);
  expect_input_error([&] { open_token_file(file, 100, 4); }, file, "token 1234");
  // Offsets count tokens, not bytes, in llm.c files too.
  write_llmc(file, llmc_header(tokens.size()), tokens);
  expect_input_error([&] { open_token_file(file, 100, 4); }, file, "token 1234");
  // The largest token id is accepted when the vocabulary covers it.
  EXPECT_NO_THROW(open_token_file(file, 201, 4));
}

} // namespace
} // namespace parallax
