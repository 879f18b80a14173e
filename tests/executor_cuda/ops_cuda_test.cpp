// Every CUDA op against the CPU reference op (parallax::ops) on seeded random inputs.
// fp32 paths: tight tolerances (fp32 rounding, different summation order). bf16/tf32 GEMMs:
// a per-element bound from the input rounding, relative to Σ|a||b| of that element.
// Every test skips itself, with a message, on a machine without a CUDA device.
#include "cuda_test_util.hpp"

#include "parallax/executor/cuda/adamw.hpp"
#include "parallax/executor/cuda/check.hpp"
#include "parallax/executor/cuda/device.hpp"
#include "parallax/executor/cuda/gemm.hpp"
#include "parallax/executor/cuda/ops.hpp"
#include "parallax/executor/cuda/stream.hpp"
#include "parallax/executor/ops.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace parallax::cuda {
namespace {

using Eigen::Index;
using test::expect_close;
using test::expect_within_bound;
using test::random_tensor;
using test::upload;

#define PARALLAX_SKIP_WITHOUT_GPU_MESSAGE                                                          \
  "no CUDA device: the CUDA backend is compiled but cannot run here; run `ctest -L gpu` on a "     \
  "GPU machine"

// ---- GEMM / linear ----

// Largest relative error of one product with rounded inputs, doubled for margin: tf32 keeps
// 10 mantissa bits (2^-10 per input, either rounding mode), bf16 7 (round to nearest, 2^-8).
double gemm_relative_bound(GemmPrecision p) {
  switch (p) {
  case GemmPrecision::f32:
    return 1e-5;
  case GemmPrecision::tf32:
    return 4.0 * std::ldexp(1.0, -10);
  case GemmPrecision::bf16:
    return 4.0 * std::ldexp(1.0, -8);
  }
  return 0.0;
}

void check_linear(GemmPrecision precision) {
  std::mt19937 rng(7);
  // An odd token count and an odd output width: the weight's and output's leading dimension
  // (75) is not a multiple of 16 bytes, as for GPT-2's vocabulary of 50257.
  const Index n = 37;
  const Index in = 48;
  const Index out = 75;
  const Tensor x = random_tensor(rng, n, in);
  const Tensor w = random_tensor(rng, in, out, 0.5f);
  const Tensor b = random_tensor(rng, 1, out);
  const Tensor dy = random_tensor(rng, n, out);
  const Tensor dx0 = random_tensor(rng, n, in);
  const Tensor dw0 = random_tensor(rng, in, out);
  const Tensor db0 = random_tensor(rng, 1, out);

  Tensor y_ref(n, out);
  ops::linear_forward(x, w, b, y_ref);
  Tensor dx_ref = dx0;
  Tensor dw_ref = dw0;
  Tensor db_ref = db0;
  ops::linear_backward(x, w, dy, dx_ref, dw_ref, db_ref, /*accumulate_dx=*/true);

  // Σ|a||b| per output element (plus the magnitudes added to it), the scale of its error.
  Tensor y_bound(n, out);
  y_bound.m() = x.m().cwiseAbs() * w.m().cwiseAbs();
  y_bound.m().rowwise() += b.m().cwiseAbs().row(0);
  Tensor dx_bound(n, in);
  dx_bound.m() = dy.m().cwiseAbs() * w.m().cwiseAbs().transpose() + dx0.m().cwiseAbs();
  Tensor dw_bound(in, out);
  dw_bound.m() = x.m().cwiseAbs().transpose() * dy.m().cwiseAbs() + dw0.m().cwiseAbs();
  Tensor db_bound(1, out);
  db_bound.m() = dy.m().cwiseAbs().colwise().sum() + db0.m().cwiseAbs();

  const DType in_type = gemm_input_dtype(precision);
  DeviceAllocator alloc;
  Stream stream;
  Blas blas(alloc);
  const DeviceTensor x_d = upload(alloc, x, in_type);
  const DeviceTensor w_d = upload(alloc, w, in_type);
  const DeviceTensor b_d = upload(alloc, b);
  const DeviceTensor dy_d = upload(alloc, dy, in_type);
  DeviceTensor y_d(alloc, n, out);
  DeviceTensor dx_d = upload(alloc, dx0);
  DeviceTensor dw_d = upload(alloc, dw0);
  DeviceTensor db_d = upload(alloc, db0);
  linear_forward(blas, x_d, w_d, b_d, y_d, precision, stream);
  linear_backward(blas, x_d, w_d, dy_d, dx_d, dw_d, db_d, precision, stream,
                  /*accumulate_dx=*/true);
  stream.synchronize();

  const double rel = gemm_relative_bound(precision);
  const std::string p = gemm_precision_name(precision);
  expect_within_bound(y_d.to_host(), y_ref, y_bound, rel, 1e-6, p + " y");
  expect_within_bound(dx_d.to_host(), dx_ref, dx_bound, rel, 1e-6, p + " dx");
  expect_within_bound(dw_d.to_host(), dw_ref, dw_bound, rel, 1e-6, p + " dW");
  expect_within_bound(db_d.to_host(), db_ref, db_bound, rel, 1e-6, p + " db");

  // Overwriting dx (accumulate_dx = false) and no bias.
  Tensor y_nobias(n, out);
  ops::linear_forward(x, w, ConstMatRef{}, y_nobias);
  linear_forward(blas, x_d, w_d, {}, y_d, precision, stream);
  Tensor dx_over(n, in);
  Tensor dw_scratch(in, out);
  ops::linear_backward(x, w, dy, dx_over, dw_scratch, MatRef{});
  DeviceTensor dw2_d(alloc, in, out);
  dw2_d.zero(stream);
  linear_backward(blas, x_d, w_d, dy_d, dx_d, dw2_d, {}, precision, stream);
  stream.synchronize();
  Tensor y_bound_nobias(n, out);
  y_bound_nobias.m() = x.m().cwiseAbs() * w.m().cwiseAbs();
  Tensor dx_bound_over(n, in);
  dx_bound_over.m() = dy.m().cwiseAbs() * w.m().cwiseAbs().transpose();
  expect_within_bound(y_d.to_host(), y_nobias, y_bound_nobias, rel, 1e-6, p + " y (no bias)");
  expect_within_bound(dx_d.to_host(), dx_over, dx_bound_over, rel, 1e-6, p + " dx (overwrite)");
}

TEST(LinearCuda, F32MatchesCpu) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_linear(GemmPrecision::f32);
}

