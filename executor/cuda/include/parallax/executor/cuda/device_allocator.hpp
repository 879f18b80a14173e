// A caching allocator of device memory with exact accounting.
//
// Requests are rounded up to a size class (multiples of 256 bytes up to 4 KiB, then four
// classes per power of two: 2^k, 1.25·2^k, 1.5·2^k, 1.75·2^k, so at most 25% is wasted). A
// miss cudaMallocs a block of the class; a free puts the block on its class's free list for
// the next request of that class. cudaMalloc returns 256-byte aligned memory, and every block
// is a whole cudaMalloc, so every pointer handed out is 256-byte aligned.
//
// Accounting (what `train` reports as the device's peak memory and `compare` sets against the
// planner's memory model):
//   bytes_in_use       Σ requested bytes of live allocations (exact tensor sizes, as the CPU
//                      executor's MemoryTracker counts them)
//   peak_bytes_in_use  high-water mark of bytes_in_use since construction or reset_peak()
//   bytes_reserved     Σ class bytes obtained from cudaMalloc and not yet returned (live blocks
//                      plus cached free blocks): what the process holds on the device
//   peak_bytes_reserved high-water mark of bytes_reserved
// Not counted: the CUDA context, cuBLASLt's and NCCL's internal buffers.
//
// Streams: the allocator does not track streams. A block freed while a kernel still uses it
// may be handed out again at once; callers free only after the work using a block is ordered
// before its next user (one compute stream, or an event wait), as with PyTorch's allocator
// without record_stream. Thread-safe (one mutex).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace parallax::cuda {

class DeviceAllocator {
public:
  static constexpr std::size_t kAlignment = 256;

  DeviceAllocator() = default;
  // Returns every cached block to the device. Blocks still allocated are leaked (a bug in the
  // caller); they are not freed under a possibly running kernel.
  ~DeviceAllocator();
  DeviceAllocator(const DeviceAllocator&) = delete;
  DeviceAllocator& operator=(const DeviceAllocator&) = delete;

  // nullptr for 0 bytes. On cudaMalloc failure, frees the cache and retries once, then throws
  // std::runtime_error naming the request and the accounting figures.
  void* allocate(std::size_t bytes);
  // Returns a block obtained from allocate() to its free list (nullptr is ignored).
  void deallocate(void* ptr);
  // cudaFrees every cached (free) block.
  void release_cached();

  std::int64_t bytes_in_use() const;
  std::int64_t peak_bytes_in_use() const;
  std::int64_t bytes_reserved() const;
  std::int64_t peak_bytes_reserved() const;
  // Restarts both high-water marks at the current values.
  void reset_peak();

  // The class a request of `bytes` is served from (pure arithmetic, testable without a GPU).
  static std::size_t size_class(std::size_t bytes);

private:
  struct Live {
    std::size_t requested_bytes;
    std::size_t class_bytes;
  };
  void release_cached_locked();

  mutable std::mutex mutex_;
  std::unordered_map<void*, Live> live_;
  std::unordered_map<std::size_t, std::vector<void*>> free_; // class bytes -> cached blocks
  std::int64_t in_use_bytes_ = 0;
  std::int64_t peak_in_use_bytes_ = 0;
  std::int64_t reserved_bytes_ = 0;
  std::int64_t peak_reserved_bytes_ = 0;
};

} // namespace parallax::cuda
