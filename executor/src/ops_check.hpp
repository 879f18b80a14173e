// Shape checks shared by the Eigen kernels (ops.cpp, attention_ops.cpp).
#pragma once

#include "parallax/core/error.hpp"
#include "parallax/executor/tensor.hpp"

#include <string>

namespace parallax::ops::detail {

inline void check_shape(ConstMatRef a, Eigen::Index rows, Eigen::Index cols, const char* what) {
  PARALLAX_CHECK(a.rows == rows && a.cols == cols,
                 std::string(what) + " has shape [" + std::to_string(a.rows) + ", " +
                     std::to_string(a.cols) + "], expected [" + std::to_string(rows) + ", " +
                     std::to_string(cols) + "]");
}

} // namespace parallax::ops::detail
