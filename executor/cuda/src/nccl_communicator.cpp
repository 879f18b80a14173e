#include "parallax/executor/cuda/nccl_communicator.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/cuda/check.hpp"
#include "parallax/executor/mpi_check.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <climits>
#include <thread>
#include <utility>

namespace parallax::cuda {

namespace {

using Clock = std::chrono::steady_clock;

// What a request and its communicator share: the NCCL handle (null once aborted), the name
// and the timeout for messages.
struct NcclState {
  ncclComm_t comm = nullptr;
  std::string name;
  std::chrono::duration<double> timeout{};

  void abort() {
    if (comm != nullptr) {
      (void)ncclCommAbort(comm);
      comm = nullptr;
    }
  }
};

class NcclRequest final : public CommRequest::Impl {
public:
  NcclRequest(std::shared_ptr<NcclState> state, cudaEvent_t done, std::string what)
      : state_(std::move(state)), done_(done), what_(std::move(what)) {}
  ~NcclRequest() override { (void)cudaEventDestroy(done_); }
  NcclRequest(const NcclRequest&) = delete;
  NcclRequest& operator=(const NcclRequest&) = delete;

  bool test() override {
    const cudaError_t status = cudaEventQuery(done_);
    if (status == cudaSuccess)
      return true;
    if (status != cudaErrorNotReady)
      PARALLAX_CUDA_CHECK(status);
    check_async_error();
    return false;
  }

  void wait() override {
    const auto deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(state_->timeout);
    while (!test()) {
      if (Clock::now() > deadline) {
        state_->abort();
        throw CommTimeout(fmt::format("NCCL {} on communicator '{}' did not complete within {} s",
                                      what_, state_->name, state_->timeout.count()));
      }
      std::this_thread::yield();
    }
  }

private:
  void check_async_error() {
    if (state_->comm == nullptr)
      throw std::runtime_error(
          fmt::format("NCCL {} on communicator '{}': communicator aborted", what_, state_->name));
    ncclResult_t async = ncclSuccess;
    PARALLAX_NCCL_CHECK(ncclCommGetAsyncError(state_->comm, &async));
    if (async != ncclSuccess && async != ncclInProgress) {
      state_->abort();
      throw std::runtime_error(fmt::format("NCCL {} on communicator '{}' failed: {}", what_,
                                           state_->name, ncclGetErrorString(async)));
    }
  }

  std::shared_ptr<NcclState> state_;
  cudaEvent_t done_;
  std::string what_;
};

class NcclCommunicatorImpl final : public NcclCommunicator {
public:
  // Takes ownership of `mpi_comm` when `owns_mpi_comm`.
  NcclCommunicatorImpl(MPI_Comm mpi_comm, bool owns_mpi_comm, std::string name,
                       std::chrono::duration<double> timeout)
      : mpi_comm_(mpi_comm), owns_mpi_comm_(owns_mpi_comm), state_(std::make_shared<NcclState>()) {
    state_->name = std::move(name);
    state_->timeout = timeout;
    mpi_check(MPI_Comm_rank(mpi_comm_, &rank_), "Comm_rank");
    mpi_check(MPI_Comm_size(mpi_comm_, &size_), "Comm_size");
    // Rank 0 makes the unique id; everyone receives its bytes over MPI.
    ncclUniqueId id{};
    if (rank_ == 0)
      PARALLAX_NCCL_CHECK(ncclGetUniqueId(&id));
    mpi_check(MPI_Bcast(&id, static_cast<int>(sizeof(id)), MPI_BYTE, 0, mpi_comm_), "Bcast");
    PARALLAX_NCCL_CHECK(ncclCommInitRank(&state_->comm, size_, id, rank_));
    PARALLAX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    PARALLAX_CUDA_CHECK(cudaEventCreateWithFlags(&produced_, cudaEventDisableTiming));
    PARALLAX_CUDA_CHECK(cudaEventCreateWithFlags(&pending_, cudaEventDisableTiming));
    PARALLAX_CUDA_CHECK(cudaMalloc(&barrier_scratch_, sizeof(float)));
    PARALLAX_CUDA_CHECK(cudaMemset(barrier_scratch_, 0, sizeof(float)));
  }