TEST(LinearCuda, Tf32MatchesCpuWithinTf32Rounding) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_linear(GemmPrecision::tf32);
}

TEST(LinearCuda, Bf16MatchesCpuWithinBf16Rounding) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_linear(GemmPrecision::bf16);
}

// ---- Norms ----

Tensor near_one(std::mt19937& rng, Index cols) {
  Tensor g = random_tensor(rng, 1, cols, 0.1f);
  g.m().array() += 1.0f;
  return g;
}

void check_layernorm(bool fused_residual) {
  std::mt19937 rng(11);
  const Index n = 37;
  const Index h = 300; // not a multiple of the 256-thread block
  const float eps = 1e-5f;
  const Tensor x = random_tensor(rng, n, h);
  const Tensor res = random_tensor(rng, n, h);
  const Tensor gamma = near_one(rng, h);
  const Tensor beta = random_tensor(rng, 1, h, 0.1f);
  const Tensor dy = random_tensor(rng, n, h);
  const Tensor dres = random_tensor(rng, n, h);
  const Tensor dgamma0 = random_tensor(rng, 1, h);
  const Tensor dbeta0 = random_tensor(rng, 1, h);

  Tensor u = x;
  if (fused_residual)
    u.m() += res.m();
  Tensor y_ref(n, h);
  Tensor mean_ref(n, 1);
  Tensor rstd_ref(n, 1);
  ops::layernorm_forward(u, gamma, beta, y_ref, mean_ref, rstd_ref, eps);
  Tensor dx_ref(n, h);
  Tensor dgamma_ref = dgamma0;
  Tensor dbeta_ref = dbeta0;
  ops::layernorm_backward(u, gamma, mean_ref, rstd_ref, dy, dx_ref, dgamma_ref, dbeta_ref);
  if (fused_residual)
    dx_ref.m() += dres.m();

  DeviceAllocator alloc;
  Stream stream;
  const DeviceTensor x_d = upload(alloc, x);
  const DeviceTensor res_d = upload(alloc, res);
  const DeviceTensor gamma_d = upload(alloc, gamma);
  const DeviceTensor beta_d = upload(alloc, beta);
  const DeviceTensor dy_d = upload(alloc, dy);
  DeviceTensor sum_d(alloc, n, h);
  DeviceTensor y_d(alloc, n, h);
  DeviceTensor mean_d(alloc, n, 1);
  DeviceTensor rstd_d(alloc, n, 1);
  DeviceTensor dres_d = upload(alloc, dres); // the fused backward writes dx over it
  DeviceTensor dx_d(alloc, n, h);
  DeviceTensor dgamma_d = upload(alloc, dgamma0);
  DeviceTensor dbeta_d = upload(alloc, dbeta0);
  if (fused_residual) {
    layernorm_forward(x_d, res_d, sum_d, gamma_d, beta_d, y_d, mean_d, rstd_d, eps, stream);
    layernorm_backward(sum_d, gamma_d, mean_d, rstd_d, dy_d, dres_d, dres_d, dgamma_d, dbeta_d,
                       stream);
  } else {
    layernorm_forward(x_d, {}, {}, gamma_d, beta_d, y_d, mean_d, rstd_d, eps, stream);
    layernorm_backward(x_d, gamma_d, mean_d, rstd_d, dy_d, {}, dx_d, dgamma_d, dbeta_d, stream);
  }
  stream.synchronize();

  if (fused_residual)
    expect_close(sum_d.to_host(), u, 0.0, 0.0, "layernorm residual sum");
  expect_close(y_d.to_host(), y_ref, 1e-4, 1e-5, "layernorm y");
  expect_close(mean_d.to_host(), mean_ref, 1e-4, 1e-6, "layernorm mean");
  expect_close(rstd_d.to_host(), rstd_ref, 1e-4, 1e-6, "layernorm rstd");
  expect_close((fused_residual ? dres_d : dx_d).to_host(), dx_ref, 1e-4, 2e-5, "layernorm dx");
  expect_close(dgamma_d.to_host(), dgamma_ref, 1e-4, 1e-4, "layernorm dgamma");
  expect_close(dbeta_d.to_host(), dbeta_ref, 1e-4, 1e-4, "layernorm dbeta");
}

