// The NCCL communicator on one rank (the multi-rank checks need mpirun and several GPUs; see
// executor/cuda/README.md). Skips itself without a device.
#include "parallax/executor/cuda/device.hpp"
#include "parallax/executor/cuda/device_allocator.hpp"
#include "parallax/executor/cuda/device_tensor.hpp"
#include "parallax/executor/cuda/nccl_communicator.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <span>
#include <vector>

namespace parallax::cuda {
namespace {

std::span<float> device_span(const DeviceTensor& t) {
  return {static_cast<float*>(t.data()), static_cast<std::size_t>(t.size())};
}

TEST(NcclCommunicator, SingleRankCollectivesOnDeviceBuffers) {
  if (!gpu_available())
    GTEST_SKIP() << "no CUDA device: the CUDA backend is compiled but cannot run here; run "
                    "`ctest -L gpu` on a GPU machine";
  MpiRuntime::init(nullptr, nullptr);
  bind_local_device();
  auto comm = nccl_world(std::chrono::seconds(60));
  ASSERT_EQ(comm->size(), 1);
  DeviceAllocator alloc;
  const std::vector<float> values = {1.0f, -2.0f, 3.5f, 0.25f};
  DeviceTensor x(alloc, 1, 4);
  x.copy_from_host(values);
  comm->all_reduce_sum(device_span(x));
  comm->all_reduce_max(device_span(x));
  comm->broadcast(device_span(x), 0);
  DeviceTensor gathered(alloc, 1, 4);
  comm->all_gather(device_span(x), device_span(gathered));
  comm->barrier();
  EXPECT_EQ(x.to_host(), values);
  EXPECT_EQ(gathered.to_host(), values);
  double loss[2] = {1.5, 2.5};
  comm->all_reduce_sum(std::span<double>(loss));
  EXPECT_EQ(loss[0], 1.5);
  const std::vector<std::string> names = comm->gather_strings("rank0", 0);
  ASSERT_EQ(names.size(), 1u);
  EXPECT_EQ(names[0], "rank0");
}

} // namespace
} // namespace parallax::cuda
