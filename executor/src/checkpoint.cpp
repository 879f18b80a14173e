// Checkpoint files: writing atomically, reading with full verification, keeping the newest N.
//
// Layout of one step-XXXXXXXX.ckpt (all integers little-endian):
//   bytes [0, 8)       magic "PLXCKPT1"
//   bytes [8, 16)      uint64 M, the manifest length in bytes
//   bytes [16, 16+M)   manifest, compact JSON:
//                        {"step", "samples", "seed", "model", "extra", "data_bytes",
//                         "tensors": [{"name", "shape",
//                                      "value":      {"offset_bytes", "crc32"},
//                                      "exp_avg":    {"offset_bytes", "crc32"},
//                                      "exp_avg_sq": {"offset_bytes", "crc32"}}, ...]}
//   bytes [16+M, end)  data area of data_bytes bytes: float32 arrays of product(shape) elements;
//                      offset_bytes counts from the start of the data area, crc32 is the
//                      CRC-32 (IEEE, as zlib) of the array's bytes.
#include "parallax/executor/checkpoint.hpp"

#include "parallax/core/atomic_file.hpp"
#include "parallax/core/error.hpp"

#include <boost/crc.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <utility>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace parallax {

namespace {

static_assert(std::endian::native == std::endian::little,
              "checkpoints store little-endian integers and float32 arrays as raw bytes");

constexpr std::string_view kMagic = "PLXCKPT1";
constexpr std::size_t kPreambleBytes = 16; // magic + uint64 manifest length
constexpr std::string_view kLatestName = "latest";
constexpr std::array<std::string_view, 3> kArrayNames = {"value", "exp_avg", "exp_avg_sq"};

// The three arrays of a tensor, in kArrayNames order.
std::array<const std::vector<float>*, 3> arrays_of(const CheckpointTensor& t) {
  return {&t.value, &t.exp_avg, &t.exp_avg_sq};
}
std::array<std::vector<float>*, 3> arrays_of(CheckpointTensor& t) {
  return {&t.value, &t.exp_avg, &t.exp_avg_sq};
}

std::uint32_t crc32_of(const void* data, std::size_t bytes) {
  boost::crc_32_type crc;
  crc.process_bytes(data, bytes);
  return crc.checksum();
}

std::string checkpoint_file_name(std::int64_t step) {
  return fmt::format("step-{:08d}.ckpt", step);
}

// The step of a name "step-<digits>.ckpt", or nullopt for any other name.
std::optional<std::int64_t> parse_checkpoint_name(std::string_view name) {
  constexpr std::string_view kPrefix = "step-";
  constexpr std::string_view kSuffix = ".ckpt";
  if (name.size() <= kPrefix.size() + kSuffix.size() || !name.starts_with(kPrefix) ||
      !name.ends_with(kSuffix)) {
    return std::nullopt;
  }
  const std::string_view digits =
      name.substr(kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  if (digits.size() > 18) {
    return std::nullopt;
  }
  std::int64_t step = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') {
      return std::nullopt;
    }
    step = step * 10 + (c - '0');
  }
  return step;
}

// ---- POSIX I/O -------------------------------------------------------------------------------

[[noreturn]] void throw_io_error(std::string_view action, const std::filesystem::path& path,
                                 int err) {
  throw std::runtime_error(
      fmt::format("checkpoint: {} '{}' failed: {}", action, path.string(), std::strerror(err)));
}

// An open file for reading, closed on destruction.
class ReadFile {
public:
  explicit ReadFile(const std::filesystem::path& path) : name_(path.string()) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      const int err = errno;
      if (err == ENOENT) {
        throw InputError(name_, "", "an existing checkpoint file", "no such file");
      }
      throw InputError(name_, "", "a readable checkpoint file",
                       fmt::format("a file that cannot be opened ({})", std::strerror(err)));
    }
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      ::close(fd_);
      throw InputError(name_, "", "a readable checkpoint file",
                       fmt::format("a file that cannot be inspected ({})", std::strerror(err)));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd_);
      throw InputError(name_, "", "a checkpoint file",
                       S_ISDIR(st.st_mode) ? "a directory" : "not a regular file");
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
  }
  ~ReadFile() { ::close(fd_); }
  ReadFile(const ReadFile&) = delete;
  ReadFile& operator=(const ReadFile&) = delete;

  std::uint64_t size() const { return size_; }

  // Reads exactly `bytes` at `offset`; the caller has checked that they lie within size().
  void read(std::uint64_t offset, void* data, std::size_t bytes) const {
    auto* p = static_cast<char*>(data);
    while (bytes > 0) {
      const ssize_t n = ::pread(fd_, p, bytes, static_cast<off_t>(offset));
      if (n < 0) {
        if (errno == EINTR) {
          continue;
        }
        throw_io_error("reading", name_, errno);
      }
      if (n == 0) {
        throw InputError(name_, "size", fmt::format("at least {} bytes", offset + bytes),
                         fmt::format("{} bytes: the file shrank while being read", offset),
                         "is another process writing it?");
      }
      p += n;
      bytes -= static_cast<std::size_t>(n);
      offset += static_cast<std::uint64_t>(n);
    }
  }

