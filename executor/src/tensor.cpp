#include "parallax/executor/tensor.hpp"

namespace parallax {
namespace {

std::atomic<std::int64_t> g_current{0};
std::atomic<std::int64_t> g_peak{0};

} // namespace

void MemoryTracker::allocated(std::int64_t bytes) {
  const std::int64_t now = g_current.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  std::int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void MemoryTracker::freed(std::int64_t bytes) {
  g_current.fetch_sub(bytes, std::memory_order_relaxed);
}

std::int64_t MemoryTracker::current() {
  return g_current.load(std::memory_order_relaxed);
}
std::int64_t MemoryTracker::peak() {
  return g_peak.load(std::memory_order_relaxed);
}
void MemoryTracker::reset_peak() {
  g_peak.store(current(), std::memory_order_relaxed);
}

} // namespace parallax