TEST(LayerNormCuda, MatchesCpu) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_layernorm(false);
}

TEST(LayerNormCuda, FusedResidualMatchesCpuAddThenNorm) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_layernorm(true);
}

void check_rmsnorm(bool fused_residual) {
  std::mt19937 rng(13);
  const Index n = 29;
  const Index h = 520;
  const float eps = 1e-6f;
  const Tensor x = random_tensor(rng, n, h);
  const Tensor res = random_tensor(rng, n, h);
  const Tensor gamma = near_one(rng, h);
  const Tensor dy = random_tensor(rng, n, h);
  const Tensor dres = random_tensor(rng, n, h);
  const Tensor dgamma0 = random_tensor(rng, 1, h);

  Tensor u = x;
  if (fused_residual)
    u.m() += res.m();
  Tensor y_ref(n, h);
  Tensor rstd_ref(n, 1);
  ops::rmsnorm_forward(u, gamma, y_ref, rstd_ref, eps);
  Tensor dx_ref(n, h);
  Tensor dgamma_ref = dgamma0;
  ops::rmsnorm_backward(u, gamma, rstd_ref, dy, dx_ref, dgamma_ref);
  if (fused_residual)
    dx_ref.m() += dres.m();

  DeviceAllocator alloc;
  Stream stream;
  DeviceTensor x_d = upload(alloc, x); // the fused forward writes the sum over x
  const DeviceTensor res_d = upload(alloc, res);
  const DeviceTensor gamma_d = upload(alloc, gamma);
  const DeviceTensor dy_d = upload(alloc, dy);
  DeviceTensor y_d(alloc, n, h);
  DeviceTensor rstd_d(alloc, n, 1);
  const DeviceTensor dres_d = upload(alloc, dres);
  DeviceTensor dx_d(alloc, n, h);
  DeviceTensor dgamma_d = upload(alloc, dgamma0);
  if (fused_residual) {
    rmsnorm_forward(x_d, res_d, x_d, gamma_d, y_d, rstd_d, eps, stream);
    rmsnorm_backward(x_d, gamma_d, rstd_d, dy_d, dres_d, dx_d, dgamma_d, stream);
  } else {
    rmsnorm_forward(x_d, {}, {}, gamma_d, y_d, rstd_d, eps, stream);
    rmsnorm_backward(x_d, gamma_d, rstd_d, dy_d, {}, dx_d, dgamma_d, stream);
  }
  stream.synchronize();

  if (fused_residual)
    expect_close(x_d.to_host(), u, 0.0, 0.0, "rmsnorm residual sum (in place)");
  expect_close(y_d.to_host(), y_ref, 1e-4, 1e-5, "rmsnorm y");
  expect_close(rstd_d.to_host(), rstd_ref, 1e-4, 1e-6, "rmsnorm rstd");
  expect_close(dx_d.to_host(), dx_ref, 1e-4, 2e-5, "rmsnorm dx");
  expect_close(dgamma_d.to_host(), dgamma_ref, 1e-4, 1e-4, "rmsnorm dgamma");
}

