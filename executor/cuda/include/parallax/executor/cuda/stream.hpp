// Owning wrappers of a CUDA stream and a CUDA event (move-only).
//
// Every device op takes the stream it is enqueued on; the trainer uses one compute stream and
// the NCCL communicators their own streams, ordered with events (record on the producer,
// wait on the consumer). Event timing gives the measured Timeline's per-op durations.
#pragma once

#include <cuda_runtime_api.h>

namespace parallax::cuda {

class Stream {
public:
  // A non-blocking stream (no implicit synchronisation with the legacy default stream).
  Stream();
  ~Stream();
  Stream(Stream&& other) noexcept;
  Stream& operator=(Stream&& other) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  cudaStream_t get() const { return stream_; }
  operator cudaStream_t() const { return stream_; } // NOLINT: passes where a stream is expected
  void synchronize() const;

private:
  cudaStream_t stream_ = nullptr;
};

class Event {
public:
  // timing=false makes a lighter event for ordering only.
  explicit Event(bool timing = true);
  ~Event();
  Event(Event&& other) noexcept;
  Event& operator=(Event&& other) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  cudaEvent_t get() const { return event_; }
  void record(cudaStream_t stream);
  // Makes `stream` wait (on the device) for the work captured by the last record().
  void wait_on(cudaStream_t stream) const;
  void synchronize() const;
  // True when the captured work has completed.
  bool query() const;
  // Milliseconds between two recorded (and completed) timing events.
  static float elapsed_ms(const Event& start, const Event& end);

private:
  cudaEvent_t event_ = nullptr;
};

} // namespace parallax::cuda
