// Process-wide allocator policy for workloads that allocate and free large buffers over and
// over (simulations of one plan after another, activations of every micro-batch).
#pragma once

namespace parallax {

// Keeps freed memory in the heap for reuse instead of returning it to the kernel: glibc would
// otherwise mmap every large buffer and fault its pages in again on each allocation, which on
// virtual machines costs microseconds per page. Memory is still reused; the process's resident
// size stays at its high-water mark. A no-op where the C library has no such controls.
void keep_freed_memory();

} // namespace parallax