private:
  std::string name_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

[[noreturn]] void throw_truncated(const std::string& file, std::uint64_t expected_bytes,
                                  std::uint64_t found_bytes, std::string_view what) {
  throw InputError(file, "size", fmt::format("{} bytes ({})", expected_bytes, what),
                   fmt::format("{} bytes: the file is truncated", found_bytes),
                   "the file was cut short (incomplete copy, full disk?); resume from an older "
                   "checkpoint");
}

// Bytes as text for an error message: printable ASCII as is, the rest as \xNN.
std::string describe_bytes(std::string_view bytes) {
  std::string out = "\"";
  for (char c : bytes) {
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += c;
    } else {
      out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
    }
  }
  return out + "\"";
}

// ---- Writing ---------------------------------------------------------------------------------

std::uint64_t element_count(const CheckpointTensor& t) {
  std::uint64_t count = 1;
  for (std::int64_t dim : t.shape) {
    PARALLAX_CHECK(dim >= 0, fmt::format("tensor '{}' has a negative dimension", t.name));
    count *= static_cast<std::uint64_t>(dim);
  }
  return count;
}

// The manifest for `ckpt`, with offsets of the arrays laid out back to back in tensor order.
Json build_manifest(const Checkpoint& ckpt) {
  Json tensors = Json::array();
  std::set<std::string_view> names;
  std::uint64_t offset_bytes = 0;
  for (const CheckpointTensor& t : ckpt.tensors) {
    PARALLAX_CHECK(names.insert(t.name).second,
                   fmt::format("tensor name '{}' appears twice", t.name));
    const std::uint64_t count = element_count(t);
    Json entry = {{"name", t.name}, {"shape", t.shape}};
    const auto arrays = arrays_of(t);
    for (std::size_t a = 0; a < arrays.size(); ++a) {
      const std::vector<float>& array = *arrays[a];
      PARALLAX_CHECK(array.size() == count,
                     fmt::format("tensor '{}' {} holds {} elements, its shape {} elements", t.name,
                                 kArrayNames[a], array.size(), count));
      const std::size_t bytes = array.size() * sizeof(float);
      entry[std::string(kArrayNames[a])] = {{"offset_bytes", offset_bytes},
                                            {"crc32", crc32_of(array.data(), bytes)}};
      offset_bytes += bytes;
    }
    tensors.push_back(std::move(entry));
  }
  return {{"step", ckpt.step},
          {"samples", ckpt.samples},
          {"seed", ckpt.seed},
          {"model", ckpt.model},
          {"extra", ckpt.extra},
          {"data_bytes", offset_bytes},
          {"tensors", std::move(tensors)}};
}

void write_latest(const std::filesystem::path& dir, const std::string& file_name) {
  const std::string text = file_name + "\n";
  AtomicFile out(dir / kLatestName, "checkpoint");
  out.write(text.data(), text.size());
  out.commit();
}

// Deletes step-*.ckpt files beyond the `keep` highest steps; never the one `latest` names.
void prune_checkpoints(const std::filesystem::path& dir, int keep,
                       const std::string& written_name) {
  std::vector<std::pair<std::int64_t, std::filesystem::path>> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    std::error_code type_ec;
    if (auto step = parse_checkpoint_name(name); step && entry.is_regular_file(type_ec)) {
      found.emplace_back(*step, entry.path());
    }
  }
  if (ec) {
    throw std::runtime_error(fmt::format("checkpoint: listing '{}' to delete old checkpoints "
                                         "failed: {}",
                                         dir.string(), ec.message()));
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second > b.second;
  });
  for (std::size_t i = static_cast<std::size_t>(keep); i < found.size(); ++i) {
    const std::filesystem::path& path = found[i].second;
    if (path.filename() == written_name) {
      continue;
    }
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      throw_io_error("deleting old checkpoint (the new one is written)", path, errno);
    }
  }
}

// ---- Reading ---------------------------------------------------------------------------------

struct ArrayLocation {
  std::uint64_t offset_bytes = 0;
  std::uint32_t crc32 = 0;
  std::string crc_pointer; // JSON pointer of the crc32 field, for errors
};

struct TensorLocation {
  std::uint64_t count = 0; // elements per array
  std::array<ArrayLocation, 3> arrays;
};