TEST(RmsNormCuda, MatchesCpu) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_rmsnorm(false);
}

TEST(RmsNormCuda, FusedResidualInPlaceMatchesCpuAddThenNorm) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_rmsnorm(true);
}

// ---- Activations ----

TEST(GeluCuda, MatchesCpu) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  std::mt19937 rng(17);
  const Tensor x = random_tensor(rng, 33, 257, 2.0f);
  const Tensor dy = random_tensor(rng, 33, 257);
  Tensor y_ref(33, 257);
  Tensor dx_ref(33, 257);
  ops::gelu_forward(x, y_ref);
  ops::gelu_backward(x, dy, dx_ref);

  DeviceAllocator alloc;
  Stream stream;
  const DeviceTensor x_d = upload(alloc, x);
  const DeviceTensor dy_d = upload(alloc, dy);
  DeviceTensor y_d(alloc, 33, 257);
  DeviceTensor dx_d(alloc, 33, 257);
  gelu_forward(x_d, y_d, stream);
  gelu_backward(x_d, dy_d, dx_d, stream);
  stream.synchronize();
  expect_close(y_d.to_host(), y_ref, 1e-5, 1e-6, "gelu y");
  expect_close(dx_d.to_host(), dx_ref, 1e-5, 1e-6, "gelu dx");
}

TEST(SwigluCuda, MatchesCpu) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  std::mt19937 rng(19);
  const Tensor gate = random_tensor(rng, 21, 130, 2.0f);
  const Tensor up = random_tensor(rng, 21, 130);
  const Tensor dy = random_tensor(rng, 21, 130);
  Tensor y_ref(21, 130);
  Tensor dgate_ref(21, 130);
  Tensor dup_ref(21, 130);
  ops::swiglu_forward(gate, up, y_ref);
  ops::swiglu_backward(gate, up, dy, dgate_ref, dup_ref);

  DeviceAllocator alloc;
  Stream stream;
  const DeviceTensor gate_d = upload(alloc, gate);
  const DeviceTensor up_d = upload(alloc, up);
  const DeviceTensor dy_d = upload(alloc, dy);
  DeviceTensor y_d(alloc, 21, 130);
  DeviceTensor dgate_d(alloc, 21, 130);
  DeviceTensor dup_d(alloc, 21, 130);
  swiglu_forward(gate_d, up_d, y_d, stream);
  swiglu_backward(gate_d, up_d, dy_d, dgate_d, dup_d, stream);
  stream.synchronize();
  expect_close(y_d.to_host(), y_ref, 1e-5, 1e-6, "swiglu y");
  expect_close(dgate_d.to_host(), dgate_ref, 1e-5, 1e-6, "swiglu dgate");
  expect_close(dup_d.to_host(), dup_ref, 1e-5, 1e-6, "swiglu dup");
}

