// The one atomic file writer, for JSON, reports and checkpoints: data goes to a unique
// temporary next to the target, then fsync of the file, rename over the target, fsync of the
// directory — a crash leaves the old file or the new one, never a torn one. Destroyed without
// commit() (an exception on the way), it removes the temporary.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace parallax {

class AtomicFile {
public:
  // `what` prefixes error messages (e.g. "checkpoint"). Errors are std::runtime_error naming
  // the action, the path and the system's reason.
  explicit AtomicFile(std::filesystem::path target, std::string what = "file");
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t bytes);
  void commit();

private:
  std::filesystem::path target_;
  std::filesystem::path temp_;
  std::string what_;
  int fd_ = -1;
  bool committed_ = false;
};

// fsync of a directory (after a rename in it), so the new name survives a crash.
void fsync_directory(const std::filesystem::path& dir, const std::string& what = "file");

} // namespace parallax
