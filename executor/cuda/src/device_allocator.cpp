#include "parallax/executor/cuda/device_allocator.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/cuda/check.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <stdexcept>

namespace parallax::cuda {

namespace {

constexpr std::size_t kSmallLimitBytes = 4096;

std::int64_t as_i64(std::size_t bytes) {
  return static_cast<std::int64_t>(bytes);
}

} // namespace

std::size_t DeviceAllocator::size_class(std::size_t bytes) {
  if (bytes <= kSmallLimitBytes)
    return std::max<std::size_t>(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
  // Four classes per octave: the power of two at or below `bytes`, split in quarters.
  const std::size_t octave = std::bit_floor(bytes);
  const std::size_t quarter = octave / 4;
  return (bytes + quarter - 1) / quarter * quarter;
}

DeviceAllocator::~DeviceAllocator() {
  std::lock_guard lock(mutex_);
  for (auto& [bytes, blocks] : free_) {
    for (void* p : blocks)
      (void)cudaFree(p); // destructors must not throw
  }
  free_.clear();
}

void* DeviceAllocator::allocate(std::size_t bytes) {
  if (bytes == 0)
    return nullptr;
  const std::size_t cls = size_class(bytes);
  std::lock_guard lock(mutex_);
  void* ptr = nullptr;
  auto it = free_.find(cls);
  if (it != free_.end() && !it->second.empty()) {
    ptr = it->second.back();
    it->second.pop_back();
  } else {
    cudaError_t status = cudaMalloc(&ptr, cls);
    if (status == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError(); // an out-of-memory error is not sticky; clear it and retry
      release_cached_locked();
      status = cudaMalloc(&ptr, cls);
    }
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      throw std::runtime_error(fmt::format(
          "device allocation of {} bytes (class {}) failed: {}; in use {} bytes, reserved {} "
          "bytes, peak in use {} bytes. Hint: a smaller micro-batch, more recomputation or a "
          "higher ZeRO stage lowers the memory per device",
          bytes, cls, cudaGetErrorString(status), in_use_bytes_, reserved_bytes_,
          peak_in_use_bytes_));
    }
    reserved_bytes_ += as_i64(cls);
    peak_reserved_bytes_ = std::max(peak_reserved_bytes_, reserved_bytes_);
  }
  live_.emplace(ptr, Live{bytes, cls});
  in_use_bytes_ += as_i64(bytes);
  peak_in_use_bytes_ = std::max(peak_in_use_bytes_, in_use_bytes_);
  return ptr;
}

void DeviceAllocator::deallocate(void* ptr) {
  if (ptr == nullptr)
    return;
  std::lock_guard lock(mutex_);
  auto it = live_.find(ptr);
  PARALLAX_CHECK(it != live_.end(), "deallocate of a pointer this allocator did not hand out");
  in_use_bytes_ -= as_i64(it->second.requested_bytes);
  free_[it->second.class_bytes].push_back(ptr);
  live_.erase(it);
}

void DeviceAllocator::release_cached() {
  std::lock_guard lock(mutex_);
  release_cached_locked();
}

void DeviceAllocator::release_cached_locked() {
  for (auto& [cls, blocks] : free_) {
    for (void* p : blocks) {
      PARALLAX_CUDA_CHECK(cudaFree(p));
      reserved_bytes_ -= as_i64(cls);
    }
    blocks.clear();
  }
}

std::int64_t DeviceAllocator::bytes_in_use() const {
  std::lock_guard lock(mutex_);
  return in_use_bytes_;
}

std::int64_t DeviceAllocator::peak_bytes_in_use() const {
  std::lock_guard lock(mutex_);
  return peak_in_use_bytes_;
}

std::int64_t DeviceAllocator::bytes_reserved() const {
  std::lock_guard lock(mutex_);
  return reserved_bytes_;
}

std::int64_t DeviceAllocator::peak_bytes_reserved() const {
  std::lock_guard lock(mutex_);
  return peak_reserved_bytes_;
}

void DeviceAllocator::reset_peak() {
  std::lock_guard lock(mutex_);
  peak_in_use_bytes_ = in_use_bytes_;
  peak_reserved_bytes_ = reserved_bytes_;
}

} // namespace parallax::cuda