// ---- Attention ----

// log Σ_{j ≤ i} exp(q_i·k_j / √d) per (b·heads + h, i), in double.
Tensor reference_lse(const Tensor& q, const Tensor& k, const ops::AttentionShape& s) {
  Tensor lse(s.batch * s.heads, s.seq);
  const int group = s.heads / s.kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  for (Index b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      for (Index i = 0; i < s.seq; ++i) {
        std::vector<double> scores;
        for (Index j = 0; j <= i; ++j) {
          double dot = 0.0;
          for (int c = 0; c < s.head_dim; ++c)
            dot += static_cast<double>(q.m()(b * s.seq + i, Index{h} * s.head_dim + c)) *
                   k.m()(b * s.seq + j, Index{h / group} * s.head_dim + c);
          scores.push_back(dot * scale);
        }
        double mx = -std::numeric_limits<double>::infinity();
        for (double sc : scores)
          mx = std::max(mx, sc);
        double sum = 0.0;
        for (double sc : scores)
          sum += std::exp(sc - mx);
        lse.m()(b * s.heads + h, i) = static_cast<float>(mx + std::log(sum));
      }
    }
  }
  return lse;
}

void check_attention(const AttentionShape& shape, unsigned seed) {
  std::mt19937 rng(seed);
  const ops::AttentionShape cs{shape.batch, shape.seq, shape.heads, shape.kv_heads, shape.head_dim};
  const Index rows = shape.batch * shape.seq;
  const Index qw = Index{shape.heads} * shape.head_dim;
  const Index kw = Index{shape.kv_heads} * shape.head_dim;
  const Tensor q = random_tensor(rng, rows, qw);
  const Tensor k = random_tensor(rng, rows, kw);
  const Tensor v = random_tensor(rng, rows, kw);
  const Tensor dout = random_tensor(rng, rows, qw);
  Tensor probs(shape.batch * shape.heads, shape.seq * shape.seq);
  Tensor out_ref(rows, qw);
  ops::attention_forward(q, k, v, cs, probs, out_ref);
  Tensor dq_ref(rows, qw);
  Tensor dk_ref(rows, kw);
  Tensor dv_ref(rows, kw);
  ops::attention_backward(q, k, v, probs, dout, cs, dq_ref, dk_ref, dv_ref);
  const Tensor lse_ref = reference_lse(q, k, cs);

  DeviceAllocator alloc;
  Stream stream;
  const DeviceTensor q_d = upload(alloc, q);
  const DeviceTensor k_d = upload(alloc, k);
  const DeviceTensor v_d = upload(alloc, v);
  const DeviceTensor dout_d = upload(alloc, dout);
  DeviceTensor out_d(alloc, rows, qw);
  DeviceTensor lse_d(alloc, shape.batch * shape.heads, shape.seq);
  DeviceTensor delta_d(alloc, shape.batch * shape.heads, shape.seq);
  DeviceTensor dq_d(alloc, rows, qw);
  DeviceTensor dk_d(alloc, rows, kw);
  DeviceTensor dv_d(alloc, rows, kw);
  attention_forward(q_d, k_d, v_d, shape, out_d, lse_d, stream);
  attention_backward(q_d, k_d, v_d, out_d, dout_d, lse_d, shape, delta_d, dq_d, dk_d, dv_d, stream);
  stream.synchronize();

  const std::string what = "attention b" + std::to_string(shape.batch) + " s" +
                           std::to_string(shape.seq) + " a" + std::to_string(shape.heads) + " g" +
                           std::to_string(shape.kv_heads) + " d" + std::to_string(shape.head_dim);
  expect_close(out_d.to_host(), out_ref, 1e-4, 2e-5, what + " out");
  expect_close(lse_d.to_host(), lse_ref, 1e-5, 1e-5, what + " lse");
  expect_close(dq_d.to_host(), dq_ref, 1e-3, 1e-4, what + " dq");
  expect_close(dk_d.to_host(), dk_ref, 1e-3, 1e-4, what + " dk");
  expect_close(dv_d.to_host(), dv_ref, 1e-3, 1e-4, what + " dv");
}

