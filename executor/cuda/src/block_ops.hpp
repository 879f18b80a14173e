// The CUDA op set of the transformer layer (parallax/executor/detail/block.hpp): device
// micro-batches and caches, and Ctx, the stream, allocator and cuBLAS handle with the device
// kernels as the layer's ops. Private to trainer_cuda.cpp.
#pragma once

#include "parallax/core/error.hpp"
#include "parallax/executor/cuda/attention_gemm.hpp"
#include "parallax/executor/cuda/check.hpp"
#include "parallax/executor/cuda/device_allocator.hpp"
#include "parallax/executor/cuda/device_tensor.hpp"
#include "parallax/executor/cuda/gemm.hpp"
#include "parallax/executor/cuda/ops.hpp"
#include "parallax/executor/cuda/trainer.hpp"
#include "parallax/executor/data.hpp"
#include "parallax/executor/detail/block.hpp"

#include <cuda_runtime.h>

#include <span>
#include <string>
#include <utility>
#include <vector>

namespace parallax::cuda {

using Index = std::int64_t;

inline std::span<float> span_of(const DeviceTensor& t) {
  return {static_cast<float*>(t.data()), static_cast<std::size_t>(t.size())};
}

// A device int32 array uploaded on a stream from host memory that outlives the copy.
class DeviceInts {
public:
  DeviceInts() = default;
  DeviceInts(DeviceAllocator& allocator, std::span<const std::int32_t> host, cudaStream_t stream)
      : allocator_(&allocator) {
    data_ = static_cast<std::int32_t*>(allocator.allocate(host.size_bytes()));
    if (!host.empty()) {
      PARALLAX_CUDA_CHECK(
          cudaMemcpyAsync(data_, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, stream));
    }
  }
  ~DeviceInts() {
    if (allocator_ != nullptr)
      allocator_->deallocate(data_);
  }
  DeviceInts(DeviceInts&& o) noexcept
      : allocator_(std::exchange(o.allocator_, nullptr)), data_(std::exchange(o.data_, nullptr)) {}
  DeviceInts& operator=(DeviceInts&& o) noexcept {
    std::swap(allocator_, o.allocator_);
    std::swap(data_, o.data_);
    return *this;
  }
  DeviceInts(const DeviceInts&) = delete;
  DeviceInts& operator=(const DeviceInts&) = delete;
  const std::int32_t* get() const { return data_; }

private:
  DeviceAllocator* allocator_ = nullptr;
  std::int32_t* data_ = nullptr;
};

// Rows grouped by token (TokenGroups) on the host and the device, for the embedding backward.
struct DeviceGroups {
  TokenGroups host;
  DeviceInts order, starts, tokens;
  DeviceGroups() = default;
  DeviceGroups(DeviceAllocator& alloc, std::span<const std::int32_t> row_tokens,
               cudaStream_t stream)
      : host(TokenGroups::of(row_tokens)), order(alloc, host.order, stream),
        starts(alloc, host.starts, stream), tokens(alloc, host.tokens, stream) {}
};

// A micro-batch on the device. The host vectors stay here (their buffers do not move when the
// batch does) until the step ends, so the asynchronous uploads always read live memory.
struct DeviceBatch {
  MicroBatch host;
  std::vector<std::int32_t> full_positions_host; // position of every row before any SP split
  DeviceInts inputs, targets, positions, full_positions;
  DeviceGroups input_groups, position_groups;
};

struct DeviceCache {
  std::vector<DeviceTensor> t;
};

// The device as the layer's op set: every kernel queued on one stream.
struct Ctx {
  using Tensor = DeviceTensor;
  using In = DeviceView;
  using Out = DeviceView;
  using Batch = DeviceBatch;
  using Shape = AttentionShape;

  DeviceAllocator& alloc;
  Blas& blas;
  cudaStream_t stream;
  GemmPrecision precision;
  AttentionKernel attention;