// Reads the magic and the manifest length; returns the manifest text.
std::string read_manifest_text(const ReadFile& in, const std::string& file) {
  const std::uint64_t size = in.size();
  std::array<char, kPreambleBytes> preamble{};
  const auto head = static_cast<std::size_t>(std::min<std::uint64_t>(size, kPreambleBytes));
  in.read(0, preamble.data(), head);
  const std::string_view magic(preamble.data(), std::min(head, kMagic.size()));
  if (magic != kMagic.substr(0, magic.size())) {
    throw InputError(file, "magic", describe_bytes(kMagic), describe_bytes(magic),
                     "this is not a Parallax checkpoint (.ckpt) file");
  }
  if (size < kPreambleBytes) {
    throw_truncated(file, kPreambleBytes, size, "at least the magic and the manifest length");
  }
  std::uint64_t manifest_bytes = 0;
  std::memcpy(&manifest_bytes, preamble.data() + kMagic.size(), sizeof(manifest_bytes));
  if (manifest_bytes > size - kPreambleBytes) {
    throw_truncated(file, kPreambleBytes + manifest_bytes, size,
                    fmt::format("at least the {}-byte manifest", manifest_bytes));
  }
  std::string text(static_cast<std::size_t>(manifest_bytes), '\0');
  in.read(kPreambleBytes, text.data(), text.size());
  return text;
}

std::vector<std::int64_t> read_shape(const JsonReader& shape) {
  std::vector<std::int64_t> dims;
  for (std::size_t j = 0; j < shape.array_size(); ++j) {
    const JsonReader dim = shape.element(j);
    const Json& v = dim.value();
    if (!v.is_number_integer() || v.get<std::int64_t>() < 0) {
      dim.fail_here("a non-negative integer", json_describe(v));
    }
    dims.push_back(v.get<std::int64_t>());
  }
  return dims;
}

// The tensor's metadata into `tensor`, its array locations checked against the data area.
TensorLocation read_tensor_entry(const JsonReader& entry, std::uint64_t data_bytes,
                                 CheckpointTensor& tensor) {
  entry.reject_unknown({"name", "shape", "value", "exp_avg", "exp_avg_sq"});
  tensor.name = entry.string("name");
  const JsonReader shape = entry.array("shape");
  tensor.shape = read_shape(shape);
  TensorLocation location;
  location.count = 1;
  const std::uint64_t max_count = data_bytes / sizeof(float);
  for (std::int64_t dim : tensor.shape) {
    const auto d = static_cast<std::uint64_t>(dim);
    if (d != 0 && location.count > max_count / d) {
      shape.fail_here(fmt::format("a shape whose arrays fit in the {}-byte data area", data_bytes),
                      shape.value().dump());
    }
    location.count *= d;
  }
  const std::uint64_t array_bytes = location.count * sizeof(float);
  for (std::size_t a = 0; a < kArrayNames.size(); ++a) {
    const JsonReader array = entry.child(kArrayNames[a]);
    array.reject_unknown({"offset_bytes", "crc32"});
    const auto offset = static_cast<std::uint64_t>(array.integer("offset_bytes", 0));
    if (offset > data_bytes || array_bytes > data_bytes - offset) {
      array.fail("offset_bytes",
                 fmt::format("an offset where {} bytes fit in the {}-byte data area", array_bytes,
                             data_bytes),
                 std::to_string(offset));
    }
    const auto crc = static_cast<std::uint32_t>(
        array.integer("crc32", 0, std::numeric_limits<std::uint32_t>::max()));
    location.arrays[a] = {offset, crc, array.pointer_of("crc32")};
  }
  return location;
}

std::uint64_t read_seed(const JsonReader& root) {
  if (!root.has("seed")) {
    root.fail("seed", "a value (the field is required)", "nothing");
  }
  const Json& seed = root.value().at("seed");
  if (seed.is_number_unsigned()) {
    return seed.get<std::uint64_t>();
  }
  if (seed.is_number_integer() && seed.get<std::int64_t>() >= 0) {
    return static_cast<std::uint64_t>(seed.get<std::int64_t>());
  }
  root.fail("seed", "an unsigned 64-bit integer", json_describe(seed));
}

} // namespace

std::filesystem::path write_checkpoint(const std::filesystem::path& dir, const Checkpoint& ckpt,
                                       int keep) {
  PARALLAX_CHECK(keep >= 1, fmt::format("keep must be at least 1, not {}", keep));
  PARALLAX_CHECK(ckpt.step >= 0, fmt::format("step {} is negative", ckpt.step));
  const std::string manifest = build_manifest(ckpt).dump();
  const auto manifest_bytes = static_cast<std::uint64_t>(manifest.size());

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    throw std::runtime_error(
        fmt::format("checkpoint: creating directory '{}' failed: {}", dir.string(), ec.message()));
  }
  const std::string name = checkpoint_file_name(ckpt.step);
  const std::filesystem::path file = dir / name;
  {
    AtomicFile out(file, "checkpoint");
    out.write(kMagic.data(), kMagic.size());
    out.write(&manifest_bytes, sizeof(manifest_bytes));
    out.write(manifest.data(), manifest.size());
    for (const CheckpointTensor& t : ckpt.tensors) {
      for (const std::vector<float>* array : arrays_of(t)) {
        out.write(array->data(), array->size() * sizeof(float));
      }
    }
    out.commit();
  }
  write_latest(dir, name);
  prune_checkpoints(dir, keep, name);
  return file;
}

