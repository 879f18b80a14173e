#include "parallax/executor/cuda/device_tensor.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/cuda/check.hpp"
#include "parallax/executor/cuda/device_allocator.hpp"

#include <bit>
#include <utility>

namespace parallax::cuda {

const char* dtype_name(DType t) {
  return t == DType::f32 ? "f32" : "bf16";
}

float* DeviceView::f32() const {
  PARALLAX_CHECK(dtype == DType::f32,
                 std::string("expected an f32 tensor, got ") + dtype_name(dtype));
  return static_cast<float*>(data);
}

std::uint16_t* DeviceView::bf16_bits() const {
  PARALLAX_CHECK(dtype == DType::bf16,
                 std::string("expected a bf16 tensor, got ") + dtype_name(dtype));
  return static_cast<std::uint16_t*>(data);
}

std::uint16_t bf16_from_float(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0)
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);  // NaN: keep it a (quiet) NaN
  const std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u); // to nearest, ties to even
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

float float_from_bf16(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

DeviceTensor::DeviceTensor(DeviceAllocator& allocator, std::int64_t rows, std::int64_t cols,
                           DType dtype)
    : allocator_(&allocator), rows_(rows), cols_(cols), dtype_(dtype) {
  PARALLAX_CHECK(rows >= 0 && cols >= 0, "negative tensor shape");
  data_ = allocator.allocate(static_cast<std::size_t>(rows * cols * dtype_bytes(dtype)));
}

DeviceTensor::~DeviceTensor() {
  release();
}

DeviceTensor::DeviceTensor(DeviceTensor&& other) noexcept
    : allocator_(std::exchange(other.allocator_, nullptr)),
      data_(std::exchange(other.data_, nullptr)), rows_(std::exchange(other.rows_, 0)),
      cols_(std::exchange(other.cols_, 0)), dtype_(other.dtype_) {}

DeviceTensor& DeviceTensor::operator=(DeviceTensor&& other) noexcept {
  if (this != &other) {
    release();
    allocator_ = std::exchange(other.allocator_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    rows_ = std::exchange(other.rows_, 0);
    cols_ = std::exchange(other.cols_, 0);
    dtype_ = other.dtype_;
  }
  return *this;
}

void DeviceTensor::release() {
  if (data_ != nullptr && allocator_ != nullptr)
    allocator_->deallocate(data_);
  data_ = nullptr;
  rows_ = cols_ = 0;
}

void DeviceTensor::copy_from_host(std::span<const float> values) {
  PARALLAX_CHECK(static_cast<std::int64_t>(values.size()) == size(),
                 "copy_from_host: " + std::to_string(values.size()) + " values for a tensor of " +
                     std::to_string(size()));
  if (values.empty())
    return;
  if (dtype_ == DType::f32) {
    PARALLAX_CUDA_CHECK(
        cudaMemcpy(data_, values.data(), values.size_bytes(), cudaMemcpyHostToDevice));
  } else {
    std::vector<std::uint16_t> bits(values.size());
    for (std::size_t i = 0; i < values.size(); ++i)
      bits[i] = bf16_from_float(values[i]);
    PARALLAX_CUDA_CHECK(cudaMemcpy(data_, bits.data(), bits.size() * sizeof(std::uint16_t),
                                   cudaMemcpyHostToDevice));
  }
  // A copy from pageable memory may return before its DMA lands, ordered only on the legacy
  // stream; wait for it so kernels on non-blocking streams see the data.
  PARALLAX_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

std::vector<float> DeviceTensor::to_host() const {
  std::vector<float> out(static_cast<std::size_t>(size()));
  if (out.empty())
    return out;
  if (dtype_ == DType::f32) {
    PARALLAX_CUDA_CHECK(
        cudaMemcpy(out.data(), data_, out.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return out;
  }
  std::vector<std::uint16_t> bits(out.size());
  PARALLAX_CUDA_CHECK(
      cudaMemcpy(bits.data(), data_, bits.size() * sizeof(std::uint16_t), cudaMemcpyDeviceToHost));
  for (std::size_t i = 0; i < out.size(); ++i)
    out[i] = float_from_bf16(bits[i]);
  return out;
}

void DeviceTensor::zero(cudaStream_t stream) {
  if (data_ != nullptr)
    PARALLAX_CUDA_CHECK(
        cudaMemsetAsync(data_, 0, static_cast<std::size_t>(size() * dtype_bytes(dtype_)), stream));
}

} // namespace parallax::cuda
