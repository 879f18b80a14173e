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

double device_memory_bytes() {
  if (!gpu_available())
    return 0;
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
  PARALLAX_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return static_cast<double>(total_bytes);
}

std::string device_name(int device) {
  if (device < 0 || device >= device_count())
    return {};
  cudaDeviceProp prop{};
  PARALLAX_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

std::string_view zoo_profile_for(std::string_view name) {
  const auto has = [&](std::string_view s) { return name.find(s) != std::string_view::npos; };
  if (has("H200"))
    return "dgx-h200";
  if (has("H100"))
    return "dgx-h100";
  if (has("A100"))
    return has("80GB") ? "dgx-a100-80g" : "dgx-a100-40g";
  if (has("V100"))
    return "dgx2-v100";
  return {};
}

} // namespace parallax::cuda