  ~NcclCommunicatorImpl() override {
    if (state_->comm != nullptr) {
      (void)cudaStreamSynchronize(stream_);
      (void)ncclCommDestroy(state_->comm);
      state_->comm = nullptr;
    }
    (void)cudaFree(barrier_scratch_);
    (void)cudaEventDestroy(pending_);
    (void)cudaEventDestroy(produced_);
    (void)cudaStreamDestroy(stream_);
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owns_mpi_comm_ && !finalized)
      MPI_Comm_free(&mpi_comm_);
  }

  NcclCommunicatorImpl(const NcclCommunicatorImpl&) = delete;
  NcclCommunicatorImpl& operator=(const NcclCommunicatorImpl&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return state_->name; }

  void set_producer_stream(cudaStream_t producer) override { producer_ = producer; }
  void order_after_pending(cudaStream_t consumer) override {
    PARALLAX_CUDA_CHECK(cudaEventRecord(pending_, stream_));
    PARALLAX_CUDA_CHECK(cudaStreamWaitEvent(consumer, pending_, 0));
  }
  cudaStream_t stream() const override { return stream_; }

  CommRequest iall_reduce_sum(std::span<float> data) override {
    const ncclComm_t comm = begin("all-reduce sum");
    PARALLAX_NCCL_CHECK(
        ncclAllReduce(data.data(), data.data(), data.size(), ncclFloat32, ncclSum, comm, stream_));
    return finish("all-reduce sum");
  }

  CommRequest iall_reduce_sum_bf16(std::span<std::uint16_t> data) override {
    const ncclComm_t comm = begin("all-reduce sum (bf16)");
    PARALLAX_NCCL_CHECK(ncclAllReduce(data.data(), data.data(), data.size(), ncclBfloat16,
                                      ncclSum, comm, stream_));
    return finish("all-reduce sum (bf16)");
  }

  CommRequest iall_reduce_max(std::span<float> data) override {
    const ncclComm_t comm = begin("all-reduce max");
    PARALLAX_NCCL_CHECK(
        ncclAllReduce(data.data(), data.data(), data.size(), ncclFloat32, ncclMax, comm, stream_));
    return finish("all-reduce max");
  }

  CommRequest ireduce_scatter_sum(std::span<const float> in, std::span<float> out) override {
    PARALLAX_CHECK(in.size() == out.size() * static_cast<std::size_t>(size_),
                   "reduce-scatter input must be size() times the output");
    const ncclComm_t comm = begin("reduce-scatter");
    PARALLAX_NCCL_CHECK(
        ncclReduceScatter(in.data(), out.data(), out.size(), ncclFloat32, ncclSum, comm, stream_));
    return finish("reduce-scatter");
  }

  CommRequest iall_gather(std::span<const float> in, std::span<float> out) override {
    PARALLAX_CHECK(out.size() == in.size() * static_cast<std::size_t>(size_),
                   "all-gather output must be size() times the input");
    // NCCL's in-place form is exactly the interface's: in == out + rank·count.
    const ncclComm_t comm = begin("all-gather");
    PARALLAX_NCCL_CHECK(
        ncclAllGather(in.data(), out.data(), in.size(), ncclFloat32, comm, stream_));
    return finish("all-gather");
  }

  CommRequest ibroadcast(std::span<float> data, int root) override {
    const ncclComm_t comm = begin("broadcast");
    PARALLAX_NCCL_CHECK(
        ncclBroadcast(data.data(), data.data(), data.size(), ncclFloat32, root, comm, stream_));
    return finish("broadcast");
  }

