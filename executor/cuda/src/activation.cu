// GELU (tanh approximation) and SwiGLU, forward and backward: elementwise grid-stride loops.
#include "parallax/executor/cuda/ops.hpp"

#include "kernel_utils.cuh"

namespace parallax::cuda {

namespace {

using detail::check_view;
using detail::global_thread;
using detail::grid_threads;

constexpr float kGeluC = 0.7978845608028654f; // sqrt(2/pi)
constexpr float kGeluA = 0.044715f;
constexpr int kBlock = 256;

__global__ void gelu_forward_kernel(const float* x, float* y, std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.0f + tanhf(kGeluC * (v + kGeluA * v * v * v)));
  }
}

__global__ void gelu_backward_kernel(const float* x, const float* dy, float* dx, std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float v = x[i];
    const float t = tanhf(kGeluC * (v + kGeluA * v * v * v));
    const float dt = (1.0f - t * t) * kGeluC * (1.0f + 3.0f * kGeluA * v * v);
    dx[i] = dy[i] * (0.5f * (1.0f + t) + 0.5f * v * dt);
  }
}

__device__ inline float sigmoid(float g) {
  return 1.0f / (1.0f + expf(-g));
}

__global__ void swiglu_forward_kernel(const float* gate, const float* up, float* y,
                                      std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float g = gate[i];
    y[i] = g * sigmoid(g) * up[i];
  }
}

__global__ void swiglu_backward_kernel(const float* gate, const float* up, const float* dy,
                                       float* dgate, float* dup, std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float g = gate[i];
    const float u = up[i];
    const float d = dy[i];
    const float sig = sigmoid(g);
    dup[i] = d * g * sig;
    dgate[i] = d * u * (sig * (1.0f + g * (1.0f - sig)));
  }
}

} // namespace

void gelu_forward(DeviceView x, DeviceView y, cudaStream_t stream) {
  check_view(x, x.rows, x.cols, DType::f32, "gelu input");
  check_view(y, x.rows, x.cols, DType::f32, "gelu output");
  if (x.size() == 0)
    return;
  gelu_forward_kernel<<<detail::grid_for(x.size(), kBlock), kBlock, 0, stream>>>(x.f32(), y.f32(),
                                                                                 x.size());
  detail::check_launch();
}

void gelu_backward(DeviceView x, DeviceView dy, DeviceView dx, cudaStream_t stream) {
  check_view(x, x.rows, x.cols, DType::f32, "gelu input");
  check_view(dy, x.rows, x.cols, DType::f32, "gelu output gradient");
  check_view(dx, x.rows, x.cols, DType::f32, "gelu input gradient");
  if (x.size() == 0)
    return;
  gelu_backward_kernel<<<detail::grid_for(x.size(), kBlock), kBlock, 0, stream>>>(
      x.f32(), dy.f32(), dx.f32(), x.size());
  detail::check_launch();
}

void swiglu_forward(DeviceView gate, DeviceView up, DeviceView y, cudaStream_t stream) {
  check_view(gate, gate.rows, gate.cols, DType::f32, "swiglu gate");
  check_view(up, gate.rows, gate.cols, DType::f32, "swiglu up");
  check_view(y, gate.rows, gate.cols, DType::f32, "swiglu output");
  if (gate.size() == 0)
    return;
  swiglu_forward_kernel<<<detail::grid_for(gate.size(), kBlock), kBlock, 0, stream>>>(
      gate.f32(), up.f32(), y.f32(), gate.size());
  detail::check_launch();
}

void swiglu_backward(DeviceView gate, DeviceView up, DeviceView dy, DeviceView dgate,
                     DeviceView dup, cudaStream_t stream) {
  check_view(gate, gate.rows, gate.cols, DType::f32, "swiglu gate");
  check_view(up, gate.rows, gate.cols, DType::f32, "swiglu up");
  check_view(dy, gate.rows, gate.cols, DType::f32, "swiglu output gradient");
  check_view(dgate, gate.rows, gate.cols, DType::f32, "swiglu gate gradient");
  check_view(dup, gate.rows, gate.cols, DType::f32, "swiglu up gradient");
  if (gate.size() == 0)
    return;
  swiglu_backward_kernel<<<detail::grid_for(gate.size(), kBlock), kBlock, 0, stream>>>(
      gate.f32(), up.f32(), dy.f32(), dgate.f32(), dup.f32(), gate.size());
  detail::check_launch();
}

} // namespace parallax::cuda