TEST(AttentionCuda, GroupedQueryMatchesCpu) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  // seq 45 crosses the 8-query and 32-key tiles; 4 query heads share 2 kv heads.
  check_attention({2, 45, 4, 2, 32}, 23);
}

TEST(AttentionCuda, MultiHeadAndOddHeadDimMatchCpu) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_attention({1, 70, 3, 3, 64}, 29);
  check_attention({1, 33, 2, 1, 24}, 31); // head_dim not a multiple of the warp
  check_attention({3, 1, 2, 2, 16}, 37);  // one position: out = v
}

TEST(AttentionCuda, LargeHeadDimUsesExtendedSharedMemory) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_attention({1, 40, 2, 1, 256}, 41); // > 48 KiB of shared memory per block
}

// ---- Cross-entropy ----

void check_cross_entropy(bool in_place) {
  std::mt19937 rng(43);
  const Index rows = 19;
  const Index vocab = 1000;
  const float scale = 1.0f / static_cast<float>(rows);
  const Tensor logits = random_tensor(rng, rows, vocab, 2.0f);
  std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(vocab - 1));
  std::vector<std::int32_t> targets(static_cast<std::size_t>(rows));
  for (auto& t : targets)
    t = pick(rng);
  targets[3] = -1;                               // not in this vocabulary: no target term
  targets[5] = static_cast<std::int32_t>(vocab); // likewise

  Tensor mx(rows, 1);
  Tensor sum(rows, 1);
  Tensor target(rows, 1);
  ops::row_max(logits, mx);
  ops::row_sum_exp(logits, mx, sum);
  ops::target_logits(logits, targets, 0, target);
  Tensor loss_ref(rows, 1);
  loss_ref.m().array() = sum.m().array().log() + mx.m().array() - target.m().array();
  Tensor dlogits_ref(rows, vocab);
  ops::cross_entropy_backward(logits, mx, sum, targets, 0, scale, dlogits_ref);

  DeviceAllocator alloc;
  Stream stream;
  DeviceTensor logits_d = upload(alloc, logits);
  DeviceTensor dlogits_d(alloc, rows, vocab);
  DeviceTensor loss_d(alloc, rows, 1);
  void* targets_d = alloc.allocate(targets.size() * sizeof(std::int32_t));
  PARALLAX_CUDA_CHECK(cudaMemcpy(targets_d, targets.data(), targets.size() * sizeof(std::int32_t),
                                 cudaMemcpyHostToDevice));
  device_synchronize(); // a pageable copy may land after cudaMemcpy returns
  DeviceTensor& grad = in_place ? logits_d : dlogits_d;
  softmax_cross_entropy(logits_d, static_cast<const std::int32_t*>(targets_d), scale, loss_d, grad,
                        stream);
  stream.synchronize();
  alloc.deallocate(targets_d);
  const std::string what = in_place ? "cross-entropy (in place)" : "cross-entropy";
  expect_close(loss_d.to_host(), loss_ref, 1e-5, 1e-5, what + " loss");
  expect_close(grad.to_host(), dlogits_ref, 1e-4, 1e-8, what + " dlogits");
}

TEST(SoftmaxCrossEntropyCuda, MatchesCpuPieces) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_cross_entropy(false);
}

TEST(SoftmaxCrossEntropyCuda, GradientOverwritesLogitsInPlace) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  check_cross_entropy(true);
}

// ---- AdamW ----

