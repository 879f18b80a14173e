// Token sources: the seeded synthetic stream and memory-mapped uint16 token files.
#include "parallax/executor/data.hpp"

#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace parallax {

namespace {

static_assert(std::endian::native == std::endian::little,
              "token files are little-endian uint16 and are read in place");

// ---- Synthetic stream ------------------------------------------------------------------------

// splitmix64's finaliser (Steele, Lea, Flood 2014): a bijective, well-mixing 64-bit hash.
constexpr std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30U)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27U)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31U);
}

// Independent random streams over the same counters.
enum class Stream : std::uint64_t {
  kStart = 1,     // (sample, 0): the first token of a sample
  kFollow = 2,    // (sample, position): does this position follow the successor table?
  kNoise = 3,     // (sample, position): the uniform token used when it does not
  kSuccessor = 4, // (token, 0): the successor table
};

// A pure function of its arguments: no state, so any token of any sample is computable alone.
constexpr std::uint64_t counter_hash(std::uint64_t seed, Stream stream, std::uint64_t a,
                                     std::uint64_t b) {
  std::uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ static_cast<std::uint64_t>(stream));
  h = splitmix64(h ^ a);
  return splitmix64(h ^ b);
}

// The top 53 bits as a double in [0, 1).
constexpr double hash_to_unit(std::uint64_t h) {
  return static_cast<double>(h >> 11U) * 0x1.0p-53;
}

class SyntheticSource final : public TokenSource {
public:
  SyntheticSource(std::int64_t vocab_size, std::uint64_t seed, double structure)
      : vocab_size_(static_cast<std::uint64_t>(vocab_size)), seed_(seed), structure_(structure) {}

  void sample(std::int64_t sample, std::span<std::int32_t> out) const override {
    PARALLAX_CHECK(sample >= 0, fmt::format("sample index {} is negative", sample));
    if (out.empty()) {
      return;
    }
    const auto s = static_cast<std::uint64_t>(sample);
    out[0] = token_of(counter_hash(seed_, Stream::kStart, s, 0));
    for (std::size_t p = 1; p < out.size(); ++p) {
      const bool follow = hash_to_unit(counter_hash(seed_, Stream::kFollow, s, p)) < structure_;
      out[p] = follow ? successor(out[p - 1]) : token_of(counter_hash(seed_, Stream::kNoise, s, p));
    }
  }

  std::string describe() const override {
    return fmt::format("synthetic(seed={}, vocab_size={}, structure={})", seed_, vocab_size_,
                       structure_);
  }

private:
  // Modulo bias is below vocab_size / 2^64 < 2^-32: negligible.
  std::int32_t token_of(std::uint64_t h) const {
    return static_cast<std::int32_t>(h % vocab_size_);
  }
  // The successor table, computed on demand instead of stored (any vocabulary size is free).
  std::int32_t successor(std::int32_t token) const {
    return token_of(counter_hash(seed_, Stream::kSuccessor, static_cast<std::uint64_t>(token), 0));
  }

  std::uint64_t vocab_size_;
  std::uint64_t seed_;
  double structure_;
};

// ---- Token files -----------------------------------------------------------------------------

// llm.c's data files: 256 little-endian int32 of header, then uint16 tokens.
constexpr std::int32_t kLlmcMagic = 20240520;
constexpr std::int32_t kLlmcVersion = 1;
constexpr std::size_t kLlmcHeaderBytes = 256 * sizeof(std::int32_t);
constexpr std::size_t kTokenBytes = sizeof(std::uint16_t);

