// The device trainer's own kernels against the CPU ops of the same names: vocabulary-parallel
// embedding forward/backward (repeated and foreign tokens), rotary forward and back, the
// cross-entropy pieces with a vocabulary shard, the batched-GEMM attention, elementwise sums and
// the deterministic sum of squares. Every test skips itself, with a message, on a machine
// without a CUDA device.
#include "cuda_test_util.hpp"

#include "parallax/executor/cuda/attention_gemm.hpp"
#include "parallax/executor/cuda/check.hpp"
#include "parallax/executor/cuda/device.hpp"
#include "parallax/executor/cuda/ops.hpp"
#include "parallax/executor/cuda/stream.hpp"
#include "parallax/executor/ops.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace parallax::cuda {
namespace {

using Eigen::Index;
using test::expect_close;
using test::random_tensor;
using test::upload;

#define SKIP_WITHOUT_GPU()                                                                         \
  if (!gpu_available())                                                                            \
  GTEST_SKIP() << "no CUDA device: the CUDA backend is compiled but cannot run here; run "         \
                  "`ctest -L gpu` on a GPU machine"

// Device int32 array for the test's lifetime.
class Ints {
public:
  Ints(DeviceAllocator& alloc, const std::vector<std::int32_t>& host) : alloc_(alloc) {
    data_ = alloc.allocate(host.size() * sizeof(std::int32_t));
    PARALLAX_CUDA_CHECK(
        cudaMemcpy(data_, host.data(), host.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
    device_synchronize();
  }
  ~Ints() { alloc_.deallocate(data_); }
  Ints(const Ints&) = delete;
  Ints& operator=(const Ints&) = delete;
  const std::int32_t* get() const { return static_cast<const std::int32_t*>(data_); }

private:
  DeviceAllocator& alloc_;
  void* data_ = nullptr;
};

std::vector<std::int32_t> random_tokens(std::mt19937& rng, Index n, std::int32_t lo,
                                        std::int32_t hi) {
  std::uniform_int_distribution<std::int32_t> pick(lo, hi);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& v : t)
    v = pick(rng);
  return t;
}

TEST(EmbeddingCuda, ShardForwardAndBackwardMatchCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  const Index rows = 57, cols = 40, shard = 30, begin = 30; // tokens 0..89: a third is local
  const std::vector<std::int32_t> tokens = random_tokens(rng, rows, 0, 89);
  const Tensor table = random_tensor(rng, shard, cols);
  const Tensor dout = random_tensor(rng, rows, cols);
  const Tensor base = random_tensor(rng, rows, cols);
  const Tensor dtable0 = random_tensor(rng, shard, cols);

  Tensor out_ref(rows, cols);
  ops::embedding_forward(tokens, table, begin, out_ref);
  Tensor added_ref = base;
  added_ref.m() += out_ref.m();
  Tensor dtable_ref = dtable0;
  ops::embedding_backward(tokens, dout, begin, dtable_ref);

  DeviceAllocator alloc;
  Stream stream;
  const Ints tokens_d(alloc, tokens);
  const DeviceTensor table_d = upload(alloc, table);
  DeviceTensor out_d(alloc, rows, cols);
  DeviceTensor added_d = upload(alloc, base);
  DeviceTensor dtable_d = upload(alloc, dtable0);
  const DeviceTensor dout_d = upload(alloc, dout);
  embedding_forward(tokens_d.get(), table_d, begin, out_d, false, stream);
  embedding_forward(tokens_d.get(), table_d, begin, added_d, true, stream);
  const TokenGroups groups = TokenGroups::of(tokens);
  const Ints order_d(alloc, groups.order), starts_d(alloc, groups.starts),
      group_tokens_d(alloc, groups.tokens);
  embedding_backward(order_d.get(), starts_d.get(), group_tokens_d.get(), groups.groups(), dout_d,
                     begin, dtable_d, stream);
  stream.synchronize();
  expect_close(out_d.to_host(), out_ref, 0.0, 0.0, "embedding rows");
  expect_close(added_d.to_host(), added_ref, 0.0, 0.0, "embedding added to positions");
  // Same rows added in the same order as the CPU loop: equal to the bit.
  expect_close(dtable_d.to_host(), dtable_ref, 0.0, 0.0, "embedding gradient");
}

// Pure host code: runs without a device.
TEST(TokenGroups, GroupRowsByTokenKeepingRowOrder) {
  const std::vector<std::int32_t> tokens = {5, 2, 5, 9, 2, 5};
  const TokenGroups g = TokenGroups::of(tokens);
  EXPECT_EQ(g.tokens, (std::vector<std::int32_t>{2, 5, 9}));
  EXPECT_EQ(g.starts, (std::vector<std::int32_t>{0, 2, 5, 6}));
  EXPECT_EQ(g.order, (std::vector<std::int32_t>{1, 4, 0, 2, 5, 3}));
  EXPECT_EQ(TokenGroups::of({}).groups(), 0);
  EXPECT_EQ(TokenGroups::of({}).starts, (std::vector<std::int32_t>{0}));
}

TEST(RopeCuda, ForwardAndBackwardMatchCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(12);
  const Index rows = 23;
  const int head_dim = 16;
  const Index cols = 3 * head_dim;
  const std::vector<std::int32_t> positions = random_tokens(rng, rows, 0, 500);
  const Tensor x = random_tensor(rng, rows, cols);
  Tensor fwd_ref = x;
  ops::rope_forward(fwd_ref, head_dim, positions, 10000.0f);
  Tensor back_ref = fwd_ref;
  ops::rope_backward(back_ref, head_dim, positions, 10000.0f);

  DeviceAllocator alloc;
  Stream stream;
  const Ints pos_d(alloc, positions);
  DeviceTensor x_d = upload(alloc, x);
  rope(x_d, head_dim, pos_d.get(), 10000.0f, 1.0f, stream);
  stream.synchronize();
  // Angles up to 500 rad: device and host sin/cos differ by a few ulp of the angle.
  expect_close(x_d.to_host(), fwd_ref, 1e-4, 1e-4, "rope forward");
  rope(x_d, head_dim, pos_d.get(), 10000.0f, -1.0f, stream);
  stream.synchronize();
  expect_close(x_d.to_host(), back_ref, 1e-4, 1e-4, "rope backward");
  expect_close(x_d.to_host(), x, 1e-4, 1e-4, "rope there and back");
}

TEST(CrossEntropyPiecesCuda, VocabularyShardMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(13);
  const Index rows = 21, vocab = 700, begin = 700; // the second of two shards
  const Tensor logits = random_tensor(rng, rows, vocab, 2.0f);
  const std::vector<std::int32_t> targets = random_tokens(rng, rows, 0, 1399);
  const float scale = 0.125f;
  Tensor mx(rows, 1), sum(rows, 1), target(rows, 1), dlogits(rows, vocab);
  ops::row_max(logits, mx);
  ops::row_sum_exp(logits, mx, sum);
  ops::target_logits(logits, targets, begin, target);
  ops::cross_entropy_backward(logits, mx, sum, targets, begin, scale, dlogits);

  DeviceAllocator alloc;
  Stream stream;
  const Ints targets_d(alloc, targets);
  DeviceTensor logits_d = upload(alloc, logits);
  DeviceTensor mx_d(alloc, rows, 1), sum_d(alloc, rows, 1), target_d(alloc, rows, 1);
  row_max(logits_d, mx_d, stream);
  row_sum_exp(logits_d, mx_d, sum_d, stream);
  target_logits(logits_d, targets_d.get(), begin, target_d, stream);
  cross_entropy_backward(logits_d, mx_d, sum_d, targets_d.get(), begin, scale, logits_d, stream);
  stream.synchronize();
  expect_close(mx_d.to_host(), mx, 0.0, 0.0, "row max");
  expect_close(sum_d.to_host(), sum, 1e-5, 1e-6, "row sum of exp");
  expect_close(target_d.to_host(), target, 0.0, 0.0, "target logits");
  expect_close(logits_d.to_host(), dlogits, 1e-4, 1e-8, "logits gradient (in place)");
}

// The batched-GEMM attention against the CPU ops: probabilities, output and the three input
// gradients, in fp32 (tight) and bf16 (bf16 rounding of every GEMM input).
void check_attention_gemm(const AttentionShape& shape, GemmPrecision precision, unsigned seed) {
  std::mt19937 rng(seed);
  const ops::AttentionShape cs{shape.batch, shape.seq, shape.heads, shape.kv_heads, shape.head_dim};
  const Index rows = shape.batch * shape.seq;
  const Index qw = Index{shape.heads} * shape.head_dim;
  const Index kw = Index{shape.kv_heads} * shape.head_dim;
  // bf16: inputs already on the bf16 grid, so the device's conversion of q, k, v and dO is
  // exact and the probabilities (fp32 products of them) must match tightly; only P and dS
  // are rounded on the way into the second GEMMs.
  const bool bf16 = precision == GemmPrecision::bf16;
  const auto input = [&](Index r, Index c) {
    const Tensor t = random_tensor(rng, r, c);
    return bf16 ? test::rounded_to_bf16(t) : t;
  };
  const Tensor q = input(rows, qw);
  const Tensor k = input(rows, kw);
  const Tensor v = input(rows, kw);
  const Tensor dout = input(rows, qw);
  Tensor probs(shape.batch * shape.heads, shape.seq * shape.seq);
  Tensor out_ref(rows, qw);
  ops::attention_forward(q, k, v, cs, probs, out_ref);
  Tensor dq_ref(rows, qw), dk_ref(rows, kw), dv_ref(rows, kw);
  ops::attention_backward(q, k, v, probs, dout, cs, dq_ref, dk_ref, dv_ref);

  DeviceAllocator alloc;
  Stream stream;
  Blas blas(alloc);
  const DeviceTensor q_d = upload(alloc, q), k_d = upload(alloc, k), v_d = upload(alloc, v),
                     dout_d = upload(alloc, dout);
  DeviceTensor probs_d(alloc, probs.rows(), probs.cols());
  DeviceTensor again_d(alloc, probs.rows(), probs.cols());
  DeviceTensor out_d(alloc, rows, qw), dq_d(alloc, rows, qw), dk_d(alloc, rows, kw),
      dv_d(alloc, rows, kw);
  attention_gemm_forward(blas, precision, alloc, q_d, k_d, v_d, shape, probs_d, out_d, stream);
  attention_gemm_probs(blas, precision, alloc, q_d, k_d, shape, again_d, stream);
  attention_gemm_backward(blas, precision, alloc, q_d, k_d, v_d, probs_d, dout_d, shape, dq_d, dk_d,
                          dv_d, stream);
  stream.synchronize();
  // tf32 keeps 11 significant bits of every GEMM input, fp32 24; bf16 inputs are exact here
  // and P, dS lose all but 8 bits before their GEMMs.
  const double rel = precision == GemmPrecision::tf32 ? 5e-3 : 1e-4;
  const double abs = precision == GemmPrecision::tf32 ? 5e-3 : 2e-5;
  const double grad_rel = bf16 ? 1e-2 : 10 * rel;
  const double grad_abs = bf16 ? 1e-2 : 10 * abs;
  const std::string what = std::string("gemm attention ") + gemm_precision_name(precision) + " b" +
                           std::to_string(shape.batch) + " s" + std::to_string(shape.seq) + " a" +
                           std::to_string(shape.heads) + " g" + std::to_string(shape.kv_heads) +
                           " d" + std::to_string(shape.head_dim);
  expect_close(probs_d.to_host(), probs, rel, abs, what + " probs");
  EXPECT_EQ(again_d.to_host(), probs_d.to_host()) << what << ": recomputed probabilities differ";
  expect_close(out_d.to_host(), out_ref, bf16 ? 1e-2 : rel, bf16 ? 1e-2 : abs, what + " out");
  expect_close(dq_d.to_host(), dq_ref, grad_rel, grad_abs, what + " dq");
  expect_close(dk_d.to_host(), dk_ref, grad_rel, grad_abs, what + " dk");
  expect_close(dv_d.to_host(), dv_ref, grad_rel, grad_abs, what + " dv");
}

TEST(AttentionGemmCuda, MatchesCpuWithGroupedQueriesAndOddSequences) {
  SKIP_WITHOUT_GPU();
  check_attention_gemm({2, 45, 4, 2, 32}, GemmPrecision::f32, 51);
  check_attention_gemm({1, 70, 3, 3, 64}, GemmPrecision::f32, 52);
  check_attention_gemm({3, 1, 2, 2, 16}, GemmPrecision::f32, 53); // one position: out = v
  check_attention_gemm({2, 64, 4, 1, 64}, GemmPrecision::bf16, 54);
  check_attention_gemm({1, 33, 4, 2, 32}, GemmPrecision::bf16, 56); // odd rows of bf16 P and dS
  check_attention_gemm({1, 33, 2, 2, 24}, GemmPrecision::tf32, 55);
}

TEST(ElementwiseCuda, SumsAndSumOfSquares) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(14);
  const Index n = 100003; // not a multiple of any block size
  const Tensor a = random_tensor(rng, 1, n);
  const Tensor b = random_tensor(rng, 1, n);
  Tensor sum_ref(1, n);
  sum_ref.m() = a.m() + b.m();
  double sq_ref = 0;
  for (Index i = 0; i < n; ++i)
    sq_ref += static_cast<double>(a.data()[i]) * a.data()[i];

