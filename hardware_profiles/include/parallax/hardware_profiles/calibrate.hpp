// `parallax calibrate --backend cpu`: measure the machine the executor runs on and describe it
// as a Cluster profile the cost model and simulator can use.
//
// Collective over MPI_COMM_WORLD: every rank measures at the same time, so shared cores, caches
// and memory bandwidth are measured as the executor will see them with this rank count. What
// is measured (warm-up, repetitions, medians; rates averaged over ranks):
//   - fp32 GEMM throughput over a grid of shapes (Eigen, as the executor runs them): the peak
//     and the efficiency curve (efficiency against GEMM FLOPs, a non-decreasing envelope);
//   - memory bandwidth (a streaming copy) and the element-wise efficiency (a GELU pass) against
//     it;
//   - all-reduce latency and bus bandwidth over all ranks (when there are several; a
//     least-squares fit over 4 KiB – 4 MiB messages): the node's intra-node latency and
//     bandwidth.

#pragma once

#include "parallax/core/cluster.hpp"

#include <chrono>

namespace parallax {

struct CalibrationOptions {
  bool quick = false; // smaller grid and buffers (tests)
  std::chrono::duration<double> comm_timeout{120.0};
};

// The measured profile (identical on every rank).
Cluster calibrate_cpu(const CalibrationOptions& options = {});

} // namespace parallax
