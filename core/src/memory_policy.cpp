#include "parallax/core/memory_policy.hpp"

#include <limits>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace parallax {

void keep_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
#endif
}

} // namespace parallax
