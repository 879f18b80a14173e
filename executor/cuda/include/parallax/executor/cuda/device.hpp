// The CUDA backend of the executor: what is here and how the pieces fit.
//
//   if (!parallax::cuda::gpu_available()) { ...fall back to the CPU backend... }
//   parallax::cuda::DeviceAllocator alloc;                 // caching, exact accounting
//   parallax::cuda::Stream stream;                         // every op takes the stream it runs on
//   parallax::cuda::Blas blas(alloc);                      // cuBLASLt handle + workspace
//   DeviceTensor x(alloc, tokens, h), w(alloc, h, f), y(alloc, tokens, f);
//   x.copy_from_host(host_x);  w.copy_from_host(host_w);
//   parallax::cuda::linear_forward(blas, x, w, {}, y, GemmPrecision::tf32, stream);
//   stream.synchronize();  std::vector<float> out = y.to_host();
//
// Layouts are those of the CPU ops (executor/include/parallax/executor/ops.hpp): activations
// [tokens, features] row-major, weights [in, out], backward overwrites dx and accumulates dW.
// Headers here include only plain C CUDA headers, so host C++ uses them without nvcc.
#pragma once

#include <string>
#include <string_view>

namespace parallax::cuda {

// True when the CUDA runtime finds at least one device. Never aborts: a machine without a
// driver or without a device answers false. Computed once per process.
bool gpu_available();
// Number of visible devices (0 without a driver).
int device_count();
// Makes `device` current for the calling thread.
void set_device(int device);
int current_device();
// Waits for all work on the current device.
void device_synchronize();
// Total memory of the current device in bytes (0 without one).
double device_memory_bytes();
// The marketing name of device `device` (e.g. "NVIDIA H100 80GB HBM3"); empty without one.
std::string device_name(int device = 0);
// The zoo cluster profile whose device is this GPU model ("dgx-h100", "dgx-h200",
// "dgx-a100-80g", "dgx-a100-40g", "dgx2-v100"), or empty for a device the zoo does not have.
std::string_view zoo_profile_for(std::string_view device_name);

} // namespace parallax::cuda
