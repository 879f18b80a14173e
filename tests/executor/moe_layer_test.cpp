// The CPU mixture-of-experts layer against central finite differences of the layer's output
// (L = Σ dy ⊙ layer(x), plus the load-balancing loss where it is on), and its routing.
//
// Top-k routing is piecewise constant: a finite difference that moves a token across a
// routing boundary is not a gradient. So the router and the input are checked with every
// expert chosen (k = E: the chosen set never changes, the weights' normalisation and the
// scoring still do), and with k < E only the experts' own weights, which do not move the routing.
#include "parallax/executor/detail/block.hpp"
#include "parallax/executor/model.hpp"
#include "parallax/executor/moe.hpp"
#include "parallax/models/model_loader.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace parallax {
namespace {

using Eigen::Index;

constexpr float kStep = 1e-2f;
constexpr double kGradTol = 3e-3;

struct MoeBlock {
  ExecModel model;
  BlockLayout layout;
  std::vector<float> params, grads;
  MicroBatch mb;
  Tensor x, dy;

  MoeBlock(int k, const std::string& scoring, double aux, double capacity = 0.0) {
    ModelConfig c = *model_load("moe-tiny").config;
    c.moe.experts_per_token = k;
    c.moe.router_scoring = scoring;
    c.moe.aux_loss_coef = aux;
    c.moe.capacity_factor = capacity;
    model = ExecModel::from_config(c, "moe-tiny");
    // block1, a MoE layer, and its experts block, as one layout (the experts after the rest).
    const std::vector<BlockLayout> blocks = chunk_layout(model, {1, 2}, 1, 0, 1);
    EXPECT_EQ(blocks.size(), 2u);
    EXPECT_EQ(blocks[1].kind, BlockKind::experts);
    layout = blocks[0];
    for (ParamInfo p : blocks[1].params) {
      p.offset += layout.numel;
      layout.params.push_back(p);
    }
    layout.numel += blocks[1].numel;
    layout.padded = layout.numel;
    params.assign(static_cast<std::size_t>(layout.padded), 0.0f);
    grads.assign(params.size(), 0.0f);
    init_block(layout, 7, params);
    // Larger weights than the initialisation's, so every term of the gradient matters.
    for (float& p : params)
      p *= 3.0f;
    mb.batch = 1;
    mb.seq = c.seq_length;
    mb.loss_scale = 0.25f;
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    x = Tensor(mb.seq, c.hidden_size);
    dy = Tensor(mb.seq, c.hidden_size);
    for (float& v : x.span())
      v = u(rng);
    for (float& v : dy.span())
      v = u(rng);
  }
  BlockBuffers buffers() {
    return {.layout = &layout, .params = params.data(), .grads = grads.data()};
  }

  // Σ dy ⊙ layer(x) in double, plus the balance loss of k = E sigmoid routing (every expert
  // chosen: f_j = 1/E, so L = α·loss_scale·Σ scores, the term whose gradient the layer adds).
  double objective() {
    BlockCache cache;
    const Tensor y = layer_forward(model, buffers(), {}, mb, x, KeepMode::all, cache);
    double l = (y.m().cast<double>().array() * dy.m().cast<double>().array()).sum();
    const MoeConfig& moe = model.config.moe;
    if (moe.aux_loss_coef > 0) {
      EXPECT_EQ(moe.experts_per_token, moe.num_experts);
      l += moe.aux_loss_coef * mb.loss_scale *
           cache.t[block::kNumSlots + kMoeScores].m().cast<double>().sum();
    }
    return l;
  }

  // The analytic gradients: grads (parameters) and the returned dx.
  Tensor backward() {
    std::fill(grads.begin(), grads.end(), 0.0f);
    BlockCache cache;
    layer_forward(model, buffers(), {}, mb, x, KeepMode::all, cache);
    return layer_backward(model, buffers(), {}, mb, dy, cache);
  }

