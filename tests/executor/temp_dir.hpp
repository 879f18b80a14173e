// A fresh directory per test (named after the test and the process), removed afterwards.
#pragma once

#include <gtest/gtest.h>

#include <fmt/format.h>

#include <filesystem>
#include <string_view>
#include <system_error>

#include <unistd.h>

namespace parallax_test {

class TempDir {
public:
  explicit TempDir(std::string_view prefix) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::temp_directory_path() /
            fmt::format("{}_{}_{}_{}", prefix, ::getpid(), info->test_suite_name(), info->name());
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

private:
  std::filesystem::path path_;
};

} // namespace parallax_test
