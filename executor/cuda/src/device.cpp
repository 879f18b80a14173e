#include "parallax/executor/cuda/device.hpp"

#include "parallax/executor/cuda/check.hpp"

namespace parallax::cuda {

int device_count() {
  int count = 0;
  // cudaErrorNoDevice / cudaErrorInsufficientDriver just mean "no GPU here"; neither is sticky,
  // but clear the last-error slot so later checks do not see it.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

bool gpu_available() {
  static const bool available = device_count() > 0;
  return available;
}

void set_device(int device) {
  PARALLAX_CUDA_CHECK(cudaSetDevice(device));
}

int current_device() {
  int device = 0;
  PARALLAX_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

void device_synchronize() {
  PARALLAX_CUDA_CHECK(cudaDeviceSynchronize());
}

} // namespace parallax::cuda
