// Communicators: the collectives and point-to-point operations the executor needs, over one
// group of ranks, each in a blocking and a non-blocking form.
//
// Every wait has a deadline: an operation that does not complete within the communicator's
// timeout (a peer died, or the ranks disagree about what comes next) throws CommTimeout naming
// the operation, instead of hanging the job. The trainer turns that into an abort of the whole
// job with a non-zero exit.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace parallax {

class CommTimeout : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

// A pending non-blocking operation. wait() blocks until it completes (or throws CommTimeout);
// a default-constructed or completed request waits for nothing. Destroying a pending request
// waits for it, so buffers are never released under a running operation.
class CommRequest {
public:
  class Impl {
  public:
    virtual ~Impl() = default;
    virtual void wait() = 0;
    virtual bool test() = 0;
    // Withdraws a receive that will never be matched (default: waits, for operations that
    // always complete).
    virtual void cancel() { wait(); }
  };
  CommRequest() = default;
  explicit CommRequest(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
  CommRequest(CommRequest&&) noexcept = default;
  CommRequest& operator=(CommRequest&& other) noexcept;
  ~CommRequest();

  void wait();
  bool test();
  // Seconds this process has spent blocked in wait() (every communicator's), for telling a
  // rank's own work from its waiting on others (straggler detection).
  static double blocked_seconds();
  // Cancels a pending receive (MPI_Cancel) and forgets it.
  void cancel();
  bool pending() const { return impl_ != nullptr; }

private:
  std::unique_ptr<Impl> impl_;
};

class Communicator {
public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // A short name for messages, e.g. "tp" or "dp".
  virtual const std::string& name() const = 0;

  // Element-wise sum (or max) over the group, in place.
  virtual CommRequest iall_reduce_sum(std::span<float> data) = 0;
  virtual CommRequest iall_reduce_max(std::span<float> data) = 0;
  // Sum of bfloat16 values (16-bit words), in place: each addition in fp32, rounded back to
  // bfloat16 (16-bit gradient communication).
  virtual CommRequest iall_reduce_sum_bf16(std::span<std::uint16_t> data) = 0;
  // in.size() == out.size() · size(); rank i receives the sum of every rank's block i.
  virtual CommRequest ireduce_scatter_sum(std::span<const float> in, std::span<float> out) = 0;
  // out.size() == in.size() · size(); block i of out is rank i's in. `in` may alias block
  // rank() of out (in-place all-gather).
  virtual CommRequest iall_gather(std::span<const float> in, std::span<float> out) = 0;
  virtual CommRequest ibroadcast(std::span<float> data, int root) = 0;
  // Element-wise sum over the group into `root`'s data (in place there; others' data unchanged).
  virtual CommRequest ireduce_sum(std::span<float> data, int root) = 0;
  // All-to-all of uneven blocks (MoE token dispatch and combine): `in` holds send_counts[i]
  // floats for rank i, one block after the other in rank order, and `out` receives
  // recv_counts[i] floats from rank i the same way. Every rank passes size() counts of each;
  // rank i's send count for j must equal rank j's receive count for i.
  virtual CommRequest iall_to_allv(std::span<const float> in, std::span<const int> send_counts,
                                   std::span<float> out, std::span<const int> recv_counts) = 0;
  virtual CommRequest isend(std::span<const float> data, int dest, int tag) = 0;
  virtual CommRequest irecv(std::span<float> data, int source, int tag) = 0;
  virtual CommRequest ibarrier() = 0;

  void all_reduce_sum(std::span<float> data) { iall_reduce_sum(data).wait(); }
  void all_reduce_max(std::span<float> data) { iall_reduce_max(data).wait(); }
  void all_reduce_sum_bf16(std::span<std::uint16_t> data) { iall_reduce_sum_bf16(data).wait(); }
  void reduce_scatter_sum(std::span<const float> in, std::span<float> out) {
    ireduce_scatter_sum(in, out).wait();
  }
  void all_gather(std::span<const float> in, std::span<float> out) { iall_gather(in, out).wait(); }
  void all_to_allv(std::span<const float> in, std::span<const int> send_counts,
                   std::span<float> out, std::span<const int> recv_counts) {
    iall_to_allv(in, send_counts, out, recv_counts).wait();
  }
  void broadcast(std::span<float> data, int root) { ibroadcast(data, root).wait(); }
  void send(std::span<const float> data, int dest, int tag) { isend(data, dest, tag).wait(); }
  void recv(std::span<float> data, int source, int tag) { irecv(data, source, tag).wait(); }
  void barrier() { ibarrier().wait(); }
  // Double-precision sum for small reductions (losses, norms), in place.
  virtual void all_reduce_sum(std::span<double> data) = 0;
  virtual void all_reduce_max(std::span<double> data) = 0;
  // Every rank's string, in rank order, on `root` (empty elsewhere).
  virtual std::vector<std::string> gather_strings(const std::string& mine, int root) = 0;
};

// MPI: initialises MPI on first use (MPI_THREAD_SERIALIZED) and finalises it at exit.
class MpiRuntime {
public:
  // Calls MPI_Init_thread unless MPI is already initialised.
  static void init(int* argc, char*** argv);
  static bool initialized();
  static int world_rank();
  static int world_size();
  // Ends the whole job (MPI_Abort) with `code`.
  [[noreturn]] static void abort(int code);
};

// The world communicator, or a sub-communicator made of `ranks` (world ranks, in group order;
// every member must call with the same list — collective over the world).
std::unique_ptr<Communicator> mpi_world(std::chrono::duration<double> timeout);
std::unique_ptr<Communicator> mpi_group(const std::vector<int>& ranks, const std::string& name,
                                        std::chrono::duration<double> timeout);

} // namespace parallax