// A whole file mapped read-only; unmapped on destruction. An empty file maps nothing.
class FileMapping {
public:
  explicit FileMapping(const std::filesystem::path& path) {
    const std::string name = path.string();
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      if (err == ENOENT) {
        throw InputError(name, "", "an existing token file", "no such file", "check the data path");
      }
      throw InputError(name, "", "a readable token file",
                       fmt::format("a file that cannot be opened ({})", std::strerror(err)));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw InputError(name, "", "a readable token file",
                       fmt::format("a file that cannot be inspected ({})", std::strerror(err)));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw InputError(name, "", "a regular file of uint16 tokens",
                       S_ISDIR(st.st_mode) ? "a directory" : "not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* data = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (data == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw InputError(name, "", "a token file that can be memory-mapped",
                         fmt::format("mmap failed ({})", std::strerror(err)));
      }
      data_ = data;
    }
    ::close(fd); // the mapping keeps the file referenced
  }
  ~FileMapping() {
    if (data_ != nullptr) {
      ::munmap(data_, size_);
    }
  }
  FileMapping(const FileMapping&) = delete;
  FileMapping& operator=(const FileMapping&) = delete;

  const unsigned char* bytes() const { return static_cast<const unsigned char*>(data_); }
  std::size_t size() const { return size_; }

private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

// (a · b) mod m for a, b < m < 2^63, without overflow (double-and-add).
std::uint64_t mul_mod(std::uint64_t a, std::uint64_t b, std::uint64_t m) {
  std::uint64_t result = 0;
  while (b > 0) {
    if ((b & 1U) != 0) {
      result = (result + a) % m;
    }
    a = (a + a) % m;
    b >>= 1U;
  }
  return result;
}

class TokenFileSource final : public TokenSource {
public:
  TokenFileSource(const std::filesystem::path& path, std::int64_t vocab_size,
                  std::int64_t seq_length)
      : path_(path.string()), mapping_(path), vocab_size_(vocab_size), seq_length_(seq_length) {
    locate_tokens();
    check_length();
    check_token_range();
  }

  void sample(std::int64_t sample, std::span<std::int32_t> out) const override {
    PARALLAX_CHECK(sample >= 0, fmt::format("sample index {} is negative", sample));
    const auto seq = static_cast<std::uint64_t>(seq_length_);
    PARALLAX_CHECK(
        out.size() == seq + 1,
        fmt::format("a sample holds seq_length + 1 = {} tokens, not {}", seq + 1, out.size()));
    const std::uint64_t period = num_tokens_ - seq - 1; // ≥ 1, checked on open
    const std::uint64_t start =
        mul_mod(static_cast<std::uint64_t>(sample) % period, seq % period, period);
    for (std::size_t k = 0; k < out.size(); ++k) {
      out[k] = token_at(start + k);
    }
  }

  std::string describe() const override { return path_; }

private:
  std::uint16_t token_at(std::uint64_t index) const {
    std::uint16_t token = 0;
    std::memcpy(&token, tokens_ + index * kTokenBytes, kTokenBytes);
    return token;
  }

  std::int32_t header_int(std::size_t index) const {
    std::int32_t value = 0;
    std::memcpy(&value, mapping_.bytes() + index * sizeof(std::int32_t), sizeof(value));
    return value;
  }

  // Raw nanoGPT file or llm.c file: sets tokens_ and num_tokens_.
  void locate_tokens() {
    const std::size_t size = mapping_.size();
    const std::size_t after_header = size >= kLlmcHeaderBytes ? size - kLlmcHeaderBytes : 0;
    const bool has_magic = size >= sizeof(std::int32_t) && header_int(0) == kLlmcMagic;
    // A raw file whose header[1..2] spell "version 1, exactly the tokens that follow" but whose
    // magic differs is a damaged llm.c file, not a raw one (that coincidence is implausible).
    const bool looks_llmc = size >= kLlmcHeaderBytes && after_header % kTokenBytes == 0 &&
                            header_int(1) == kLlmcVersion &&
                            static_cast<std::size_t>(header_int(2)) == after_header / kTokenBytes;
    if (!has_magic && looks_llmc) {
      throw InputError(path_, "header[0] (magic)", std::to_string(kLlmcMagic),
                       std::to_string(header_int(0)),
                       "header[1..2] look like an llm.c header but the magic is wrong: the file "
                       "is damaged; regenerate it");
    }
    if (!has_magic) { // raw uint16 tokens
      if (size % kTokenBytes != 0) {
        throw InputError(path_, "size", "an even number of bytes (whole uint16 tokens)",
                         fmt::format("{} bytes", size),
                         "the file is truncated or is not a uint16 token file");
      }
      tokens_ = mapping_.bytes();
      num_tokens_ = size / kTokenBytes;
      return;
    }
    if (size < kLlmcHeaderBytes) {
      throw InputError(
          path_, "size", fmt::format("at least {} bytes (the llm.c header)", kLlmcHeaderBytes),
          fmt::format("{} bytes", size), "the file starts with the llm.c magic but is truncated");
    }
    if (header_int(1) != kLlmcVersion) {
      throw InputError(path_, "header[1] (version)", std::to_string(kLlmcVersion),
                       std::to_string(header_int(1)),
                       "only version 1 (uint16 GPT-2 tokens) is supported; version 2 files hold "
                       "uint32 tokens");
    }
    if (after_header % kTokenBytes != 0) {
      throw InputError(
          path_, "size",
          fmt::format("{} header bytes plus an even number of token bytes", kLlmcHeaderBytes),
          fmt::format("{} bytes", size), "the file is truncated");
    }
    const std::size_t count = after_header / kTokenBytes;
    if (header_int(2) < 0 || static_cast<std::size_t>(header_int(2)) != count) {
      throw InputError(
          path_, "header[2] (token count)",
          fmt::format("{} (the tokens after the {}-byte header)", count, kLlmcHeaderBytes),
          std::to_string(header_int(2)), "the file is truncated or was not completely written");
    }
    tokens_ = mapping_.bytes() + kLlmcHeaderBytes;
    num_tokens_ = count;
  }

