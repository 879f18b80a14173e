#include "parallax/core/atomic_file.hpp"

#include <fmt/format.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <utility>

#include <fcntl.h>
#include <unistd.h>

namespace parallax {

namespace {

[[noreturn]] void throw_io_error(const std::string& what, std::string_view action,
                                 const std::filesystem::path& path, int err) {
  throw std::runtime_error(
      fmt::format("{}: {} '{}' failed: {}", what, action, path.string(), std::strerror(err)));
}

} // namespace

void fsync_directory(const std::filesystem::path& dir, const std::string& what) {
  const std::filesystem::path target = dir.empty() ? std::filesystem::path(".") : dir;
  const int fd = ::open(target.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    throw_io_error(what, "opening directory", target, errno);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    throw_io_error(what, "fsync of directory", target, err);
  }
  if (::close(fd) != 0) {
    throw_io_error(what, "closing directory", target, errno);
  }
}

AtomicFile::AtomicFile(std::filesystem::path target, std::string what)
    : target_(std::move(target)), what_(std::move(what)) {
  static std::atomic<std::uint64_t> counter{0};
  temp_ = target_.parent_path() / fmt::format(".{}.tmp.{}.{}", target_.filename().string(),
                                              ::getpid(), counter.fetch_add(1));
  fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    throw_io_error(what_, "creating", temp_, errno);
  }
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
  }
  if (!committed_) {
    ::unlink(temp_.c_str());
  }
}

void AtomicFile::write(const void* data, std::size_t bytes) {
  const auto* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd_, p, bytes);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw_io_error(what_, "writing", temp_, errno);
    }
    p += n;
    bytes -= static_cast<std::size_t>(n);
  }
}

// Data on disk, then the name: fsync, close, rename, fsync of the directory.
void AtomicFile::commit() {
  if (::fsync(fd_) != 0) {
    throw_io_error(what_, "fsync of", temp_, errno);
  }
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) {
    throw_io_error(what_, "closing", temp_, errno);
  }
  if (::rename(temp_.c_str(), target_.c_str()) != 0) {
    throw_io_error(what_, fmt::format("renaming to '{}'", target_.string()), temp_, errno);
  }
  committed_ = true;
  fsync_directory(target_.parent_path(), what_);
}

} // namespace parallax
