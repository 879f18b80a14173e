// The caching allocator's accounting, device tensors, streams and events. Only size_class is
// pure arithmetic and runs everywhere; the rest needs a device and skips itself without one.
#include "parallax/executor/cuda/device.hpp"
#include "parallax/executor/cuda/device_allocator.hpp"
#include "parallax/executor/cuda/device_tensor.hpp"
#include "parallax/executor/cuda/stream.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace parallax::cuda {
namespace {

#define PARALLAX_SKIP_WITHOUT_GPU_MESSAGE                                                          \
  "no CUDA device: the CUDA backend is compiled but cannot run here; run `ctest -L gpu` on a "     \
  "GPU machine"

TEST(DeviceAllocatorSizeClass, RoundsUpWithinAQuarterOctave) {
  // Host arithmetic only: no device needed.
  EXPECT_EQ(DeviceAllocator::size_class(1), 256u);
  EXPECT_EQ(DeviceAllocator::size_class(256), 256u);
  EXPECT_EQ(DeviceAllocator::size_class(257), 512u);
  EXPECT_EQ(DeviceAllocator::size_class(4096), 4096u);
  EXPECT_EQ(DeviceAllocator::size_class(4097), 5120u);
  EXPECT_EQ(DeviceAllocator::size_class(std::size_t{3} << 20), std::size_t{3} << 20);
  EXPECT_EQ(DeviceAllocator::size_class((std::size_t{1} << 30) + 1), std::size_t{5} << 28);
  for (std::size_t bytes = 1; bytes < (std::size_t{1} << 22); bytes = bytes * 3 / 2 + 1) {
    const std::size_t cls = DeviceAllocator::size_class(bytes);
    EXPECT_GE(cls, bytes);
    EXPECT_EQ(cls % DeviceAllocator::kAlignment, 0u) << bytes;
    if (bytes > 4096) {
      EXPECT_LE(cls, bytes + bytes / 4) << bytes;
    }
  }
}

TEST(DeviceAllocator, CountsRequestedBytesAndReusesFreedBlocks) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  DeviceAllocator alloc;
  EXPECT_EQ(alloc.allocate(0), nullptr);
  void* a = alloc.allocate(1000);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a) % DeviceAllocator::kAlignment, 0u);
  EXPECT_EQ(alloc.bytes_in_use(), 1000);
  EXPECT_EQ(alloc.bytes_reserved(), 1024);
  void* b = alloc.allocate(5000);
  EXPECT_EQ(alloc.bytes_in_use(), 6000);
  EXPECT_EQ(alloc.bytes_reserved(), 1024 + 5120);
  alloc.deallocate(a);
  EXPECT_EQ(alloc.bytes_in_use(), 5000);
  EXPECT_EQ(alloc.peak_bytes_in_use(), 6000);
  EXPECT_EQ(alloc.bytes_reserved(), 1024 + 5120); // cached, not returned
  void* c = alloc.allocate(900);                  // same class: the cached block comes back
  EXPECT_EQ(c, a);
  EXPECT_EQ(alloc.bytes_reserved(), 1024 + 5120);
  EXPECT_EQ(alloc.bytes_in_use(), 5900);
  alloc.reset_peak();
  EXPECT_EQ(alloc.peak_bytes_in_use(), 5900);
  alloc.deallocate(b);
  alloc.deallocate(c);
  EXPECT_EQ(alloc.bytes_in_use(), 0);
  EXPECT_EQ(alloc.peak_bytes_in_use(), 5900);
  EXPECT_EQ(alloc.peak_bytes_reserved(), 1024 + 5120);
  alloc.release_cached();
  EXPECT_EQ(alloc.bytes_reserved(), 0);
}

TEST(DeviceAllocator, TensorsReleaseTheirBytes) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  DeviceAllocator alloc;
  {
    DeviceTensor x(alloc, 10, 30);              // 1200 bytes
    DeviceTensor y(alloc, 10, 30, DType::bf16); // 600 bytes
    EXPECT_EQ(alloc.bytes_in_use(), 1800);
    DeviceTensor moved = std::move(x);
    EXPECT_EQ(alloc.bytes_in_use(), 1800);
    moved.release();
    EXPECT_EQ(alloc.bytes_in_use(), 600);
  }
  EXPECT_EQ(alloc.bytes_in_use(), 0);
  EXPECT_EQ(alloc.peak_bytes_in_use(), 1800);
}

TEST(DeviceTensor, CopiesRoundTripInF32AndRoundInBf16) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  DeviceAllocator alloc;
  std::vector<float> values(6 * 7);
  for (std::size_t i = 0; i < values.size(); ++i)
    values[i] = 0.1f * static_cast<float>(i) - 1.3f;
  DeviceTensor f(alloc, 6, 7);
  f.copy_from_host(values);
  EXPECT_EQ(f.to_host(), values);
  DeviceTensor b(alloc, 6, 7, DType::bf16);
  b.copy_from_host(values);
  const std::vector<float> back = b.to_host();
  for (std::size_t i = 0; i < values.size(); ++i)
    EXPECT_EQ(back[i], float_from_bf16(bf16_from_float(values[i])));
  f.zero();
  EXPECT_EQ(f.to_host(), std::vector<float>(values.size(), 0.0f));
}

TEST(StreamAndEvent, EventsOrderStreamsAndTime) {
  if (!gpu_available())
    GTEST_SKIP() << PARALLAX_SKIP_WITHOUT_GPU_MESSAGE;
  DeviceAllocator alloc;
  Stream producer;
  Stream consumer;
  Event start;
  Event end;
  DeviceTensor x(alloc, 256, 256);
  start.record(producer);
  x.zero(producer);
  end.record(producer);
  end.wait_on(consumer);
  consumer.synchronize();
  EXPECT_TRUE(end.query());
  EXPECT_GE(Event::elapsed_ms(start, end), 0.0f);
}

} // namespace
} // namespace parallax::cuda