  DeviceTensor make(Index rows, Index cols) const { return DeviceTensor(alloc, rows, cols); }
  DeviceTensor copy(const DeviceTensor& x) const {
    DeviceTensor y = make(x.rows(), x.cols());
    copy_floats(static_cast<float*>(y.data()), static_cast<const float*>(x.data()), x.size());
    return y;
  }
  void copy_floats(float* dst, const float* src, Index n) const {
    if (n > 0) {
      PARALLAX_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(float),
                                          cudaMemcpyDeviceToDevice, stream));
    }
  }
  std::span<float> floats(DeviceTensor& x) const { return span_of(x); }
  std::span<const float> floats(const DeviceTensor& x) const { return span_of(x); }
  DeviceView view(const DeviceTensor& x) const { return x.view(); }
  const MicroBatch& host(const DeviceBatch& mb) const { return mb.host; }
  DeviceView param(const BlockBuffers& b, std::string_view suffix) const {
    const ParamInfo& i = b.layout->param(suffix);
    return {const_cast<float*>(b.params) + i.offset, i.local_rows, i.local_cols, DType::f32};
  }
  DeviceView grad(const BlockBuffers& b, std::string_view suffix) const {
    const ParamInfo& i = b.layout->param(suffix);
    return {b.grads + i.offset, i.local_rows, i.local_cols, DType::f32};
  }
  void synchronize() const { PARALLAX_CUDA_CHECK(cudaStreamSynchronize(stream)); }

  // x as a GEMM input of this precision: itself (fp32, tf32, or already bf16), or a bf16 copy
  // (mixed precision: fp32 master weights and activations, bf16 GEMM inputs, fp32 results).
  struct Operand {
    DeviceTensor copy; // the bf16 copy when one was made
    DeviceView view;
  };
  Operand operand(DeviceView x) const {
    const DType want = gemm_input_dtype(precision);
    if (x.dtype == want || !x)
      return {DeviceTensor(), x};
    Operand o{DeviceTensor(alloc, x.rows, x.cols, want), {}};
    convert_f32_to_bf16(x, o.copy, stream);
    o.view = o.copy.view();
    return o;
  }
  // A GEMM-only activation kept for the backward: replaced by its bf16 copy under bf16.
  DeviceTensor gemm_input(DeviceTensor x) const {
    if (x.dtype() == gemm_input_dtype(precision))
      return x;
    Operand o = operand(x);
    return std::move(o.copy);
  }

  // y = x·W (+ b) and its backward with every GEMM input converted as needed.
  void linear(DeviceView x, DeviceView w, DeviceView b, DeviceView y) const {
    const Operand xo = operand(x), wo = operand(w);
    linear_forward(blas, xo.view, wo.view, b, y, precision, stream);
  }
  // The bias gradient sums the fp32 dy (as the CPU op does), not its bf16 copy.
  void linear_grad(DeviceView x, DeviceView w, DeviceView dy, DeviceView dx, DeviceView dw,
                   DeviceView db, bool accumulate_dx) const {
    if (db)
      accumulate_column_sums(dy, db, stream);
    const Operand xo = operand(x), wo = operand(w), dyo = operand(dy);
    linear_backward(blas, xo.view, wo.view, dyo.view, dx, dw, {}, precision, stream, accumulate_dx);
  }
  // c = alpha·op(a)·op(b) + beta·c.
  void gemm(DeviceView a, bool ta, DeviceView b, bool tb, DeviceView out, float beta) const {
    const Operand ao = operand(a), bo = operand(b);
    matmul(blas, precision, ao.view, ta, bo.view, tb, out, 1.0f, beta, {}, stream);
  }

  block::NormOut<DeviceTensor> norm_forward(const ExecModel& m, const BlockBuffers& b,
                                            const std::string& prefix,
                                            const DeviceTensor& x) const {
    block::NormOut<DeviceTensor> o{make(x.rows(), x.cols()), DeviceTensor(), make(x.rows(), 1)};
    if (m.rmsnorm()) {
      rmsnorm_forward(x, {}, {}, param(b, prefix + ".gamma"), o.y, o.rstd, m.norm_eps, stream);
    } else {
      o.mean = make(x.rows(), 1);
      layernorm_forward(x, {}, {}, param(b, prefix + ".gamma"), param(b, prefix + ".beta"), o.y,
                        o.mean, o.rstd, m.norm_eps, stream);
    }
    return o;
  }
  // dx = ∂loss/∂u, plus dx's previous value when `accumulate` (the residual stream's gradient).
  void norm_backward(const ExecModel& m, const BlockBuffers& b, const std::string& prefix,
                     const DeviceTensor& u, const DeviceTensor& mean, const DeviceTensor& rstd,
                     const DeviceTensor& dy, DeviceTensor& dx, bool accumulate) const {
    if (!accumulate)
      dx = make(u.rows(), u.cols());
    const DeviceView residual = accumulate ? dx.view() : DeviceView{};
    if (m.rmsnorm()) {
      rmsnorm_backward(u, param(b, prefix + ".gamma"), rstd, dy, residual, dx,
                       grad(b, prefix + ".gamma"), stream);
    } else {
      layernorm_backward(u, param(b, prefix + ".gamma"), mean, rstd, dy, residual, dx,
                         grad(b, prefix + ".gamma"), grad(b, prefix + ".beta"), stream);
    }
  }

  void add(DeviceView x, DeviceView y, DeviceView out) const { cuda::add(x, y, out, stream); }
  void add_bias(DeviceView y, DeviceView b) const { cuda::add_bias(y, b, stream); }
  void bias_grad(DeviceView dy, DeviceView db) const { accumulate_column_sums(dy, db, stream); }
  void gelu_forward(DeviceView x, DeviceView y) const { cuda::gelu_forward(x, y, stream); }
  void gelu_backward(DeviceView x, DeviceView dy, DeviceView dx) const {
    cuda::gelu_backward(x, dy, dx, stream);
  }
  void swiglu_forward(DeviceView g, DeviceView u, DeviceView y) const {
    cuda::swiglu_forward(g, u, y, stream);
  }
  void swiglu_backward(DeviceView g, DeviceView u, DeviceView dy, DeviceView dg,
                       DeviceView du) const {
    cuda::swiglu_backward(g, u, dy, dg, du, stream);
  }
  // Rotary embedding at each row's position in the full (not sequence-parallel) sequence.
  void rope(DeviceView q, DeviceView k, int head_dim, const DeviceBatch& mb, float theta,
            bool backward) const {
    const float direction = backward ? -1.0f : 1.0f;
    cuda::rope(q, head_dim, mb.full_positions.get(), theta, direction, stream);
    cuda::rope(k, head_dim, mb.full_positions.get(), theta, direction, stream);
  }

  // The GEMM attention keeps the probabilities (selective recomputation drops them), the flash
  // attention only their log-sum-exp.
  void attention_forward(const AttentionShape& shape, KeepMode keep,
                         std::vector<DeviceTensor>& t) const {
    using namespace block;
    if (attention == AttentionKernel::gemm) {
      t[kProbs] = make(shape.batch * shape.heads, shape.seq * shape.seq);
      attention_gemm_forward(blas, precision, alloc, t[kQ], t[kK], t[kV], shape, t[kProbs], t[kAtt],
                             stream);
      if (keep != KeepMode::all)
        t[kProbs].release();
    } else {
      t[kLse] = make(shape.batch * shape.heads, shape.seq);
      cuda::attention_forward(t[kQ], t[kK], t[kV], shape, t[kAtt], t[kLse], stream);
    }
  }
  void attention_backward(const AttentionShape& shape, std::vector<DeviceTensor>& t,
                          const DeviceTensor& datt, DeviceTensor& dq, DeviceTensor& dk,
                          DeviceTensor& dv) const {
    using namespace block;
    if (attention == AttentionKernel::gemm) {
      t[kAtt].release();
      if (t[kProbs].empty()) {
        // Selective recomputation: the probabilities come back from q and k.
        t[kProbs] = make(shape.batch * shape.heads, shape.seq * shape.seq);
        attention_gemm_probs(blas, precision, alloc, t[kQ], t[kK], shape, t[kProbs], stream);
      }
      attention_gemm_backward(blas, precision, alloc, t[kQ], t[kK], t[kV], t[kProbs], datt, shape,
                              dq, dk, dv, stream);
      t[kProbs].release();
    } else {
      DeviceTensor delta = make(t[kLse].rows(), t[kLse].cols());
      cuda::attention_backward(t[kQ], t[kK], t[kV], t[kAtt], datt, t[kLse], shape, delta, dq, dk,
                               dv, stream);
      t[kAtt].release();
      t[kLse].release();
    }
  }
};
static_assert(block::BlockOps<Ctx>);

} // namespace parallax::cuda