// The update of Trainer's adamw() in executor/src/trainer.cpp, written out for one tensor.
void reference_adamw(Tensor& p, const Tensor& grad, Tensor& m1, Tensor& m2, const AdamWParams& hp) {
  const double t = static_cast<double>(hp.step);
  const double bc1 = 1.0 - std::pow(hp.beta1, t);
  const double bc2 = 1.0 - std::pow(hp.beta2, t);
  const float b1 = static_cast<float>(hp.beta1);
  const float b2 = static_cast<float>(hp.beta2);
  const float clip = static_cast<float>(hp.clip_coef);
  const float step_size = static_cast<float>(hp.lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float eps = static_cast<float>(hp.eps);
  const float keep = static_cast<float>(1.0 - hp.lr * (hp.decay ? hp.weight_decay : 0.0));
  for (Index i = 0; i < p.size(); ++i) {
    const float gi = grad.data()[i] * clip;
    m1.data()[i] = b1 * m1.data()[i] + (1.0f - b1) * gi;
    m2.data()[i] = b2 * m2.data()[i] + (1.0f - b2) * gi * gi;
    p.data()[i] = p.data()[i] * keep -
                  step_size * m1.data()[i] / (std::sqrt(m2.data()[i]) * inv_sqrt_bc2 + eps);
  }
}

TEST(AdamWCuda, MatchesTrainerUpdateAndWritesBf16Copy) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  std::mt19937 rng(47);
  const Index rows = 13;
  const Index cols = 77;
  Tensor p = random_tensor(rng, rows, cols, 0.02f);
  Tensor m1(rows, cols);
  Tensor m2(rows, cols);
  DeviceAllocator alloc;
  Stream stream;
  DeviceTensor p_d = upload(alloc, p);
  DeviceTensor m1_d = upload(alloc, m1);
  DeviceTensor m2_d = upload(alloc, m2);
  DeviceTensor p_bf16(alloc, rows, cols, DType::bf16);
  for (std::int64_t step = 1; step <= 4; ++step) {
    AdamWParams hp;
    hp.lr = 6e-4 * static_cast<double>(step);
    hp.step = step;
    hp.decay = step != 3;               // a step without decay (norms, biases)
    hp.clip_coef = step == 2 ? 0.5 : 1; // a clipped step
    const Tensor grad = random_tensor(rng, rows, cols, 0.1f);
    reference_adamw(p, grad, m1, m2, hp);
    const DeviceTensor grad_d = upload(alloc, grad);
    adamw_update(p_d, grad_d, m1_d, m2_d, p_bf16, hp, stream);
    stream.synchronize();
  }
  // Every operation is rounded as on the CPU: equal up to the last bit; allow two ulps.
  expect_close(p_d.to_host(), p, 2.5e-7, 0.0, "adamw parameters");
  expect_close(m1_d.to_host(), m1, 2.5e-7, 0.0, "adamw first moment");
  expect_close(m2_d.to_host(), m2, 2.5e-7, 0.0, "adamw second moment");
  const std::vector<float> copy = p_bf16.to_host();
  const std::vector<float> master = p_d.to_host();
  for (std::size_t i = 0; i < copy.size(); ++i)
    ASSERT_EQ(copy[i], float_from_bf16(bf16_from_float(master[i]))) << "element " << i;
}

// ---- Conversion ----

TEST(ConvertCuda, Bf16RoundingMatchesHostRoundToNearestEven) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  std::mt19937 rng(53);
  Tensor x = random_tensor(rng, 7, 64, 3.0f);
  // Ties (1 + 2^-8 rounds down to even, 1 + 3·2^-8 up), signed zero, infinities, tiny values.
  const float specials[] = {1.00390625f,
                            1.01171875f,
                            -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            1e-40f,
                            3.0e38f};
  std::memcpy(x.data(), specials, sizeof(specials));
  DeviceAllocator alloc;
  Stream stream;
  const DeviceTensor x_d = upload(alloc, x);
  DeviceTensor b_d(alloc, 7, 64, DType::bf16);
  DeviceTensor back_d(alloc, 7, 64);
  convert_f32_to_bf16(x_d, b_d, stream);
  convert_bf16_to_f32(b_d, back_d, stream);
  stream.synchronize();
  const std::vector<float> back = back_d.to_host();
  for (Index i = 0; i < x.size(); ++i) {
    const float want = float_from_bf16(bf16_from_float(x.data()[i]));
    ASSERT_EQ(std::memcmp(&back[static_cast<std::size_t>(i)], &want, sizeof(float)), 0)
        << "element " << i << ": " << x.data()[i] << " -> " << back[static_cast<std::size_t>(i)]
        << ", host rounding gives " << want;
  }
}

} // namespace
} // namespace parallax::cuda
