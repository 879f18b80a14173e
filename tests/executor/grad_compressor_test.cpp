// The compressed all-reduce against hand-computed results, over a fake group of n ranks that
// all hold the same gradient (a sum is n times it; a gather is n copies).
#include <gtest/gtest.h>

#include "parallax/executor/grad_compression.hpp"

#include <Eigen/Dense>

#include <cmath>
#include <numeric>
#include <random>

namespace {

using namespace parallax;

class Replicas final : public Communicator {
public:
  explicit Replicas(int n) : n_(n) {}
  int rank() const override { return 0; }
  int size() const override { return n_; }
  const std::string& name() const override { return name_; }
  CommRequest iall_reduce_sum(std::span<float> d) override {
    for (float& v : d)
      v *= static_cast<float>(n_);
    ++reductions;
    bytes += d.size_bytes();
    return {};
  }
  CommRequest iall_reduce_sum_bf16(std::span<std::uint16_t> d) override {
    for (auto& v : d) {
      float s = 0;
      for (int i = 0; i < n_; ++i)
        s = bf16_to_float(float_to_bf16(s + bf16_to_float(v)));
      v = float_to_bf16(s);
    }
    bytes += d.size_bytes();
    return {};
  }
  CommRequest iall_gather(std::span<const float> in, std::span<float> out) override {
    for (int i = 0; i < n_; ++i)
      std::copy(in.begin(), in.end(), out.begin() + static_cast<std::ptrdiff_t>(i * in.size()));
    bytes += in.size_bytes();
    return {};
  }
  CommRequest iall_reduce_max(std::span<float>) override { return unused(); }
  CommRequest ireduce_scatter_sum(std::span<const float>, std::span<float>) override {
    return unused();
  }
  CommRequest ibroadcast(std::span<float>, int) override { return unused(); }
  CommRequest ireduce_sum(std::span<float>, int) override { return unused(); }
  CommRequest iall_to_allv(std::span<const float>, std::span<const int>, std::span<float>,
                           std::span<const int>) override {
    return unused();
  }
  CommRequest isend(std::span<const float>, int, int) override { return unused(); }
  CommRequest irecv(std::span<float>, int, int) override { return unused(); }
  CommRequest ibarrier() override { return unused(); }
  void all_reduce_sum(std::span<double>) override { unused(); }
  void all_reduce_max(std::span<double>) override { unused(); }
  std::vector<std::string> gather_strings(const std::string&, int) override {
    unused();
    return {};
  }
  int reductions = 0;
  std::size_t bytes = 0;

private:
  static CommRequest unused() {
    ADD_FAILURE() << "the compressor used a collective it should not need";
    return {};
  }
  int n_;
  std::string name_ = "dp";
};

// One matrix of rows × cols (a weight) and a bias of `bias` elements after it.
BlockLayout layout(std::int64_t rows, std::int64_t cols, std::int64_t bias) {
  BlockLayout l;
  l.params.push_back({.name = "w",
                      .rows = rows,
                      .cols = cols,
                      .local_rows = rows,
                      .local_cols = cols,
                      .offset = 0});
  l.params.push_back({.name = "b",
                      .rows = 1,
                      .cols = bias,
                      .local_rows = 1,
                      .local_cols = bias,
                      .offset = rows * cols});
  l.numel = rows * cols + bias;
  l.padded = l.numel;
  return l;
}

std::vector<float> random_values(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v)
    x = normal(rng);
  return v;
}

TEST(GradCompressor, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))),
            1.0f + std::ldexp(1.0f, -6));
  EXPECT_EQ(bf16_to_float(float_to_bf16(-2.5f)), -2.5f);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

TEST(GradCompressor, Bf16SumsSixteenBitMessages) {
  Replicas group(2);
  GradCompressor c({.kind = CompressionKind::bf16}, true, layout(4, 4, 4), 1);
  std::vector<float> g = {1.0f + std::ldexp(1.0f, -10), 3.0f};
  g.resize(20, 0.5f);
  EXPECT_DOUBLE_EQ(c.all_reduce(group, g), 20 * 2.0);
  EXPECT_EQ(g[0], 2.0f); // the 2^-10 does not survive 16 bits
  EXPECT_EQ(g[1], 6.0f);
  EXPECT_TRUE(c.residual().empty()); // lossless enough to keep nothing back
}

