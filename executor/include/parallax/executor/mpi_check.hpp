// MPI error checks shared by the communicators (MPI here, NCCL's MPI bootstrap in executor/cuda).
#pragma once

#include "parallax/core/error.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <climits>
#include <cstddef>
#include <stdexcept>
#include <string>

namespace parallax {

// Throws with MPI's own text when an MPI call did not succeed.
inline void mpi_check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw std::runtime_error(fmt::format("MPI {} failed: {}", what, std::string(text, len)));
  }
}

// An element count as MPI's int, checked.
inline int mpi_count(std::size_t n) {
  PARALLAX_CHECK(n <= static_cast<std::size_t>(INT_MAX), "message over 2^31 elements");
  return static_cast<int>(n);
}

} // namespace parallax