  // Sample starts are taken mod (n − seq_length − 1), so n ≥ seq_length + 2.
  void check_length() const {
    const auto needed = static_cast<std::uint64_t>(seq_length_) + 2;
    if (num_tokens_ < needed) {
      throw InputError(path_, "size",
                       fmt::format("at least {} tokens (one sample of seq_length + 1 = {}, plus "
                                   "one to wrap around)",
                                   needed, needed - 1),
                       fmt::format("{} tokens", num_tokens_),
                       "use a longer token file or a shorter seq_length");
    }
  }

  void check_token_range() const {
    if (vocab_size_ > std::numeric_limits<std::uint16_t>::max()) {
      return; // every uint16 is in range
    }
    const auto limit = static_cast<std::uint16_t>(vocab_size_);
    for (std::uint64_t i = 0; i < num_tokens_; ++i) {
      const std::uint16_t token = token_at(i);
      if (token >= limit) {
        throw InputError(path_, fmt::format("token {}", i),
                         fmt::format("a token id < vocab_size {}", vocab_size_),
                         std::to_string(token),
                         "was the file tokenized for a different vocabulary than the model's?");
      }
    }
  }

  std::string path_;
  FileMapping mapping_;
  std::int64_t vocab_size_;
  std::int64_t seq_length_;
  const unsigned char* tokens_ = nullptr; // num_tokens_ little-endian uint16, 2-byte aligned
  std::uint64_t num_tokens_ = 0;
};

} // namespace

std::unique_ptr<TokenSource> make_synthetic_source(std::int64_t vocab_size, std::uint64_t seed,
                                                   double structure) {
  constexpr auto kMaxVocab = static_cast<std::int64_t>(std::numeric_limits<std::int32_t>::max());
  PARALLAX_CHECK(vocab_size >= 1 && vocab_size <= kMaxVocab,
                 fmt::format("vocab_size {} is outside [1, {}]", vocab_size, kMaxVocab));
  if (!(structure >= 0.0 && structure <= 1.0)) { // also rejects NaN
    throw InputError(fmt::format("synthetic(seed={})", seed), "structure",
                     "a probability in [0, 1]", fmt::format("{}", structure),
                     "structure is the probability that a token is followed by its successor");
  }
  return std::make_unique<SyntheticSource>(vocab_size, seed, structure);
}

std::unique_ptr<TokenSource> open_token_file(const std::filesystem::path& path,
                                             std::int64_t vocab_size, std::int64_t seq_length) {
  PARALLAX_CHECK(vocab_size >= 1, fmt::format("vocab_size {} is not positive", vocab_size));
  PARALLAX_CHECK(seq_length >= 1, fmt::format("seq_length {} is not positive", seq_length));
  return std::make_unique<TokenFileSource>(path, vocab_size, seq_length);
}

} // namespace parallax