  CommRequest ireduce_sum(std::span<float> data, int root) override {
    // Non-roots only read their buffer (NCCL ignores recvbuff away from the root).
    const ncclComm_t comm = begin("reduce");
    PARALLAX_NCCL_CHECK(ncclReduce(data.data(), data.data(), data.size(), ncclFloat32, ncclSum,
                                   root, comm, stream_));
    return finish("reduce");
  }

  CommRequest iall_to_allv(std::span<const float> in, std::span<const int> send_counts,
                           std::span<float> out, std::span<const int> recv_counts) override {
    const auto n = static_cast<std::size_t>(size_);
    PARALLAX_CHECK(send_counts.size() == n && recv_counts.size() == n,
                   "all-to-all needs one send and one receive count per rank");
    // One grouped send and receive per peer (NCCL has no all-to-all-v of its own).
    const ncclComm_t comm = begin("all-to-all");
    PARALLAX_NCCL_CHECK(ncclGroupStart());
    std::size_t sent = 0;
    std::size_t received = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const auto sc = static_cast<std::size_t>(send_counts[i]);
      const auto rc = static_cast<std::size_t>(recv_counts[i]);
      if (sc > 0)
        PARALLAX_NCCL_CHECK(
            ncclSend(in.data() + sent, sc, ncclFloat32, static_cast<int>(i), comm, stream_));
      if (rc > 0)
        PARALLAX_NCCL_CHECK(
            ncclRecv(out.data() + received, rc, ncclFloat32, static_cast<int>(i), comm, stream_));
      sent += sc;
      received += rc;
    }
    PARALLAX_NCCL_CHECK(ncclGroupEnd());
    PARALLAX_CHECK(sent == in.size() && received == out.size(),
                   "all-to-all buffers must hold the sum of their counts");
    return finish("all-to-all");
  }

  CommRequest isend(std::span<const float> data, int dest, int /*tag*/) override {
    const ncclComm_t comm = begin("send");
    PARALLAX_NCCL_CHECK(ncclSend(data.data(), data.size(), ncclFloat32, dest, comm, stream_));
    return finish(fmt::format("send to {}", dest));
  }

  CommRequest irecv(std::span<float> data, int source, int /*tag*/) override {
    const ncclComm_t comm = begin("recv");
    PARALLAX_NCCL_CHECK(ncclRecv(data.data(), data.size(), ncclFloat32, source, comm, stream_));
    return finish(fmt::format("receive from {}", source));
  }

  CommRequest ibarrier() override {
    const ncclComm_t comm = begin("barrier");
    PARALLAX_NCCL_CHECK(
        ncclAllReduce(barrier_scratch_, barrier_scratch_, 1, ncclFloat32, ncclSum, comm, stream_));
    return finish("barrier");
  }

  void all_reduce_sum(std::span<double> data) override { host_all_reduce(data, MPI_SUM, "sum"); }
  void all_reduce_max(std::span<double> data) override { host_all_reduce(data, MPI_MAX, "max"); }

  std::vector<std::string> gather_strings(const std::string& mine, int root) override {
    int length = mpi_count(mine.size());
    std::vector<int> lengths(rank_ == root ? static_cast<std::size_t>(size_) : 0);
    MPI_Request request{};
    mpi_check(
        MPI_Igather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, root, mpi_comm_, &request),
        "Igather");
    wait_mpi(request, "gather of string lengths");
    std::vector<int> displs(lengths.size());
    int total = 0;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      displs[i] = total;
      total += lengths[i];
    }
    std::string all(static_cast<std::size_t>(total), '\0');
    mpi_check(MPI_Igatherv(mine.data(), length, MPI_CHAR, all.data(), lengths.data(), displs.data(),
                           MPI_CHAR, root, mpi_comm_, &request),
              "Igatherv");
    wait_mpi(request, "gather of strings");
    std::vector<std::string> out;
    for (std::size_t i = 0; i < lengths.size(); ++i)
      out.push_back(
          all.substr(static_cast<std::size_t>(displs[i]), static_cast<std::size_t>(lengths[i])));
    return out;
  }