  DeviceAllocator alloc;
  Stream stream;
  DeviceTensor a_d = upload(alloc, a);
  const DeviceTensor b_d = upload(alloc, b);
  DeviceTensor y_d(alloc, 1, n);
  add(a_d, b_d, y_d, stream);
  DeviceTensor total(alloc, 1, 2);
  DeviceTensor partials(alloc, 1, 2 * kSumSquaresBlocks);
  total.zero(stream);
  const auto* af = static_cast<const float*>(a_d.data());
  accumulate_sum_squares(af, n, static_cast<double*>(total.data()),
                         static_cast<double*>(partials.data()), stream);
  accumulate_sum_squares(af, 0, static_cast<double*>(total.data()),
                         static_cast<double*>(partials.data()), stream); // empty range
  add_inplace(static_cast<float*>(a_d.data()), static_cast<const float*>(b_d.data()), n, stream);
  stream.synchronize();
  expect_close(y_d.to_host(), sum_ref, 0.0, 0.0, "a + b");
  expect_close(a_d.to_host(), sum_ref, 0.0, 0.0, "a += b");
  double sq = 0;
  PARALLAX_CUDA_CHECK(cudaMemcpy(&sq, total.data(), sizeof(double), cudaMemcpyDeviceToHost));
  EXPECT_NEAR(sq, sq_ref, 1e-12 * sq_ref);
  // The same sum again is the same bits (fixed grid, fixed order).
  total.zero(stream);
  accumulate_sum_squares(static_cast<const float*>(b_d.data()), n,
                         static_cast<double*>(total.data()), static_cast<double*>(partials.data()),
                         stream);
  stream.synchronize();
  double first = 0;
  PARALLAX_CUDA_CHECK(cudaMemcpy(&first, total.data(), sizeof(double), cudaMemcpyDeviceToHost));
  total.zero(stream);
  accumulate_sum_squares(static_cast<const float*>(b_d.data()), n,
                         static_cast<double*>(total.data()), static_cast<double*>(partials.data()),
                         stream);
  stream.synchronize();
  double second = 0;
  PARALLAX_CUDA_CHECK(cudaMemcpy(&second, total.data(), sizeof(double), cudaMemcpyDeviceToHost));
  EXPECT_EQ(first, second);
}

} // namespace
} // namespace parallax::cuda
