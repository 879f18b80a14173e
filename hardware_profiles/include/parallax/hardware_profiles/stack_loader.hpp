// Loading a software stack from a zoo name or a path, and the default stack for a cluster.
#pragma once

#include "parallax/core/cluster.hpp"
#include "parallax/core/stack.hpp"

#include <string>

namespace parallax {

Stack stack_load(const std::string& name_or_path);

// The stack assumed when none is given: `parallax` (this executor) on CPU profiles; on GPU
// profiles `megatron-core`, the stack with measurements behind it, until the CUDA executor has
// been measured on a GPU.
std::string stack_default_name(const Cluster& cluster);

} // namespace parallax