  float* param(const std::string& suffix) { return params.data() + layout.param(suffix).offset; }
  const float* grad(const std::string& suffix) {
    return grads.data() + layout.param(suffix).offset;
  }
  Index size(const std::string& suffix) { return layout.param(suffix).local_size(); }
};

// ‖analytic − numeric‖ / ‖numeric‖ over (a spread of at most 96 of) the n values at `x`.
double relative_error(float* x, const float* analytic, Index n,
                      const std::function<double()>& objective) {
  double diff = 0;
  double ref = 0;
  const Index stride = std::max<Index>(1, n / 96);
  for (Index i = 0; i < n; i += stride) {
    const float saved = x[i];
    x[i] = saved + kStep;
    const double up_x = x[i];
    const double up = objective();
    x[i] = saved - kStep;
    const double down_x = x[i];
    const double down = objective();
    x[i] = saved;
    const double numeric = (up - down) / (up_x - down_x);
    diff += (analytic[i] - numeric) * (analytic[i] - numeric);
    ref += numeric * numeric;
  }
  return std::sqrt(diff) / std::max(std::sqrt(ref), 1e-30);
}

void check_params(MoeBlock& b, const std::vector<std::string>& names) {
  b.backward();
  const std::vector<float> analytic = b.grads;
  for (const std::string& name : names) {
    const double e = relative_error(b.param(name), analytic.data() + b.layout.param(name).offset,
                                    b.size(name), [&] { return b.objective(); });
    EXPECT_LT(e, kGradTol) << name;
  }
}

TEST(MoeLayer, RouterExpertsAndInputMatchFiniteDifferencesWithEveryExpertChosen) {
  for (const char* scoring : {"softmax", "sigmoid"}) {
    SCOPED_TRACE(scoring);
    MoeBlock b(8, scoring, 0.0);
    check_params(b, {"moe.router", "moe.e3.wg", "moe.e3.wu", "moe.e3.w2", "mlp.wg", "mlp.w2",
                     "ln2.gamma", "attn.wq"});
    const Tensor dx = b.backward();
    EXPECT_LT(relative_error(b.x.data(), dx.data(), b.x.size(), [&] { return b.objective(); }),
              kGradTol);
  }
}

TEST(MoeLayer, LoadBalancingLossGradientReachesTheRouter) {
  MoeBlock with(8, "sigmoid", 0.5);
  check_params(with, {"moe.router"});
  // And it changes the router's gradient, nothing else's.
  MoeBlock without(8, "sigmoid", 0.0);
  with.backward();
  without.backward();
  const auto differs = [&](const std::string& name) {
    for (Index i = 0; i < with.size(name); ++i)
      if (with.grad(name)[i] != without.grad(name)[i])
        return true;
    return false;
  };
  EXPECT_TRUE(differs("moe.router"));
  EXPECT_FALSE(differs("moe.e0.wg"));
}

TEST(MoeLayer, TopKExpertsMatchFiniteDifferences) {
  MoeBlock b(2, "softmax", 0.0);
  check_params(b, {"moe.e0.wg", "moe.e0.w2", "moe.e5.wu", "mlp.wu"});
}

// A capacity factor of 1 (at most 64·2/8 = 16 of the sequence's copies per expert) drops some
// copies — the output differs from the dropless layer's — and the gradients still match.
TEST(MoeLayer, CapacityDropsCopiesAndTheGradientsStillMatch) {
  MoeBlock capped(2, "softmax", 0.0, 1.0);
  MoeBlock dropless(2, "softmax", 0.0);
  BlockCache c1, c2;
  const Tensor y1 =
      layer_forward(capped.model, capped.buffers(), {}, capped.mb, capped.x, KeepMode::all, c1);
  const Tensor y2 = layer_forward(dropless.model, dropless.buffers(), {}, dropless.mb, dropless.x,
                                  KeepMode::all, c2);
  Index changed = 0;
  for (Index i = 0; i < y1.rows(); ++i)
    changed += (y1.m().row(i) - y2.m().row(i)).cwiseAbs().maxCoeff() > 1e-6f ? 1 : 0;
  EXPECT_GT(changed, 0);         // some rows lost a copy
  EXPECT_LT(changed, y1.rows()); // most kept theirs
  // The experts' and the shared MLP's weights do not move the drops: finite differences hold.
  // (The router's and the input's do — a step can swap which copy is over capacity, a jump —
  // so their gradients are checked where nothing drops, above, and by the trainings' equality.)
  check_params(capped, {"moe.e0.wg", "moe.e3.wu", "moe.e5.w2", "mlp.wg", "mlp.w2"});
}

TEST(MoeLayer, TopKRoutesEveryTokenToItsBestExperts) {
  MoeBlock b(2, "softmax", 0.0);
  BlockCache cache;
  layer_forward(b.model, b.buffers(), {}, b.mb, b.x, KeepMode::all, cache);
  const Tensor& scores = cache.t[block::kNumSlots + kMoeScores];
  const Tensor& chosen = cache.t[block::kNumSlots + kMoeChosen];
  const Tensor& weights = cache.t[block::kNumSlots + kMoeWeights];
  for (Index i = 0; i < scores.rows(); ++i) {
    const auto a = std::lround(chosen.m()(i, 0));
    const auto c = std::lround(chosen.m()(i, 1));
    EXPECT_NE(a, c);
    for (Index j = 0; j < scores.cols(); ++j) {
      if (j != a && j != c) {
        EXPECT_LE(scores.m()(i, j), scores.m()(i, c));
      }
    }
    EXPECT_GE(scores.m()(i, a), scores.m()(i, c));
    EXPECT_NEAR(weights.m()(i, 0) + weights.m()(i, 1), 1.0f, 1e-6f);
    EXPECT_NEAR(scores.m().row(i).sum(), 1.0f, 1e-5f);
  }
}

} // namespace
} // namespace parallax
