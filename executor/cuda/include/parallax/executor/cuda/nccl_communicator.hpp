// NCCL communicators: the executor's Communicator interface (parallax/executor/comm.hpp) over
// device buffers, bootstrapped over MPI (rank 0's ncclUniqueId is broadcast with MPI_Bcast).
//
// Device memory through a host interface: a std::span is only a pointer and a length, so the
// float operations take spans over DEVICE memory (DeviceTensor / DeviceView data on this rank's
// current device); they are never dereferenced on the host. The operations on host values by
// nature — all_reduce_sum/max over doubles (losses, gradient norms) and gather_strings — run
// over the MPI communicator the NCCL one was built from.
//
// Ordering and completion:
//   * each float operation first makes the communicator's own stream wait (on the device) for
//     the work already enqueued on the producer stream (set_producer_stream; default: the
//     legacy default stream, which does NOT order non-blocking streams such as Stream), then
//     enqueues the NCCL call, then records an event;
//   * CommRequest::wait() polls that event (and ncclCommGetAsyncError) until the operation is
//     done or the timeout passes: CommTimeout, after aborting the NCCL communicator (the
//     trainer then aborts the job). After wait() the data are ready for any later launch;
//   * the device-side equivalent that keeps the host free: order_after_pending(consumer) makes
//     a consumer stream wait (on the device) for everything enqueued so far. The request still
//     has to be waited or tested before it is dropped: destroying a pending request blocks
//     the host until the operation completes, as the interface demands.
//
// Differences from the MPI communicators, by design of NCCL:
//   * tags are ignored: sends and receives between a pair of ranks match in issue order;
//   * sends and receives are not grouped, so two ranks that each send to the other before
//     receiving deadlock: callers must order an exchange (one side receives first) until the
//     trainer integration wraps bidirectional exchanges in ncclGroupStart/End (not done yet);
//   * ibarrier is an all-reduce of one float on the device.
#pragma once

#include "parallax/executor/comm.hpp"

#include <cuda_runtime_api.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace parallax::cuda {

class NcclCommunicator : public Communicator {
public:
  // The stream whose enqueued work every later operation waits for (not owned).
  virtual void set_producer_stream(cudaStream_t producer) = 0;
  // Makes `consumer` wait for every operation enqueued so far, without blocking the host.
  virtual void order_after_pending(cudaStream_t consumer) = 0;
  // The communicator's own stream (NCCL kernels run there).
  virtual cudaStream_t stream() const = 0;
};

// Makes device (node-local rank % visible devices) current for this process and returns it;
// the node-local rank comes from MPI_COMM_TYPE_SHARED. Call before creating communicators.
int bind_local_device();

// Over every world rank, or over `ranks` (world ranks, in group order; collective over those
// ranks only, as mpi_group). MPI must be initialised (MpiRuntime::init). The current device
// must already be this rank's (bind_local_device).
std::unique_ptr<NcclCommunicator> nccl_world(std::chrono::duration<double> timeout);
std::unique_ptr<NcclCommunicator> nccl_group(const std::vector<int>& ranks, const std::string& name,
                                             std::chrono::duration<double> timeout);

} // namespace parallax::cuda
