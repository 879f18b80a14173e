// Runs the parallax binary as a user would and checks exit codes and output.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <string>

namespace {

struct Result {
  int code;
  std::string out;
};

Result run(const std::string& args) {
  std::string command = std::string(PARALLAX_BINARY) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf{};
  while (pipe != nullptr && fgets(buf.data(), buf.size(), pipe) != nullptr) {
    out += buf.data();
  }
  int status = pipe != nullptr ? pclose(pipe) : -1;
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

TEST(Cli, ModelsListsTheZooFromAnyDirectory) {
  Result r = run("models");
  EXPECT_EQ(r.code, 0) << r.out;
  for (const char* name : {"gpt3-175b", "llama3-405b", "megatron-1t", "bert-large", "gpt-tiny"}) {
    EXPECT_NE(r.out.find(name), std::string::npos) << name;
  }
  Result elsewhere = run("clusters");
  EXPECT_EQ(elsewhere.code, 0);
  EXPECT_NE(elsewhere.out.find("dgx-h100"), std::string::npos);
}

TEST(Cli, UnknownSubcommandAndFlagsFail) {
  EXPECT_NE(run("frobnicate").code, 0);
  EXPECT_NE(run("").code, 0);
  EXPECT_NE(run("models --no-such-flag").code, 0);
}

} // namespace
