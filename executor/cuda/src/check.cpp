#include "parallax/executor/cuda/check.hpp"

#include "parallax/executor/comm.hpp"

#include <fmt/format.h>

#include <stdexcept>

namespace parallax::cuda {

void cuda_fail(const char* file, int line, const char* call, const char* library,
               const char* error) {
  const std::string rank =
      MpiRuntime::initialized() ? fmt::format(" (rank {})", MpiRuntime::world_rank()) : "";
  throw std::runtime_error(fmt::format("{}:{}{}: {} call failed: {}\n  in: {}\n  hint: check the "
                                       "device (nvidia-smi), the driver and CUDA_VISIBLE_DEVICES",
                                       file, line, rank, library, error, call));
}

} // namespace parallax::cuda
