// Gradient checks for every CPU operator in parallax/executor/ops.hpp.
//
// Each backward is compared with central finite differences of a scalar objective
// L = Σ dy ⊙ f(x) for a random dy. The ops exist only in fp32, so the forward runs in fp32 while
// L and the differences are summed in double; the step (kStep = 1e-2) is large enough that fp32
// rounding in the forward stays far below the tolerance and small enough that the O(step²)
// truncation error does too. The check is on the whole gradient:
//   ‖analytic − numeric‖ / ‖numeric‖ < kGradTol.
// Correct ops land between 1e-8 and 4e-5; a sign error, a missing term or a transposed operand
// injected into ops.cpp gave 0.14..2, so kGradTol = 2e-3 separates the two with room both sides.
//
// Letters: n rows (tokens = B·s), h features, V vocab, d head_dim.
#include "parallax/core/error.hpp"
#include "parallax/executor/model.hpp"
#include "parallax/executor/ops.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numbers>
#include <random>
#include <span>
#include <vector>

namespace parallax {
namespace {

using Eigen::Index;
using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr float kStep = 1e-2f;
constexpr double kGradTol = 2e-3;

Tensor random_tensor(Index rows, Index cols, std::uint32_t seed, float lo = -1.0f,
                     float hi = 1.0f) {
  Tensor t(rows, cols);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  for (float& v : t.span())
    v = dist(rng);
  return t;
}

Tensor copy_of(ConstMatRef a) {
  Tensor t(a.rows, a.cols);
  std::copy(a.span().begin(), a.span().end(), t.data());
  return t;
}

MatD to_double(ConstMatRef a) {
  return a.m().cast<double>();
}

// Σ a ⊙ b, summed in double.
double dot(ConstMatRef a, ConstMatRef b) {
  return (to_double(a).array() * to_double(b).array()).sum();
}

// ∂objective/∂x for every element of x by central differences (x is perturbed in place and
// restored). The denominator is the step fp32 actually took.
std::vector<double> numeric_gradient(MatRef x, const std::function<double()>& objective) {
  std::vector<double> grad(static_cast<std::size_t>(x.size()));
  for (Index i = 0; i < x.size(); ++i) {
    float& xi = x.data[i];
    const float saved = xi;
    xi = saved + kStep;
    const double x_up = xi;
    const double l_up = objective();
    xi = saved - kStep;
    const double x_down = xi;
    const double l_down = objective();
    xi = saved;
    grad[static_cast<std::size_t>(i)] = (l_up - l_down) / (x_up - x_down);
  }
  return grad;
}

double relative_error(ConstMatRef analytic, const std::vector<double>& numeric) {
  double diff = 0.0;
  double ref = 0.0;
  for (std::size_t i = 0; i < numeric.size(); ++i) {
    const double d = static_cast<double>(analytic.data[i]) - numeric[i];
    diff += d * d;
    ref += numeric[i] * numeric[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(ref), 1e-30);
}

// The analytic gradient with respect to x agrees with finite differences of objective.
void expect_gradient(const char* what, MatRef x, ConstMatRef analytic,
                     const std::function<double()>& objective) {
  ASSERT_EQ(x.rows, analytic.rows) << what;
  ASSERT_EQ(x.cols, analytic.cols) << what;
  const double error = relative_error(analytic, numeric_gradient(x, objective));
  EXPECT_LT(error, kGradTol) << what << ": |analytic - numeric| / |numeric| = " << error;
}

void expect_near(ConstMatRef actual, const MatD& expected, double tol, const char* what) {
  ASSERT_EQ(actual.rows, expected.rows()) << what;
  ASSERT_EQ(actual.cols, expected.cols()) << what;
  for (Index r = 0; r < expected.rows(); ++r) {
    for (Index c = 0; c < expected.cols(); ++c) {
      EXPECT_NEAR(actual.m()(r, c), expected(r, c), tol)
          << what << " at (" << r << ", " << c << ")";
    }
  }
}

// ---------------------------------------------------------------------------------------------
// linear

// y[r][c] = Σ_k x[r][k]·w[k][c] (+ b[c]), as a plain triple loop in double.
MatD naive_linear(ConstMatRef x, ConstMatRef w, ConstMatRef b) {
  MatD y(x.rows, w.cols);
  for (Index r = 0; r < x.rows; ++r) {
    for (Index c = 0; c < w.cols; ++c) {
      double acc = b ? static_cast<double>(b.data[c]) : 0.0;
      for (Index k = 0; k < x.cols; ++k) {
        acc += static_cast<double>(x.data[r * x.cols + k]) * w.data[k * w.cols + c];
      }
      y(r, c) = acc;
    }
  }
  return y;
}

TEST(OpsLinear, ForwardMatchesNaiveLoop) {
  const Tensor x = random_tensor(5, 7, 1);
  const Tensor w = random_tensor(7, 3, 2);
  const Tensor b = random_tensor(1, 3, 3);
  Tensor y(5, 3);
  ops::linear_forward(x, w, b, y);
  expect_near(y, naive_linear(x, w, b), 1e-5, "with bias");
  ops::linear_forward(x, w, ConstMatRef{}, y);
  expect_near(y, naive_linear(x, w, ConstMatRef{}), 1e-5, "without bias");
}

TEST(OpsLinear, RejectsMismatchedShapes) {
  const Tensor x = random_tensor(5, 7, 1);
  const Tensor w = random_tensor(6, 3, 2);
  Tensor y(5, 3);
  EXPECT_THROW(ops::linear_forward(x, w, ConstMatRef{}, y), CheckError);
}

TEST(OpsLinear, GradientCheck) {
  Tensor x = random_tensor(5, 7, 11);
  Tensor w = random_tensor(7, 3, 12);
  Tensor b = random_tensor(1, 3, 13);
  const Tensor dy = random_tensor(5, 3, 14);
  Tensor dx(5, 7);
  Tensor dw(7, 3);
  Tensor db(1, 3);
  ops::linear_backward(x, w, dy, dx, dw, db);
  Tensor y(5, 3);
  const auto objective = [&] {
    ops::linear_forward(x, w, b, y);
    return dot(dy, y);
  };
  expect_gradient("dx", x, dx, objective);
  expect_gradient("dw", w, dw, objective);
  expect_gradient("db", b, db, objective);
}

TEST(OpsLinear, AccumulateDxAddsToExistingGradient) {
  const Tensor x = random_tensor(5, 7, 21);
  const Tensor w = random_tensor(7, 3, 22);
  const Tensor dy = random_tensor(5, 3, 23);
  Tensor dx_fresh = random_tensor(5, 7, 24); // overwritten, whatever it held
  Tensor dw(7, 3);
  ops::linear_backward(x, w, dy, dx_fresh, dw, MatRef{});
  expect_near(dx_fresh, to_double(dy) * to_double(w).transpose(), 1e-5, "overwritten dx");

  Tensor dx_acc = random_tensor(5, 7, 25);
  const Tensor before = copy_of(dx_acc);
  ops::linear_backward(x, w, dy, dx_acc, dw, MatRef{}, /*accumulate_dx=*/true);
  expect_near(dx_acc, to_double(before) + to_double(dx_fresh), 1e-5, "accumulated dx");
}

TEST(OpsLinear, AbsentDxAndBiasStillGiveWeightGradient) {
  const Tensor x = random_tensor(4, 6, 31);
  const Tensor w = random_tensor(6, 2, 32);
  const Tensor dy = random_tensor(4, 2, 33);
  Tensor dw(6, 2);
  ops::linear_backward(x, w, dy, MatRef{}, dw, MatRef{});
  expect_near(dw, to_double(x).transpose() * to_double(dy), 1e-5, "dw");
}

TEST(OpsLinear, ParameterGradientsAccumulateAcrossCalls) {
  const Tensor x1 = random_tensor(4, 6, 41);
  const Tensor x2 = random_tensor(4, 6, 42);
  const Tensor w = random_tensor(6, 3, 43);
  const Tensor dy1 = random_tensor(4, 3, 44);
  const Tensor dy2 = random_tensor(4, 3, 45);
  Tensor dx(4, 6);
  Tensor dw(6, 3);
  Tensor db(1, 3);
  ops::linear_backward(x1, w, dy1, dx, dw, db);
  ops::linear_backward(x2, w, dy2, dx, dw, db);
  const MatD dw_expected =
      to_double(x1).transpose() * to_double(dy1) + to_double(x2).transpose() * to_double(dy2);
  const MatD db_expected = to_double(dy1).colwise().sum() + to_double(dy2).colwise().sum();
  expect_near(dw, dw_expected, 1e-5, "dw after two calls");
  expect_near(db, db_expected, 1e-5, "db after two calls");
  expect_near(dx, to_double(dy2) * to_double(w).transpose(), 1e-5, "dx is the last call's");
}

// ---------------------------------------------------------------------------------------------
// layernorm, rmsnorm

constexpr float kNormEps = 1e-5f;

TEST(OpsLayerNorm, ForwardMatchesDoubleReference) {
  const Tensor x = random_tensor(4, 8, 51, -2.0f, 3.0f);
  const Tensor gamma = random_tensor(1, 8, 52);
  const Tensor beta = random_tensor(1, 8, 53);
  Tensor y(4, 8);
  Tensor mean(4, 1);
  Tensor rstd(4, 1);
  ops::layernorm_forward(x, gamma, beta, y, mean, rstd, kNormEps);
  const MatD xd = to_double(x);
  MatD expected(4, 8);
  for (Index r = 0; r < 4; ++r) {
    const double mu = xd.row(r).mean();
    const double var = (xd.row(r).array() - mu).square().mean();
    const double rs = 1.0 / std::sqrt(var + kNormEps);
    EXPECT_NEAR(mean.data()[r], mu, 1e-6);
    EXPECT_NEAR(rstd.data()[r], rs, 1e-5 * rs);
    expected.row(r) = (xd.row(r).array() - mu) * rs * to_double(gamma).row(0).array() +
                      to_double(beta).row(0).array();
  }
  expect_near(y, expected, 1e-5, "layernorm y");
}

TEST(OpsLayerNorm, GradientCheck) {
  Tensor x = random_tensor(4, 8, 61, -2.0f, 2.0f);
  Tensor gamma = random_tensor(1, 8, 62, 0.5f, 1.5f);
  Tensor beta = random_tensor(1, 8, 63);
  const Tensor dy = random_tensor(4, 8, 64);
  Tensor y(4, 8);
  Tensor mean(4, 1);
  Tensor rstd(4, 1);
  ops::layernorm_forward(x, gamma, beta, y, mean, rstd, kNormEps);
  Tensor dx(4, 8);
  Tensor dgamma(1, 8);
  Tensor dbeta(1, 8);
  ops::layernorm_backward(x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
  const auto objective = [&] {
    ops::layernorm_forward(x, gamma, beta, y, mean, rstd, kNormEps);
    return dot(dy, y);
  };
  expect_gradient("dx", x, dx, objective);
  expect_gradient("dgamma", gamma, dgamma, objective);
  expect_gradient("dbeta", beta, dbeta, objective);
}

TEST(OpsRmsNorm, ForwardMatchesDoubleReference) {
  const Tensor x = random_tensor(4, 8, 71, -2.0f, 3.0f);
  const Tensor gamma = random_tensor(1, 8, 72);
  Tensor y(4, 8);
  Tensor rstd(4, 1);
  ops::rmsnorm_forward(x, gamma, y, rstd, kNormEps);
  const MatD xd = to_double(x);
  MatD expected(4, 8);
  for (Index r = 0; r < 4; ++r) {
    const double rs = 1.0 / std::sqrt(xd.row(r).squaredNorm() / 8.0 + kNormEps);
    EXPECT_NEAR(rstd.data()[r], rs, 1e-5 * rs);
    expected.row(r) = xd.row(r).array() * rs * to_double(gamma).row(0).array();
  }
  expect_near(y, expected, 1e-5, "rmsnorm y");
}

TEST(OpsRmsNorm, GradientCheck) {
  Tensor x = random_tensor(4, 8, 81, -2.0f, 2.0f);
  Tensor gamma = random_tensor(1, 8, 82, 0.5f, 1.5f);
  const Tensor dy = random_tensor(4, 8, 83);
  Tensor y(4, 8);
  Tensor rstd(4, 1);
  ops::rmsnorm_forward(x, gamma, y, rstd, kNormEps);
  Tensor dx(4, 8);
  Tensor dgamma(1, 8);
  ops::rmsnorm_backward(x, gamma, rstd, dy, dx, dgamma);
  const auto objective = [&] {
    ops::rmsnorm_forward(x, gamma, y, rstd, kNormEps);
    return dot(dy, y);
  };
  expect_gradient("dx", x, dx, objective);
  expect_gradient("dgamma", gamma, dgamma, objective);
}

// ---------------------------------------------------------------------------------------------
// gelu, swiglu

TEST(OpsGelu, ForwardMatchesTanhFormula) {
  const Tensor x = random_tensor(3, 10, 91, -4.0f, 4.0f);
  Tensor y(3, 10);
  ops::gelu_forward(x, y);
  const double c = std::sqrt(2.0 / std::numbers::pi);
  const MatD xd = to_double(x);
  const MatD expected =
      (0.5 * xd.array() * (1.0 + (c * (xd.array() + 0.044715 * xd.array().cube())).tanh()))
          .matrix();
  expect_near(y, expected, 1e-5, "gelu y");
}

TEST(OpsGelu, GradientCheck) {
  Tensor x = random_tensor(3, 10, 101, -4.0f, 4.0f);
  const Tensor dy = random_tensor(3, 10, 102);
  Tensor dx(3, 10);
  ops::gelu_backward(x, dy, dx);
  Tensor y(3, 10);
  expect_gradient("dx", x, dx, [&] {
    ops::gelu_forward(x, y);
    return dot(dy, y);
  });
}

TEST(OpsSwiglu, ForwardMatchesFormula) {
  const Tensor gate = random_tensor(3, 10, 111, -4.0f, 4.0f);
  const Tensor up = random_tensor(3, 10, 112);
  Tensor y(3, 10);
  ops::swiglu_forward(gate, up, y);
  const MatD g = to_double(gate);
  const MatD expected = (g.array() / (1.0 + (-g.array()).exp()) * to_double(up).array()).matrix();
  expect_near(y, expected, 1e-5, "swiglu y");
}

TEST(OpsSwiglu, GradientCheck) {
  Tensor gate = random_tensor(3, 10, 121, -4.0f, 4.0f);
  Tensor up = random_tensor(3, 10, 122);
  const Tensor dy = random_tensor(3, 10, 123);
  Tensor dgate(3, 10);
  Tensor dup(3, 10);
  ops::swiglu_backward(gate, up, dy, dgate, dup);
  Tensor y(3, 10);
  const auto objective = [&] {
    ops::swiglu_forward(gate, up, y);
    return dot(dy, y);
  };
  expect_gradient("dgate", gate, dgate, objective);
  expect_gradient("dup", up, dup, objective);
}

// ---------------------------------------------------------------------------------------------
// rope

constexpr float kTheta = 10000.0f;
constexpr int kRopeHeadDim = 8;
constexpr Index kRopeWidth = 2 * Index{kRopeHeadDim}; // two heads
const std::vector<std::int32_t> kRopePositions = {0, 1, 2, 5, 3, 17};

TEST(OpsRope, RotatesHandComputedPairs) {
  // head_dim 4 with theta 100: pair (0, 2) turns by position·1, pair (1, 3) by position·0.1.
  Tensor x(1, 4);
  x.data()[0] = 1.0f;
  x.data()[1] = 1.0f;
  const std::vector<std::int32_t> position = {5};
  ops::rope_forward(x, 4, position, 100.0f);
  EXPECT_NEAR(x.data()[0], std::cos(5.0), 1e-5);
  EXPECT_NEAR(x.data()[2], std::sin(5.0), 1e-5);
  EXPECT_NEAR(x.data()[1], std::cos(0.5), 1e-5);
  EXPECT_NEAR(x.data()[3], std::sin(0.5), 1e-5);
}

TEST(OpsRope, PositionZeroIsIdentity) {
  const Tensor x = random_tensor(3, kRopeWidth, 131);
  Tensor y = copy_of(x);
  ops::rope_forward(y, kRopeHeadDim, std::vector<std::int32_t>(3, 0), kTheta);
  expect_near(y, to_double(x), 0.0, "rotation at position 0");
}

TEST(OpsRope, ForwardThenBackwardRestoresInput) {
  const Tensor x = random_tensor(6, kRopeWidth, 141);
  Tensor y = copy_of(x);
  ops::rope_forward(y, kRopeHeadDim, kRopePositions, kTheta);
  EXPECT_GT((to_double(y) - to_double(x)).norm(), 0.1);
  for (Index r = 0; r < 6; ++r) { // a rotation keeps every row's length
    EXPECT_NEAR(y.m().row(r).norm(), x.m().row(r).norm(), 1e-5);
  }
  ops::rope_backward(y, kRopeHeadDim, kRopePositions, kTheta);
  expect_near(y, to_double(x), 1e-5, "rope backward of forward");
}

TEST(OpsRope, PositionsMatter) {
  // The same vector placed at different positions comes out differently.
  Tensor x(4, kRopeHeadDim);
  const Tensor row = random_tensor(1, kRopeHeadDim, 151);
  for (Index r = 0; r < 4; ++r)
    x.m().row(r) = row.m().row(0);
  ops::rope_forward(x, kRopeHeadDim, std::vector<std::int32_t>{1, 2, 3, 3}, kTheta);
  EXPECT_GT((x.m().row(0) - x.m().row(1)).norm(), 1e-2);
  EXPECT_GT((x.m().row(1) - x.m().row(2)).norm(), 1e-2);
  EXPECT_EQ(x.m().row(2), x.m().row(3));
}

TEST(OpsRope, GradientCheck) {
  Tensor x = random_tensor(6, kRopeWidth, 161);
  const Tensor dy = random_tensor(6, kRopeWidth, 162);
  Tensor dx = copy_of(dy);
  ops::rope_backward(dx, kRopeHeadDim, kRopePositions, kTheta);
  Tensor y(6, kRopeWidth);
  expect_gradient("dx", x, dx, [&] {
    y.m() = x.m();
    ops::rope_forward(y, kRopeHeadDim, kRopePositions, kTheta);
    return dot(dy, y);
  });
}

// ---------------------------------------------------------------------------------------------
// attention

constexpr ops::AttentionShape kGqa{.batch = 2, .seq = 5, .heads = 4, .kv_heads = 2, .head_dim = 4};
constexpr ops::AttentionShape kMha{.batch = 2, .seq = 5, .heads = 2, .kv_heads = 2, .head_dim = 4};

struct AttentionInputs {
  Tensor q;
  Tensor k;
  Tensor v;
};

AttentionInputs random_attention_inputs(const ops::AttentionShape& s, std::uint32_t seed) {
  const Index n = s.batch * s.seq;
  return {random_tensor(n, Index{s.heads} * s.head_dim, seed, -1.5f, 1.5f),
          random_tensor(n, Index{s.kv_heads} * s.head_dim, seed + 1, -1.5f, 1.5f),
          random_tensor(n, Index{s.kv_heads} * s.head_dim, seed + 2)};
}

// out[b·s + i, h·d + e] = Σ_{j ≤ i} softmax_j(q_i·k_j/√d)·v_j[e], query head h reading kv head
// h / (heads / kv_heads); loops in double.
MatD naive_attention(const AttentionInputs& in, const ops::AttentionShape& s) {
  const MatD q = to_double(in.q);
  const MatD k = to_double(in.k);
  const MatD v = to_double(in.v);
  const Index d = s.head_dim;
  MatD out = MatD::Zero(q.rows(), q.cols());
  for (Index b = 0; b < s.batch; ++b) {
    for (Index h = 0; h < s.heads; ++h) {
      const Index kvh = h / (s.heads / s.kv_heads);
      for (Index i = 0; i < s.seq; ++i) {
        std::vector<double> score(static_cast<std::size_t>(i + 1));
        for (Index j = 0; j <= i; ++j) {
          score[static_cast<std::size_t>(j)] =
              q.row(b * s.seq + i).segment(h * d, d).dot(k.row(b * s.seq + j).segment(kvh * d, d)) /
              std::sqrt(static_cast<double>(d));
        }
        const double mx = *std::max_element(score.begin(), score.end());
        double total = 0.0;
        for (double& e : score)
          total += (e = std::exp(e - mx));
        for (Index j = 0; j <= i; ++j) {
          out.row(b * s.seq + i).segment(h * d, d) +=
              score[static_cast<std::size_t>(j)] / total * v.row(b * s.seq + j).segment(kvh * d, d);
        }
      }
    }
  }
  return out;
}

TEST(OpsAttention, ForwardMatchesNaiveReference) {
  for (const ops::AttentionShape& s : {kGqa, kMha}) {
    SCOPED_TRACE(s.heads);
    const AttentionInputs in = random_attention_inputs(s, 171);
    Tensor probs(s.batch * s.heads, s.seq * s.seq);
    Tensor out(in.q.rows(), in.q.cols());
    ops::attention_forward(in.q, in.k, in.v, s, probs, out);
    expect_near(out, naive_attention(in, s), 1e-5, "attention out");
  }
}

// Row i of one head's [s, s] probabilities: positive on keys 0..i, zero after, summing to 1.
void expect_causal_distribution(const ConstMatMap& p, Index i) {
  EXPECT_NEAR(p.row(i).sum(), 1.0f, 1e-6) << "query " << i;
  EXPECT_GT(p.row(i).head(i + 1).minCoeff(), 0.0f) << "query " << i;
  EXPECT_EQ(p.row(i).tail(p.cols() - i - 1).cwiseAbs().sum(), 0.0f) << "query " << i;
}

TEST(OpsAttention, ProbsRowsSumToOneAndAreCausal) {
  const AttentionInputs in = random_attention_inputs(kGqa, 181);
  Tensor probs(kGqa.batch * kGqa.heads, kGqa.seq * kGqa.seq);
  ops::attention_probs(in.q, in.k, kGqa, probs);
  for (Index bh = 0; bh < probs.rows(); ++bh) {
    const ConstMatMap p(probs.data() + bh * probs.cols(), kGqa.seq, kGqa.seq);
    for (Index i = 0; i < kGqa.seq; ++i)
      expect_causal_distribution(p, i);
  }
}

TEST(OpsAttention, FutureKeysAndValuesDoNotChangeEarlierOutputs) {
  const ops::AttentionShape& s = kGqa;
  AttentionInputs in = random_attention_inputs(s, 191);
  Tensor probs(s.batch * s.heads, s.seq * s.seq);
  Tensor before(in.q.rows(), in.q.cols());
  ops::attention_forward(in.q, in.k, in.v, s, probs, before);
  const Index t = 3; // token 3 of sequence 0
  in.k.m().row(t).array() += 2.0f;
  in.v.m().row(t).array() -= 3.0f;
  Tensor after(in.q.rows(), in.q.cols());
  ops::attention_forward(in.q, in.k, in.v, s, probs, after);
  for (Index r = 0; r < in.q.rows(); ++r) {
    const bool affected = r >= t && r < s.seq;
    const float change = (after.m().row(r) - before.m().row(r)).cwiseAbs().maxCoeff();
    if (affected) {
      EXPECT_GT(change, 1e-3f) << "row " << r;
    } else {
      EXPECT_EQ(change, 0.0f) << "row " << r;
    }
  }
}

void check_attention_gradients(const ops::AttentionShape& s, std::uint32_t seed) {
  AttentionInputs in = random_attention_inputs(s, seed);
  const Tensor dout = random_tensor(in.q.rows(), in.q.cols(), seed + 3);
  Tensor probs(s.batch * s.heads, s.seq * s.seq);
  Tensor out(in.q.rows(), in.q.cols());
  ops::attention_forward(in.q, in.k, in.v, s, probs, out);
  Tensor dq(in.q.rows(), in.q.cols());
  Tensor dk = random_tensor(in.k.rows(), in.k.cols(), seed + 4); // overwritten
  Tensor dv = random_tensor(in.v.rows(), in.v.cols(), seed + 5); // overwritten
  ops::attention_backward(in.q, in.k, in.v, probs, dout, s, dq, dk, dv);
  const auto objective = [&] {
    ops::attention_forward(in.q, in.k, in.v, s, probs, out);
    return dot(dout, out);
  };
  expect_gradient("dq", in.q, dq, objective);
  expect_gradient("dk", in.k, dk, objective);
  expect_gradient("dv", in.v, dv, objective);
}

TEST(OpsAttention, GradientCheckGroupedQuery) {
  check_attention_gradients(kGqa, 201);
}

TEST(OpsAttention, GradientCheckMultiHead) {
  check_attention_gradients(kMha, 211);
}

// The rows of `full` (batch sequences of seq rows) at positions `pos` of every sequence.
Tensor rows_at_positions(const Tensor& full, Index batch, Index seq,
                         const std::vector<std::int32_t>& pos) {
  const auto n = static_cast<Index>(pos.size());
  Tensor t(batch * n, full.cols());
  for (Index b = 0; b < batch; ++b)
    for (Index i = 0; i < n; ++i)
      t.m().row(b * n + i) = full.m().row(b * seq + pos[static_cast<std::size_t>(i)]);
  return t;
}

// Ring attention: a rank's queries folded over every rank's K/V block with the running softmax
// give its rows of whole-sequence attention, and the block backward gives its query gradient
// and, summed over the ranks, each block's key and value gradients.
TEST(OpsAttention, RingBlocksMatchWholeSequenceAttention) {
  const ops::AttentionShape s{.batch = 2, .seq = 8, .heads = 4, .kv_heads = 2, .head_dim = 4};
  const AttentionInputs in = random_attention_inputs(s, 231);
  const Tensor dout = random_tensor(in.q.rows(), in.q.cols(), 232);
  Tensor probs(s.batch * s.heads, s.seq * s.seq);
  Tensor out(in.q.rows(), in.q.cols());
  ops::attention_forward(in.q, in.k, in.v, s, probs, out);
  Tensor dq(in.q.rows(), in.q.cols());
  Tensor dk(in.k.rows(), in.k.cols());
  Tensor dv(in.v.rows(), in.v.cols());
  ops::attention_backward(in.q, in.k, in.v, probs, dout, s, dq, dk, dv);
  const int cp = 2;
  const auto rows = [&](const Tensor& full, const std::vector<std::int32_t>& pos) {
    return rows_at_positions(full, s.batch, s.seq, pos);
  };
  std::vector<Tensor> dk_block, dv_block; // zeros: the block backwards add
  for (int r = 0; r < cp; ++r) {
    dk_block.emplace_back(s.batch * s.seq / cp, in.k.cols());
    dv_block.emplace_back(s.batch * s.seq / cp, in.v.cols());
  }
  for (int r = 0; r < cp; ++r) {
    const std::vector<std::int32_t> pos = context_chunk_positions(s.seq, cp, r);
    ops::AttentionShape local = s;
    local.seq = s.seq / cp;
    local.q_positions = pos;
    const Tensor q = rows(in.q, pos);
    const Tensor d_o = rows(dout, pos);
    Tensor m(s.batch * s.heads, local.seq);
    m.m().setConstant(-std::numeric_limits<float>::infinity());
    Tensor l(s.batch * s.heads, local.seq);
    Tensor acc(q.rows(), q.cols());
    for (int src = 0; src < cp; ++src) {
      const std::vector<std::int32_t> kpos = context_chunk_positions(s.seq, cp, src);
      ops::attention_block_forward(q, rows(in.k, kpos), rows(in.v, kpos), local, kpos, m, l, acc);
    }
    Tensor lse(s.batch * s.heads, local.seq);
    ops::attention_block_finish(m, l, local, acc, lse);
    expect_near(acc, rows(out, pos).m().cast<double>(), 1e-6, "ring output");
    Tensor delta(s.batch * s.heads, local.seq);
    ops::attention_delta(d_o, acc, local, delta);
    Tensor dq_r(q.rows(), q.cols()); // zeros: the block backward adds
    for (int src = 0; src < cp; ++src) {
      const std::vector<std::int32_t> kpos = context_chunk_positions(s.seq, cp, src);
      ops::attention_block_backward(q, rows(in.k, kpos), rows(in.v, kpos), d_o, lse, delta, local,
                                    kpos, dq_r, dk_block[static_cast<std::size_t>(src)],
                                    dv_block[static_cast<std::size_t>(src)]);
    }
    expect_near(dq_r, rows(dq, pos).m().cast<double>(), 1e-5, "ring query gradient");
  }
  for (int src = 0; src < cp; ++src) {
    const std::vector<std::int32_t> kpos = context_chunk_positions(s.seq, cp, src);
    expect_near(dk_block[static_cast<std::size_t>(src)], rows(dk, kpos).m().cast<double>(), 1e-5,
                "ring key gradient");
    expect_near(dv_block[static_cast<std::size_t>(src)], rows(dv, kpos).m().cast<double>(), 1e-5,
                "ring value gradient");
  }
}

// Context parallelism with causal load balancing: chunks i and 2·cp − 1 − i of 2·cp, so every
// rank's queries see the same number of keys in all.
TEST(OpsAttention, ContextChunksBalanceTheCausalWork) {
  EXPECT_EQ(context_chunk_positions(8, 2, 0), (std::vector<std::int32_t>{0, 1, 6, 7}));
  EXPECT_EQ(context_chunk_positions(8, 2, 1), (std::vector<std::int32_t>{2, 3, 4, 5}));
  for (const int cp : {1, 2, 4, 8}) {
    std::vector<int> seen(64, 0);
    std::int64_t work0 = -1;
    for (int r = 0; r < cp; ++r) {
      std::int64_t work = 0;
      for (const std::int32_t p : context_chunk_positions(64, cp, r)) {
        ++seen[static_cast<std::size_t>(p)];
        work += p + 1; // keys a query at position p attends to
      }
      work0 = r == 0 ? work : work0;
      EXPECT_EQ(work, work0) << "cp " << cp << " rank " << r;
    }
    EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), 64) << "cp " << cp;
  }
  EXPECT_THROW(context_chunk_positions(10, 2, 0), std::logic_error); // 10 tokens, 4 chunks
}

// A context-parallel rank's queries (at their positions) against the keys of whole sequences
// give exactly those rows of whole-sequence attention, and the ranks' key / value gradients
// sum to the whole-sequence ones.
TEST(OpsAttention, QueriesAtPositionsAgainstWholeSequences) {
  const ops::AttentionShape s{.batch = 2, .seq = 8, .heads = 4, .kv_heads = 2, .head_dim = 4};
  const AttentionInputs in = random_attention_inputs(s, 221);
  const Tensor dout = random_tensor(in.q.rows(), in.q.cols(), 222);
  Tensor probs(s.batch * s.heads, s.seq * s.seq);
  Tensor out(in.q.rows(), in.q.cols());
  ops::attention_forward(in.q, in.k, in.v, s, probs, out);
  Tensor dq(in.q.rows(), in.q.cols());
  Tensor dk(in.k.rows(), in.k.cols());
  Tensor dv(in.v.rows(), in.v.cols());
  ops::attention_backward(in.q, in.k, in.v, probs, dout, s, dq, dk, dv);
  const int cp = 2;
  Tensor dk_sum(in.k.rows(), in.k.cols());
  Tensor dv_sum(in.v.rows(), in.v.cols());
  dk_sum.m().setZero();
  dv_sum.m().setZero();
  for (int r = 0; r < cp; ++r) {
    const std::vector<std::int32_t> pos = context_chunk_positions(s.seq, cp, r);
    ops::AttentionShape local = s;
    local.seq = static_cast<Index>(pos.size());
    local.kv_seq = s.seq;
    local.q_positions = pos;
    const auto rows = [&](const Tensor& full) {
      return rows_at_positions(full, s.batch, s.seq, pos);
    };
    const Tensor q = rows(in.q);
    const Tensor d_o = rows(dout);
    Tensor p(s.batch * s.heads, local.seq * s.seq);
    Tensor o(q.rows(), q.cols());
    ops::attention_forward(q, in.k, in.v, local, p, o);
    expect_near(o, rows(out).m().cast<double>(), 1e-6, "rank's attention output");
    Tensor dq_r(q.rows(), q.cols());
    Tensor dk_r(in.k.rows(), in.k.cols());
    Tensor dv_r(in.v.rows(), in.v.cols());
    ops::attention_backward(q, in.k, in.v, p, d_o, local, dq_r, dk_r, dv_r);
    expect_near(dq_r, rows(dq).m().cast<double>(), 1e-5, "rank's query gradient");
    dk_sum.m() += dk_r.m();
    dv_sum.m() += dv_r.m();
  }
  expect_near(dk_sum, dk.m().cast<double>(), 1e-5, "summed key gradients");
  expect_near(dv_sum, dv.m().cast<double>(), 1e-5, "summed value gradients");
}

// ---------------------------------------------------------------------------------------------
// embedding

// This rank holds vocabulary rows [4, 8); 2, 3, 8 and 9 belong to other ranks.
constexpr std::int64_t kVocabBegin = 4;
const std::vector<std::int32_t> kTokens = {5, 2, 7, 4, 9, 5, 8, 3, 5};

TEST(OpsEmbedding, ForwardTakesLocalRowsAndZerosOthers) {
  const Tensor table = random_tensor(4, 3, 221);
  Tensor out = random_tensor(9, 3, 222); // overwritten, zero rows included
  ops::embedding_forward(kTokens, table, kVocabBegin, out);
  for (Index r = 0; r < 9; ++r) {
    const std::int64_t local = kTokens[static_cast<std::size_t>(r)] - kVocabBegin;
    if (local >= 0 && local < 4) {
      EXPECT_EQ(out.m().row(r), table.m().row(local)) << "row " << r;
    } else {
      EXPECT_EQ(out.m().row(r).cwiseAbs().maxCoeff(), 0.0f) << "row " << r;
    }
  }
}

TEST(OpsEmbedding, BackwardScatterAddsDuplicates) {
  const Tensor dout = random_tensor(9, 3, 231);
  Tensor dtable(4, 3);
  ops::embedding_backward(kTokens, dout, kVocabBegin, dtable);
  const MatD g = to_double(dout);
  MatD expected = MatD::Zero(4, 3);
  expected.row(0) = g.row(3);                       // token 4
  expected.row(1) = g.row(0) + g.row(5) + g.row(8); // token 5, three times
  expected.row(2) = MatD::Zero(1, 3);               // token 6, unused
  expected.row(3) = g.row(2);                       // token 7
  expect_near(dtable, expected, 1e-6, "dtable");
}

TEST(OpsEmbedding, GradientCheck) {
  Tensor table = random_tensor(4, 3, 241);
  const Tensor dout = random_tensor(9, 3, 242);
  Tensor dtable(4, 3);
  ops::embedding_backward(kTokens, dout, kVocabBegin, dtable);
  Tensor out(9, 3);
  expect_gradient("dtable", table, dtable, [&] {
    ops::embedding_forward(kTokens, table, kVocabBegin, out);
    return dot(dout, out);
  });
}

// ---------------------------------------------------------------------------------------------
// cross-entropy

struct CrossEntropyPieces {
  Tensor max;
  Tensor sum;
  Tensor target;
};

CrossEntropyPieces cross_entropy_pieces(ConstMatRef logits, std::span<const std::int32_t> targets,
                                        std::int64_t vocab_begin) {
  CrossEntropyPieces p{Tensor(logits.rows, 1), Tensor(logits.rows, 1), Tensor(logits.rows, 1)};
  ops::row_max(logits, p.max);
  ops::row_sum_exp(logits, p.max, p.sum);
  ops::target_logits(logits, targets, vocab_begin, p.target);
  return p;
}

// loss_r = log S_r + M_r − l_r,target.
std::vector<double> losses_from_pieces(const CrossEntropyPieces& p) {
  std::vector<double> loss(static_cast<std::size_t>(p.max.rows()));
  for (std::size_t r = 0; r < loss.size(); ++r) {
    loss[r] = std::log(static_cast<double>(p.sum.data()[r])) + p.max.data()[r] - p.target.data()[r];
  }
  return loss;
}

// −log softmax(l)_target per row, directly in double.
std::vector<double> reference_losses(ConstMatRef logits, std::span<const std::int32_t> targets) {
  const MatD l = to_double(logits);
  std::vector<double> loss(static_cast<std::size_t>(l.rows()));
  for (Index r = 0; r < l.rows(); ++r) {
    const double mx = l.row(r).maxCoeff();
    const double lse = mx + std::log((l.row(r).array() - mx).exp().sum());
    loss[static_cast<std::size_t>(r)] = lse - l(r, targets[static_cast<std::size_t>(r)]);
  }
  return loss;
}

constexpr Index kCeRows = 6;
constexpr Index kCeVocab = 12;
const std::vector<std::int32_t> kCeTargets = {1, 7, 11, 5, 6, 0}; // 5 | 6 is the shard boundary

Tensor random_logits(std::uint32_t seed) {
  Tensor logits = random_tensor(kCeRows, kCeVocab, seed, -4.0f, 4.0f);
  logits.m().row(2).array() += 100.0f; // exp would overflow without the max shift
  return logits;
}

TEST(OpsCrossEntropy, UniformLogitsGiveLogV) {
  const Tensor logits(2, 4);
  const std::vector<std::int32_t> targets = {2, 0};
  const std::vector<double> loss = losses_from_pieces(cross_entropy_pieces(logits, targets, 0));
  EXPECT_NEAR(loss[0], std::log(4.0), 1e-6);
  EXPECT_NEAR(loss[1], std::log(4.0), 1e-6);
}

TEST(OpsCrossEntropy, PiecesComposeToLogSoftmaxLoss) {
  const Tensor logits = random_logits(251);
  const std::vector<double> loss = losses_from_pieces(cross_entropy_pieces(logits, kCeTargets, 0));
  const std::vector<double> expected = reference_losses(logits, kCeTargets);
  for (std::size_t r = 0; r < loss.size(); ++r)
    EXPECT_NEAR(loss[r], expected[r], 1e-5) << r;
}

TEST(OpsCrossEntropy, BackwardGradientCheck) {
  Tensor logits = random_logits(261);
  const float scale = 1.0f / static_cast<float>(kCeRows); // dL/dloss_r of a mean loss
  const CrossEntropyPieces p = cross_entropy_pieces(logits, kCeTargets, 0);
  Tensor dlogits(kCeRows, kCeVocab);
  ops::cross_entropy_backward(logits, p.max, p.sum, kCeTargets, 0, scale, dlogits);
  expect_gradient("dlogits", logits, dlogits, [&] {
    const std::vector<double> loss =
        losses_from_pieces(cross_entropy_pieces(logits, kCeTargets, 0));
    double total = 0.0;
    for (double l : loss)
      total += l;
    return scale * total;
  });
}

TEST(OpsCrossEntropy, VocabularySplitMatchesUnsplit) {
  const Tensor logits = random_logits(271);
  const float scale = 0.37f;
  const CrossEntropyPieces whole = cross_entropy_pieces(logits, kCeTargets, 0);
  Tensor dwhole(kCeRows, kCeVocab);
  ops::cross_entropy_backward(logits, whole.max, whole.sum, kCeTargets, 0, scale, dwhole);

  // Two tensor-parallel ranks, each holding half the vocabulary columns.
  constexpr Index kShardVocab = kCeVocab / 2;
  std::vector<Tensor> shard;
  for (Index k = 0; k < 2; ++k) {
    shard.emplace_back(kCeRows, kShardVocab);
    shard.back().m() = logits.m().middleCols(k * kShardVocab, kShardVocab);
  }
  const auto vocab_begin = [&](Index k) { return static_cast<std::int64_t>(k * kShardVocab); };
  // All-reduce(max) of the local maxima.
  Tensor global_max(kCeRows, 1);
  global_max.m().setConstant(-std::numeric_limits<float>::infinity());
  for (Index k = 0; k < 2; ++k) {
    Tensor local_max(kCeRows, 1);
    ops::row_max(shard[static_cast<std::size_t>(k)], local_max);
    global_max.m() = global_max.m().cwiseMax(local_max.m());
  }
  // Each rank sums exp(l − M_global) over its columns; all-reduce(sum) of those sums and of the
  // target logits (zero on the rank that does not own the target).
  Tensor global_sum(kCeRows, 1);
  CrossEntropyPieces split{copy_of(global_max), Tensor(kCeRows, 1), Tensor(kCeRows, 1)};
  for (Index k = 0; k < 2; ++k) {
    Tensor local_sum(kCeRows, 1);
    Tensor local_target(kCeRows, 1);
    ops::row_sum_exp(shard[static_cast<std::size_t>(k)], global_max, local_sum);
    ops::target_logits(shard[static_cast<std::size_t>(k)], kCeTargets, vocab_begin(k),
                       local_target);
    split.sum.m() += local_sum.m();
    split.target.m() += local_target.m();
  }

  EXPECT_EQ(split.max.m(), whole.max.m());
  EXPECT_EQ(split.target.m(), whole.target.m());
  const std::vector<double> loss_split = losses_from_pieces(split);
  const std::vector<double> loss_whole = losses_from_pieces(whole);
  for (std::size_t r = 0; r < loss_split.size(); ++r) {
    EXPECT_NEAR(loss_split[r], loss_whole[r], 1e-5) << r;
  }
  for (Index k = 0; k < 2; ++k) {
    Tensor dshard(kCeRows, kShardVocab);
    ops::cross_entropy_backward(shard[static_cast<std::size_t>(k)], split.max, split.sum,
                                kCeTargets, vocab_begin(k), scale, dshard);
    expect_near(dshard, to_double(dwhole).middleCols(k * kShardVocab, kShardVocab), 1e-6,
                "dlogits shard");
  }
}

TEST(OpsAdamw, MatchesTheUpdateInDoublePrecision) {
  const std::vector<float> g0 = {0.5f, -2.0f, 1e-3f, 0.0f, 7.0f};
  std::vector<float> p = {1.0f, -0.5f, 0.25f, 3.0f, -4.0f};
  std::vector<float> m1 = {0.1f, 0.0f, -0.2f, 0.05f, 1.0f};
  std::vector<float> m2 = {0.01f, 0.0f, 0.04f, 0.0025f, 2.0f};
  const std::vector<float> p0 = p, m10 = m1, m20 = m2;
  const ops::AdamwStep s{0.9f, 0.95f, 0.5f, 0.999f, 1e-3f, 1.2f, 1e-8f};
  ops::adamw_update(p.data(), g0.data(), m1.data(), m2.data(), static_cast<std::int64_t>(p.size()),
                    s);
  for (std::size_t i = 0; i < p.size(); ++i) {
    const double g = 0.5 * g0[i];
    const double a = 0.9 * m10[i] + 0.1 * g;
    const double b = 0.95 * m20[i] + 0.05 * g * g;
    const double expected = 0.999 * p0[i] - 1e-3 * a / (std::sqrt(b) * 1.2 + 1e-8);
    EXPECT_NEAR(m1[i], a, 1e-6 * (1 + std::abs(a))) << i;
    EXPECT_NEAR(m2[i], b, 1e-6 * (1 + std::abs(b))) << i;
    EXPECT_NEAR(p[i], expected, 1e-6 * (1 + std::abs(expected))) << i;
  }
}

} // namespace
} // namespace parallax
