// Executor tensors: fp32 row-major matrices on memory the executor accounts for itself.
//
// Every activation, parameter, gradient and optimizer buffer of the CPU executor is allocated
// through TrackingAllocator, so MemoryTracker's peak is the executor's own measured peak memory
// (what `parallax train` reports and `compare` sets against the planner's memory model).
#pragma once

#include <Eigen/Core>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace parallax {

// Bytes currently held and the high-water mark, process-wide.
class MemoryTracker {
public:
  static void allocated(std::int64_t bytes);
  static void freed(std::int64_t bytes);
  static std::int64_t current();
  static std::int64_t peak();
  // Restarts the high-water mark at the current value.
  static void reset_peak();
};

template <class T> struct TrackingAllocator {
  using value_type = T;
  TrackingAllocator() = default;
  template <class U> TrackingAllocator(const TrackingAllocator<U>&) noexcept {}
  // 64-byte (cache line, AVX-512) alignment for every buffer: Eigen's vectorised reductions
  // start with a scalar prologue up to the first aligned element, so a fixed alignment keeps
  // their summation order — and the run's results — the same from run to run.
  static constexpr std::align_val_t kAlignment{64};
  T* allocate(std::size_t n) {
    T* p = static_cast<T*>(::operator new(n * sizeof(T), kAlignment));
    MemoryTracker::allocated(static_cast<std::int64_t>(n * sizeof(T)));
    return p;
  }
  void deallocate(T* p, std::size_t n) noexcept {
    MemoryTracker::freed(static_cast<std::int64_t>(n * sizeof(T)));
    ::operator delete(p, n * sizeof(T), kAlignment);
  }
  // Default-initialise (leave floats uninitialised) when no value is given: Buffer(n) is
  // uninitialised, Buffer(n, 0.0f) zeroed. Outputs that an op overwrites skip a memset.
  template <class U> void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args> void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <class U> bool operator==(const TrackingAllocator<U>&) const noexcept { return true; }
};

using Buffer = std::vector<float, TrackingAllocator<float>>;

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatMap = Eigen::Map<Mat>;
using ConstMatMap = Eigen::Map<const Mat>;

// A non-owning view of a rows × cols row-major block; empty (data == nullptr) means "absent"
// where an op takes an optional operand.
struct MatRef {
  float* data = nullptr;
  Eigen::Index rows = 0;
  Eigen::Index cols = 0;
  MatMap m() const { return MatMap(data, rows, cols); }
  Eigen::Index size() const { return rows * cols; }
  explicit operator bool() const { return data != nullptr; }
  std::span<float> span() const { return {data, static_cast<std::size_t>(size())}; }
};

struct ConstMatRef {
  const float* data = nullptr;
  Eigen::Index rows = 0;
  Eigen::Index cols = 0;
  ConstMatRef() = default;
  ConstMatRef(const float* d, Eigen::Index r, Eigen::Index c) : data(d), rows(r), cols(c) {}
  ConstMatRef(MatRef r) : data(r.data), rows(r.rows), cols(r.cols) {} // NOLINT: a view narrows
  ConstMatMap m() const { return ConstMatMap(data, rows, cols); }
  Eigen::Index size() const { return rows * cols; }
  explicit operator bool() const { return data != nullptr; }
  std::span<const float> span() const { return {data, static_cast<std::size_t>(size())}; }
};

// An owning, tracked matrix: zero-initialised, or uninitialised for outputs an op overwrites.
class Tensor {
public:
  struct Uninitialized {};
  static constexpr Uninitialized uninitialized{};

  Tensor() = default;
  Tensor(Eigen::Index rows, Eigen::Index cols)
      : rows_(rows), cols_(cols), data_(static_cast<std::size_t>(rows * cols), 0.0f) {}
  Tensor(Eigen::Index rows, Eigen::Index cols, Uninitialized)
      : rows_(rows), cols_(cols), data_(static_cast<std::size_t>(rows * cols)) {}

  Eigen::Index rows() const { return rows_; }
  Eigen::Index cols() const { return cols_; }
  Eigen::Index size() const { return rows_ * cols_; }
  bool empty() const { return data_.empty(); }
  float* data() { return data_.data(); }
  const float* data() const { return data_.data(); }
  MatRef ref() { return {data_.data(), rows_, cols_}; }
  ConstMatRef ref() const { return {data_.data(), rows_, cols_}; }
  MatMap m() { return ref().m(); }
  ConstMatMap m() const { return ref().m(); }
  std::span<float> span() { return {data_.data(), data_.size()}; }
  std::span<const float> span() const { return {data_.data(), data_.size()}; }
  operator MatRef() { return ref(); }            // NOLINT: tensors pass as views
  operator ConstMatRef() const { return ref(); } // NOLINT
  // Frees the storage (recomputation and ZeRO-3 drop buffers this way).
  void release() {
    Buffer().swap(data_);
    rows_ = cols_ = 0;
  }

private:
  Eigen::Index rows_ = 0;
  Eigen::Index cols_ = 0;
  Buffer data_;
};

} // namespace parallax
