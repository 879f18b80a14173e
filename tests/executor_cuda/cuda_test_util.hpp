// Helpers for the CUDA backend tests: random host tensors, uploads, and element-wise
// comparisons against the CPU reference with an explicit per-element error bound.
#pragma once

#include "parallax/executor/cuda/device_allocator.hpp"
#include "parallax/executor/cuda/device_tensor.hpp"
#include "parallax/executor/tensor.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace parallax::cuda::test {

// Normal(0, stddev) entries from a seeded generator.
inline Tensor random_tensor(std::mt19937& rng, Eigen::Index rows, Eigen::Index cols,
                            float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  Tensor t(rows, cols, Tensor::uninitialized);
  for (float& v : t.span())
    v = dist(rng);
  return t;
}

inline DeviceTensor upload(DeviceAllocator& alloc, const Tensor& t, DType dtype = DType::f32) {
  DeviceTensor d(alloc, t.rows(), t.cols(), dtype);
  d.copy_from_host(t.span());
  return d;
}

// The tensor with every entry rounded to bf16 (what a bf16 device copy holds).
inline Tensor rounded_to_bf16(const Tensor& t) {
  Tensor r(t.rows(), t.cols(), Tensor::uninitialized);
  for (Eigen::Index i = 0; i < t.size(); ++i)
    r.data()[i] = float_from_bf16(bf16_from_float(t.data()[i]));
  return r;
}

// |got − want| ≤ atol + rtol·|want| for every element; reports the worst element.
inline void expect_close(const std::vector<float>& got, const Tensor& want, double rtol,
                         double atol, const std::string& what) {
  ASSERT_EQ(static_cast<Eigen::Index>(got.size()), want.size()) << what;
  double worst_excess = 0.0;
  Eigen::Index worst = -1;
  for (Eigen::Index i = 0; i < want.size(); ++i) {
    const double w = want.data()[i];
    const double g = got[static_cast<std::size_t>(i)];
    const double excess = std::abs(g - w) - (atol + rtol * std::abs(w));
    if (!(excess <= 0.0) && (worst < 0 || !(excess <= worst_excess))) {
      worst_excess = excess;
      worst = i;
    }
  }
  if (worst >= 0) {
    ADD_FAILURE() << what << ": element " << worst << " (row " << worst / want.cols() << ", col "
                  << worst % want.cols() << ") is " << got[static_cast<std::size_t>(worst)]
                  << ", CPU reference " << want.data()[worst] << " (rtol " << rtol << ", atol "
                  << atol << ")";
  }
}

// |got − want| ≤ bound·relative + atol element-wise, for GEMM results whose error scales with
// Σ|a||b| (bound holds those sums).
inline void expect_within_bound(const std::vector<float>& got, const Tensor& want,
                                const Tensor& bound, double relative, double atol,
                                const std::string& what) {
  ASSERT_EQ(static_cast<Eigen::Index>(got.size()), want.size()) << what;
  for (Eigen::Index i = 0; i < want.size(); ++i) {
    const double err =
        std::abs(static_cast<double>(got[static_cast<std::size_t>(i)]) - want.data()[i]);
    const double allowed = relative * bound.data()[i] + atol;
    if (!(err <= allowed)) {
      ADD_FAILURE() << what << ": element " << i << " (row " << i / want.cols() << ", col "
                    << i % want.cols() << ") is " << got[static_cast<std::size_t>(i)]
                    << ", CPU reference " << want.data()[i] << ", error " << err << " > "
                    << allowed;
      return;
    }
  }
}

} // namespace parallax::cuda::test