private:
  // Orders the communicator's stream after the producer's enqueued work; returns the handle.
  ncclComm_t begin(const char* what) {
    PARALLAX_CHECK(
        state_->comm != nullptr,
        fmt::format("NCCL {} on communicator '{}' after it was aborted", what, state_->name));
    PARALLAX_CUDA_CHECK(cudaEventRecord(produced_, producer_));
    PARALLAX_CUDA_CHECK(cudaStreamWaitEvent(stream_, produced_, 0));
    return state_->comm;
  }

  CommRequest finish(std::string what) {
    cudaEvent_t done = nullptr;
    PARALLAX_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    const cudaError_t status = cudaEventRecord(done, stream_);
    if (status != cudaSuccess) {
      (void)cudaEventDestroy(done);
      PARALLAX_CUDA_CHECK(status);
    }
    return CommRequest(std::make_unique<NcclRequest>(state_, done, std::move(what)));
  }

  void wait_mpi(MPI_Request& request, const char* what) {
    const auto deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(state_->timeout);
    for (;;) {
      int done = 0;
      mpi_check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "Test");
      if (done != 0)
        return;
      if (Clock::now() > deadline)
        throw CommTimeout(fmt::format("MPI {} on communicator '{}' did not complete within {} s",
                                      what, state_->name, state_->timeout.count()));
      std::this_thread::yield();
    }
  }

  void host_all_reduce(std::span<double> data, MPI_Op op, const char* what) {
    MPI_Request request{};
    mpi_check(MPI_Iallreduce(MPI_IN_PLACE, data.data(), mpi_count(data.size()), MPI_DOUBLE, op,
                             mpi_comm_, &request),
              "Iallreduce");
    wait_mpi(request, what);
  }

  MPI_Comm mpi_comm_;
  bool owns_mpi_comm_;
  std::shared_ptr<NcclState> state_;
  int rank_ = 0;
  int size_ = 1;
  cudaStream_t stream_ = nullptr;
  cudaStream_t producer_ = nullptr;
  cudaEvent_t produced_ = nullptr;
  cudaEvent_t pending_ = nullptr;
  float* barrier_scratch_ = nullptr;
};

void require_mpi() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  PARALLAX_CHECK(initialized != 0, "NCCL communicators need MPI: call MpiRuntime::init first");
}

} // namespace

int bind_local_device() {
  require_mpi();
  MPI_Comm node{};
  mpi_check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node),
            "Comm_split_type");
  int local_rank = 0;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_free(&node);
  int devices = 0;
  PARALLAX_CUDA_CHECK(cudaGetDeviceCount(&devices));
  PARALLAX_CHECK(devices > 0, "bind_local_device: no CUDA device is visible");
  const int device = local_rank % devices;
  PARALLAX_CUDA_CHECK(cudaSetDevice(device));
  return device;
}

std::unique_ptr<NcclCommunicator> nccl_world(std::chrono::duration<double> timeout) {
  require_mpi();
  MPI_Comm comm{};
  mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "Comm_dup");
  return std::make_unique<NcclCommunicatorImpl>(comm, true, "world", timeout);
}

std::unique_ptr<NcclCommunicator> nccl_group(const std::vector<int>& ranks, const std::string& name,
                                             std::chrono::duration<double> timeout) {
  require_mpi();
  MPI_Group world_group{};
  mpi_check(MPI_Comm_group(MPI_COMM_WORLD, &world_group), "Comm_group");
  MPI_Group group{};
  mpi_check(MPI_Group_incl(world_group, mpi_count(ranks.size()), ranks.data(), &group),
            "Group_incl");
  MPI_Comm comm{};
  // Collective over the group's members only (MPI 3), as mpi_group.
  mpi_check(MPI_Comm_create_group(MPI_COMM_WORLD, group, 0, &comm), "Comm_create_group");
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  return std::make_unique<NcclCommunicatorImpl>(comm, true, name, timeout);
}

} // namespace parallax::cuda
