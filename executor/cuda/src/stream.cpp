#include "parallax/executor/cuda/stream.hpp"

#include "parallax/executor/cuda/check.hpp"

#include <utility>

namespace parallax::cuda {

Stream::Stream() {
  PARALLAX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
}

Stream::~Stream() {
  if (stream_ != nullptr)
    (void)cudaStreamDestroy(stream_); // destructors must not throw
}

Stream::Stream(Stream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}

Stream& Stream::operator=(Stream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr)
      (void)cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

void Stream::synchronize() const {
  PARALLAX_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

Event::Event(bool timing) {
  PARALLAX_CUDA_CHECK(
      cudaEventCreateWithFlags(&event_, timing ? cudaEventDefault : cudaEventDisableTiming));
}

Event::~Event() {
  if (event_ != nullptr)
    (void)cudaEventDestroy(event_);
}

Event::Event(Event&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}

Event& Event::operator=(Event&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr)
      (void)cudaEventDestroy(event_);
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

void Event::record(cudaStream_t stream) {
  PARALLAX_CUDA_CHECK(cudaEventRecord(event_, stream));
}

void Event::wait_on(cudaStream_t stream) const {
  PARALLAX_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0));
}

void Event::synchronize() const {
  PARALLAX_CUDA_CHECK(cudaEventSynchronize(event_));
}

bool Event::query() const {
  const cudaError_t status = cudaEventQuery(event_);
  if (status == cudaErrorNotReady)
    return false;
  PARALLAX_CUDA_CHECK(status);
  return true;
}

float Event::elapsed_ms(const Event& start, const Event& end) {
  float ms = 0.0f;
  PARALLAX_CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_, end.event_));
  return ms;
}

} // namespace parallax::cuda
