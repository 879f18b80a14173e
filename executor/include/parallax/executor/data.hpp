// Training data for the executor: where the tokens of sample i come from.
//
// A sample is seq_length + 1 consecutive tokens (inputs and shifted targets). Samples are
// numbered globally: iteration k of a run with global batch B uses samples k·B … k·B + B − 1,
// and data-parallel rank d takes the contiguous block d·(B/dp) … (d+1)·(B/dp) − 1 of them, so
// the data a run sees depends only on the step and the global batch, never on the plan.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>

namespace parallax {

class TokenSource {
public:
  virtual ~TokenSource() = default;
  // Writes the seq_length + 1 tokens of global sample `sample` into `out` (out.size() is
  // seq_length + 1). Every value is in [0, vocab_size).
  virtual void sample(std::int64_t sample, std::span<std::int32_t> out) const = 0;
  // Human-readable origin, e.g. "synthetic(seed=1)" or the file path.
  virtual std::string describe() const = 0;
};

// Deterministic synthetic stream with learnable structure: a seeded random successor table
// gives each token a preferred next token, followed with probability `structure` (default 0.9);
// otherwise the next token is uniform noise. Counter-based hashing (seed, sample, position) makes
// any sample computable on its own. The optimal loss is far below ln(vocab), so loss must fall.
std::unique_ptr<TokenSource> make_synthetic_source(std::int64_t vocab_size, std::uint64_t seed,
                                                   double structure = 0.9);

// A file of uint16 tokens, memory-mapped read-only: either raw (nanoGPT's train.bin) or with
// llm.c's 256 × int32 header (magic 20240520, version 1, header[2] = token count). Sample i
// starts at token (i · seq_length) mod (n − seq_length − 1), so it wraps around the file.
// Throws InputError naming the file when it is missing, unreadable, shorter than one sample,
// not a whole number of uint16 tokens, has a corrupt llm.c header (bad version, count not
// matching the file size), or holds a token ≥ vocab_size (checked on open, reporting the token
// offset).
std::unique_ptr<TokenSource> open_token_file(const std::filesystem::path& path,
                                             std::int64_t vocab_size, std::int64_t seq_length);

} // namespace parallax
