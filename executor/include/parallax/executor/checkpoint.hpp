// Plan-independent training checkpoints: the logical (unsharded) tensors, their AdamW moments,
// the step and the data position. Any plan and rank count can resume from any checkpoint of
// the same model.
//
// On disk, a checkpoint directory holds step-<8 digits>.ckpt files and a `latest` file naming
// the newest. Each .ckpt is one file: an 8-byte magic "PLXCKPT1", a little-endian uint64 length
// of a JSON manifest, the manifest (step, samples, seed, model, extra, and for each tensor its
// name, shape, byte offset and CRC-32 of each of its three arrays), then the raw float32
// arrays. Writes are atomic: temporary file in the same directory, fsync, rename, fsync of the
// directory, then `latest` is replaced the same way — a process killed at any moment leaves
// either the previous or the new checkpoint, never a torn one.
#pragma once

#include "parallax/core/json_reader.hpp"

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace parallax {

struct CheckpointTensor {
  std::string name;                // logical parameter name, e.g. "block3.attn.wq"
  std::vector<std::int64_t> shape; // logical shape
  std::vector<float> value;        // product(shape) elements each
  std::vector<float> exp_avg;
  std::vector<float> exp_avg_sq;
  bool operator==(const CheckpointTensor&) const = default;
};

struct Checkpoint {
  std::int64_t step = 0;    // optimizer steps completed
  std::int64_t samples = 0; // global samples consumed
  std::uint64_t seed = 0;
  std::string model;           // model name, checked on resume
  Json extra = Json::object(); // free-form: plan, lr schedule, data source
  std::vector<CheckpointTensor> tensors;
  bool operator==(const Checkpoint&) const = default;
};

// Writes `dir`/step-XXXXXXXX.ckpt atomically, points `latest` at it, then deletes all but the
// newest `keep` checkpoints (keep ≥ 1). Creates `dir` if needed. Returns the file written.
std::filesystem::path write_checkpoint(const std::filesystem::path& dir, const Checkpoint& ckpt,
                                       int keep = 2);

// Reads and verifies one .ckpt file (magic, manifest fields, sizes, CRCs). Throws InputError
// naming the file and what is wrong.
Checkpoint read_checkpoint(const std::filesystem::path& file);

// The checkpoint `latest` names in `dir`; nullopt when `dir` or `latest` does not exist.
// Throws InputError when `latest` names a missing or corrupt file.
std::optional<Checkpoint> read_latest_checkpoint(const std::filesystem::path& dir);

} // namespace parallax