Checkpoint read_checkpoint(const std::filesystem::path& file) {
  const std::string name = file.string();
  const ReadFile in(file);
  const std::string text = read_manifest_text(in, name);
  const Json manifest = json_parse_text(text, name);
  const JsonReader root(manifest, name);
  root.reject_unknown({"step", "samples", "seed", "model", "extra", "data_bytes", "tensors"});

  Checkpoint ckpt;
  ckpt.step = root.integer("step", 0);
  ckpt.samples = root.integer("samples", 0);
  ckpt.seed = read_seed(root);
  ckpt.model = root.string("model");
  if (!manifest.contains("extra")) { // null is a valid value here
    root.fail("extra", "a value (the field is required)", "nothing");
  }
  ckpt.extra = manifest.at("extra");

  const auto data_bytes = static_cast<std::uint64_t>(root.integer("data_bytes", 0));
  const std::uint64_t data_start = kPreambleBytes + text.size();
  if (in.size() - data_start < data_bytes) {
    throw_truncated(name, data_start + data_bytes, in.size(),
                    fmt::format("header, manifest and {} bytes of data", data_bytes));
  }
  if (in.size() - data_start > data_bytes) {
    throw InputError(name, "size", fmt::format("{} bytes", data_start + data_bytes),
                     fmt::format("{} bytes: data after the last array", in.size()),
                     "the file is damaged or not a Parallax checkpoint");
  }

  const JsonReader tensors = root.array("tensors");
  std::set<std::string> names;
  ckpt.tensors.resize(tensors.array_size());
  for (std::size_t i = 0; i < ckpt.tensors.size(); ++i) {
    const JsonReader entry = tensors.element(i);
    CheckpointTensor& tensor = ckpt.tensors[i];
    const TensorLocation location = read_tensor_entry(entry, data_bytes, tensor);
    if (!names.insert(tensor.name).second) {
      entry.fail("name", "a name used by one tensor only",
                 fmt::format("\"{}\" again", tensor.name));
    }
    const auto arrays = arrays_of(tensor);
    for (std::size_t a = 0; a < arrays.size(); ++a) {
      std::vector<float>& array = *arrays[a];
      const ArrayLocation& at = location.arrays[a];
      array.resize(static_cast<std::size_t>(location.count));
      const std::size_t bytes = array.size() * sizeof(float);
      in.read(data_start + at.offset_bytes, array.data(), bytes);
      const std::uint32_t crc = crc32_of(array.data(), bytes);
      if (crc != at.crc32) {
        throw InputError(name, at.crc_pointer, fmt::format("CRC-32 {:#010x}", at.crc32),
                         fmt::format("CRC-32 {:#010x}: tensor '{}' {} is corrupt", crc, tensor.name,
                                     kArrayNames[a]),
                         "the file was damaged after it was written; resume from an older "
                         "checkpoint");
      }
    }
  }
  return ckpt;
}

std::optional<Checkpoint> read_latest_checkpoint(const std::filesystem::path& dir) {
  const std::filesystem::path latest = dir / kLatestName;
  std::error_code ec;
  if (!std::filesystem::exists(latest, ec)) {
    return std::nullopt; // also when `dir` does not exist
  }
  std::ifstream in(latest, std::ios::binary);
  if (!in) {
    throw InputError(latest.string(), "", "a readable file naming the newest checkpoint",
                     "a file that cannot be opened");
  }
  std::ostringstream buffer;
  buffer << in.rdbuf();
  std::string name = buffer.str();
  while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) {
    name.pop_back();
  }
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos) {
    throw InputError(latest.string(), "",
                     "the file name of a checkpoint in the same directory, e.g. "
                     "\"step-00000100.ckpt\"",
                     describe_bytes(name), "rewrite or remove `latest`");
  }
  const std::filesystem::path target = dir / name;
  if (!std::filesystem::exists(target, ec)) {
    throw InputError(latest.string(), "",
                     fmt::format("the name of an existing checkpoint in {}", dir.string()),
                     fmt::format("\"{}\", which does not exist", name),
                     "the checkpoint was deleted or moved; point `latest` at an existing "
                     "step-*.ckpt, or remove `latest` to start from scratch");
  }
  return read_checkpoint(target);
}

} // namespace parallax