TEST(GradCompressor, TopkSendsTheLargestAndKeepsTheRest) {
  Replicas group(3);
  GradCompressor c({.kind = CompressionKind::topk, .fraction = 0.25}, true, layout(2, 4, 4), 1);
  std::vector<float> g = {0.1f, -5.0f, 0.2f, 0.3f, 4.0f,  -0.4f,
                          0.5f, 0.6f,  0.7f, 0.8f, -3.0f, 0.9f};
  const std::vector<float> m = g;
  // k = 3 of 12: -5, 4 and -3, as (index, value) pairs.
  EXPECT_DOUBLE_EQ(c.all_reduce(group, g), 3 * 2 * 4.0);
  for (std::size_t i = 0; i < g.size(); ++i) {
    const bool sent = i == 1 || i == 4 || i == 10;
    EXPECT_FLOAT_EQ(g[i], sent ? 3 * m[i] : 0.0f) << i;
    EXPECT_FLOAT_EQ(c.residual()[i], sent ? 0.0f : m[i]) << i;
  }
  // Next step: the kept values join the new gradient.
  std::vector<float> zero(12, 0.0f);
  c.all_reduce(group, zero);
  EXPECT_FLOAT_EQ(zero[11], 3 * 0.9f);
  EXPECT_FLOAT_EQ(zero[9], 3 * 0.8f);
  EXPECT_FLOAT_EQ(zero[8], 3 * 0.7f);
}

TEST(GradCompressor, ErrorFeedbackDeliversEveryCoordinateOverTime) {
  // A constant gradient: with error feedback the sum of what was sent over T steps is T·g less
  // the residual (every coordinate gets through); without it the small ones never do.
  const std::vector<float> g = random_values(40, 3);
  for (bool ef : {true, false}) {
    Replicas group(1);
    GradCompressor c({.kind = CompressionKind::topk, .fraction = 0.1}, ef, layout(4, 8, 8), 1);
    std::vector<double> sent(g.size(), 0.0);
    const int steps = 1000; // the smallest |g| needs ~ max|g| / min|g| steps
    for (int t = 0; t < steps; ++t) {
      std::vector<float> step = g;
      c.all_reduce(group, step);
      for (std::size_t i = 0; i < g.size(); ++i)
        sent[i] += step[i];
    }
    int never = 0;
    for (std::size_t i = 0; i < g.size(); ++i) {
      never += sent[i] == 0.0 ? 1 : 0;
      if (ef) {
        EXPECT_NEAR(sent[i] + c.residual()[i], steps * g[i], 1e-3 * steps) << i;
      }
    }
    EXPECT_EQ(never, ef ? 0 : 36); // without error feedback only the 4 largest ever go
  }
}

TEST(GradCompressor, PowerSgdIsExactOnMatricesOfLowRank) {
  // A rank-2 matrix under powersgd:2: P̂ spans its columns, P̂·P̂ᵀ·M = M, nothing is kept back.
  const Eigen::Index rows = 12, cols = 10;
  const auto u = random_values(rows * 2, 5);
  const auto v = random_values(cols * 2, 6);
  Eigen::MatrixXf m = Eigen::Map<const Eigen::MatrixXf>(u.data(), rows, 2) *
                      Eigen::Map<const Eigen::MatrixXf>(v.data(), cols, 2).transpose();
  std::vector<float> g(static_cast<std::size_t>(rows * cols + 5));
  Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(g.data(), rows,
                                                                                    cols) = m;
  for (int i = 0; i < 5; ++i)
    g[static_cast<std::size_t>(rows * cols + i)] = 0.25f * static_cast<float>(i);
  const std::vector<float> before = g;
  Replicas group(2);
  GradCompressor c({.kind = CompressionKind::powersgd, .rank = 2}, true, layout(rows, cols, 5), 9);
  // Two all-reduces: P (12·2) with the bias (5), then Q (10·2).
  EXPECT_DOUBLE_EQ(c.all_reduce(group, g), (rows * 2 + 5 + cols * 2) * 4.0);
  EXPECT_EQ(group.reductions, 2);
  for (std::size_t i = 0; i < g.size(); ++i) {
    EXPECT_NEAR(g[i], 2 * before[i], 1e-4) << i;
    EXPECT_NEAR(c.residual()[i], 0.0f, 1e-4) << i;
  }
}

TEST(GradCompressor, PowerSgdKeepsWhatRankOneMisses) {
  const Eigen::Index rows = 16, cols = 8;
  std::vector<float> g = random_values(rows * cols + 3, 11);
  const std::vector<float> before = g;
  Replicas group(1);
  GradCompressor c({.kind = CompressionKind::powersgd, .rank = 1}, true, layout(rows, cols, 3), 2);
  c.all_reduce(group, g);
  double sent = 0, kept = 0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    // What went plus what stayed is the gradient (one rank: the sum is its own message).
    EXPECT_NEAR(g[i] + c.residual()[i], before[i], 1e-4) << i;
    sent += g[i] * g[i];
    kept += c.residual()[i] * c.residual()[i];
  }
  EXPECT_GT(kept, 0.1 * sent); // a random matrix is far from rank 1
  // The bias went whole.
  for (std::size_t i = static_cast<std::size_t>(rows * cols); i < g.size(); ++i)
    EXPECT_EQ(g[i], before[i]);
}

TEST(GradCompressor, WithoutErrorFeedbackNothingIsKept) {
  Replicas group(2);
  GradCompressor c({.kind = CompressionKind::powersgd, .rank = 1}, false, layout(8, 8, 2), 2);
  std::vector<float> g = random_values(66, 4);
  c.all_reduce(group, g);
  EXPECT_TRUE(c.residual().empty());
}

} // namespace
