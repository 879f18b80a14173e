#include "parallax/executor/comm.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/grad_compression.hpp"
#include "parallax/executor/mpi_check.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

namespace parallax {

CommRequest& CommRequest::operator=(CommRequest&& other) noexcept {
  if (this != &other) {
    if (impl_) {
      try {
        impl_->wait();
      } catch (...) { // NOLINT(bugprone-empty-catch): a move must not throw; the job aborts anyway
      }
    }
    impl_ = std::move(other.impl_);
  }
  return *this;
}

CommRequest::~CommRequest() {
  if (impl_) {
    try {
      impl_->wait();
    } catch (...) { // NOLINT(bugprone-empty-catch): destructors must not throw
    }
  }
}

namespace {
std::atomic<std::int64_t> g_blocked_ns{0};
} // namespace

double CommRequest::blocked_seconds() {
  return static_cast<double>(g_blocked_ns.load(std::memory_order_relaxed)) * 1e-9;
}

void CommRequest::wait() {
  if (!impl_)
    return;
  const auto start = std::chrono::steady_clock::now();
  impl_->wait();
  impl_.reset();
  g_blocked_ns.fetch_add(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count(),
      std::memory_order_relaxed);
}

void CommRequest::cancel() {
  if (!impl_)
    return;
  impl_->cancel();
  impl_.reset();
}

bool CommRequest::test() {
  if (!impl_)
    return true;
  if (!impl_->test())
    return false;
  impl_.reset();
  return true;
}

namespace {

class MpiRequest final : public CommRequest::Impl {
public:
  // `keep`: what MPI reads until completion (an all-to-all's counts), released with the request.
  MpiRequest(MPI_Request request, std::string what, std::chrono::duration<double> timeout,
             std::shared_ptr<const void> keep = nullptr)
      : request_(request), what_(std::move(what)), timeout_(timeout), keep_(std::move(keep)) {}

  void cancel() override {
    int done = 0;
    mpi_check(MPI_Test(&request_, &done, MPI_STATUS_IGNORE), "test");
    if (done == 0) {
      mpi_check(MPI_Cancel(&request_), "Cancel");
      mpi_check(MPI_Wait(&request_, MPI_STATUS_IGNORE), "Wait");
    }
  }

  bool test() override {
    int done = 0;
    mpi_check(MPI_Test(&request_, &done, MPI_STATUS_IGNORE), "test");
    return done != 0;
  }

  void wait() override {
    // Poll with a deadline: MPI has no timed wait, and a dead peer must not hang the job.
    const auto start = std::chrono::steady_clock::now();
    int spins = 0;
    while (!test()) {
      // Keep polling (MPI progresses large messages only inside these calls), but yield the
      // core after a while so oversubscribed ranks let their busy peers run.
      if (++spins > 1000)
        std::this_thread::yield();
      if (spins % 256 == 0 && std::chrono::steady_clock::now() - start > timeout_) {
        throw CommTimeout(fmt::format("{} did not complete within {:.0f} s (a peer rank died or "
                                      "stopped communicating)",
                                      what_, timeout_.count()));
      }
    }
  }

private:
  MPI_Request request_;
  std::string what_;
  std::chrono::duration<double> timeout_;
  std::shared_ptr<const void> keep_;
};

// MPI has no bfloat16 type: a user operation over 16-bit words, adding in fp32 and rounding
// back (round to nearest even), created once.
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype* /*type*/) {
  const auto* a = static_cast<const std::uint16_t*>(in);
  auto* b = static_cast<std::uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    b[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
  }
}

MPI_Op bf16_sum_op() {
  static const MPI_Op op = [] {
    MPI_Op o{};
    mpi_check(MPI_Op_create(&bf16_sum, 1, &o), "Op_create");
    return o;
  }();
  return op;
}

class MpiCommunicator final : public Communicator {
public:
  MpiCommunicator(MPI_Comm comm, bool owned, std::string name,
                  std::chrono::duration<double> timeout)
      : comm_(comm), owned_(owned), name_(std::move(name)), timeout_(timeout) {
    mpi_check(MPI_Comm_rank(comm_, &rank_), "Comm_rank");
    mpi_check(MPI_Comm_size(comm_, &size_), "Comm_size");
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized)
      MPI_Comm_free(&comm_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }

  CommRequest iall_reduce_sum(std::span<float> data) override {
    return reduce(data, MPI_SUM, "all-reduce(sum)");
  }
  CommRequest iall_reduce_max(std::span<float> data) override {
    return reduce(data, MPI_MAX, "all-reduce(max)");
  }
  CommRequest iall_reduce_sum_bf16(std::span<std::uint16_t> data) override {
    MPI_Request r{};
    mpi_check(MPI_Iallreduce(MPI_IN_PLACE, data.data(), mpi_count(data.size()), MPI_UINT16_T,
                             bf16_sum_op(), comm_, &r),
              "Iallreduce");
    return wrap(r, "all-reduce(sum, bf16)", data.size());
  }
  CommRequest ireduce_scatter_sum(std::span<const float> in, std::span<float> out) override {
    PARALLAX_CHECK(in.size() == out.size() * static_cast<std::size_t>(size_),
                   "reduce-scatter input must be size() blocks of the output");
    MPI_Request r{};
    mpi_check(MPI_Ireduce_scatter_block(in.data(), out.data(), mpi_count(out.size()), MPI_FLOAT,
                                        MPI_SUM, comm_, &r),
              "Ireduce_scatter_block");
    return wrap(r, "reduce-scatter", out.size());
  }
  CommRequest iall_gather(std::span<const float> in, std::span<float> out) override {
    PARALLAX_CHECK(out.size() == in.size() * static_cast<std::size_t>(size_),
                   "all-gather output must be size() blocks of the input");
    const bool in_place = in.data() == out.data() + in.size() * static_cast<std::size_t>(rank_);
    MPI_Request r{};
    mpi_check(MPI_Iallgather(in_place ? MPI_IN_PLACE : in.data(), mpi_count(in.size()), MPI_FLOAT,
                             out.data(), mpi_count(in.size()), MPI_FLOAT, comm_, &r),
              "Iallgather");
    return wrap(r, "all-gather", out.size());
  }
  CommRequest iall_to_allv(std::span<const float> in, std::span<const int> send_counts,
                           std::span<float> out, std::span<const int> recv_counts) override {
    const auto n = static_cast<std::size_t>(size_);
    PARALLAX_CHECK(send_counts.size() == n && recv_counts.size() == n,
                   "all-to-all needs one send and one receive count per rank");
    // MPI reads the counts and displacements until the operation completes: the request
    // keeps them.
    auto layout = std::make_shared<std::array<std::vector<int>, 4>>();
    auto& [sc, sd, rc, rd] = *layout;
    sc.assign(send_counts.begin(), send_counts.end());
    rc.assign(recv_counts.begin(), recv_counts.end());
    sd.assign(n, 0);
    rd.assign(n, 0);
    for (std::size_t i = 1; i < n; ++i) {
      sd[i] = sd[i - 1] + sc[i - 1];
      rd[i] = rd[i - 1] + rc[i - 1];
    }
    PARALLAX_CHECK(static_cast<std::size_t>(sd[n - 1] + sc[n - 1]) == in.size() &&
                       static_cast<std::size_t>(rd[n - 1] + rc[n - 1]) == out.size(),
                   "all-to-all buffers must hold the sum of their counts");
    MPI_Request r{};
    mpi_check(MPI_Ialltoallv(in.data(), sc.data(), sd.data(), MPI_FLOAT, out.data(), rc.data(),
                             rd.data(), MPI_FLOAT, comm_, &r),
              "Ialltoallv");
    return CommRequest(std::make_unique<MpiRequest>(
        r,
        fmt::format("all-to-all of {} floats on the {} group ({} ranks)", in.size(), name_, size_),
        timeout_, std::move(layout)));
  }
  CommRequest ibroadcast(std::span<float> data, int root) override {
    MPI_Request r{};
    mpi_check(MPI_Ibcast(data.data(), mpi_count(data.size()), MPI_FLOAT, root, comm_, &r),
              "Ibcast");
    return wrap(r, "broadcast", data.size());
  }
  CommRequest ireduce_sum(std::span<float> data, int root) override {
    MPI_Request r{};
    mpi_check(MPI_Ireduce(rank_ == root ? MPI_IN_PLACE : data.data(), data.data(),
                          mpi_count(data.size()), MPI_FLOAT, MPI_SUM, root, comm_, &r),
              "Ireduce");
    return wrap(r, "reduce(sum)", data.size());
  }
  CommRequest isend(std::span<const float> data, int dest, int tag) override {
    MPI_Request r{};
    mpi_check(MPI_Isend(data.data(), mpi_count(data.size()), MPI_FLOAT, dest, tag, comm_, &r),
              "Isend");
    return wrap(r, fmt::format("send to {} rank {} (tag {})", name_, dest, tag), data.size());
  }
  CommRequest irecv(std::span<float> data, int source, int tag) override {
    MPI_Request r{};
    mpi_check(MPI_Irecv(data.data(), mpi_count(data.size()), MPI_FLOAT, source, tag, comm_, &r),
              "Irecv");
    return wrap(r, fmt::format("receive from {} rank {} (tag {})", name_, source, tag),
                data.size());
  }
  CommRequest ibarrier() override {
    MPI_Request r{};
    mpi_check(MPI_Ibarrier(comm_, &r), "Ibarrier");
    return wrap(r, "barrier", 0);
  }
  void all_reduce_sum(std::span<double> data) override {
    MPI_Request r{};
    mpi_check(MPI_Iallreduce(MPI_IN_PLACE, data.data(), mpi_count(data.size()), MPI_DOUBLE, MPI_SUM,
                             comm_, &r),
              "Iallreduce");
    wrap(r, "all-reduce(sum, fp64)", data.size()).wait();
  }
  void all_reduce_max(std::span<double> data) override {
    MPI_Request r{};
    mpi_check(MPI_Iallreduce(MPI_IN_PLACE, data.data(), mpi_count(data.size()), MPI_DOUBLE, MPI_MAX,
                             comm_, &r),
              "Iallreduce");
    wrap(r, "all-reduce(max, fp64)", data.size()).wait();
  }

  std::vector<std::string> gather_strings(const std::string& mine, int root) override {
    int len = mpi_count(mine.size());
    std::vector<int> lens(rank_ == root ? static_cast<std::size_t>(size_) : 0);
    MPI_Request r{};
    mpi_check(MPI_Igather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, root, comm_, &r), "Igather");
    wrap(r, "gather(lengths)", 1).wait();
    std::vector<int> displs(lens.size());
    std::size_t total = 0;
    for (std::size_t i = 0; i < lens.size(); ++i) {
      displs[i] = mpi_count(total);
      total += static_cast<std::size_t>(lens[i]);
    }
    std::string all(total, '\0');
    mpi_check(MPI_Igatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(),
                           MPI_CHAR, root, comm_, &r),
              "Igatherv");
    wrap(r, "gather(strings)", total).wait();
    std::vector<std::string> out;
    for (std::size_t i = 0; i < lens.size(); ++i) {
      out.push_back(
          all.substr(static_cast<std::size_t>(displs[i]), static_cast<std::size_t>(lens[i])));
    }
    return out;
  }

private:
  CommRequest reduce(std::span<float> data, MPI_Op op, const char* what) {
    MPI_Request r{};
    mpi_check(
        MPI_Iallreduce(MPI_IN_PLACE, data.data(), mpi_count(data.size()), MPI_FLOAT, op, comm_, &r),
        "Iallreduce");
    return wrap(r, what, data.size());
  }
  CommRequest wrap(MPI_Request r, std::string_view what, std::size_t elems) {
    return CommRequest(std::make_unique<MpiRequest>(
        r, fmt::format("{} of {} floats on the {} group ({} ranks)", what, elems, name_, size_),
        timeout_));
  }

  MPI_Comm comm_;
  bool owned_;
  std::string name_;
  std::chrono::duration<double> timeout_;
  int rank_ = 0;
  int size_ = 1;
};

} // namespace

void MpiRuntime::init(int* argc, char*** argv) {
  if (initialized())
    return;
  int provided = 0;
  mpi_check(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided), "Init_thread");
  // Errors come back as return codes, so they surface as exceptions with a message.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  std::atexit([] {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized)
      MPI_Finalize();
  });
}

bool MpiRuntime::initialized() {
  int flag = 0;
  MPI_Initialized(&flag);
  return flag != 0;
}

int MpiRuntime::world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int MpiRuntime::world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

void MpiRuntime::abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

std::unique_ptr<Communicator> mpi_world(std::chrono::duration<double> timeout) {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false, "world", timeout);
}

std::unique_ptr<Communicator> mpi_group(const std::vector<int>& ranks, const std::string& name,
                                        std::chrono::duration<double> timeout) {
  MPI_Group world_group{};
  mpi_check(MPI_Comm_group(MPI_COMM_WORLD, &world_group), "Comm_group");
  MPI_Group group{};
  mpi_check(MPI_Group_incl(world_group, mpi_count(ranks.size()), ranks.data(), &group),
            "Group_incl");
  MPI_Comm comm{};
  // Collective only over the group's members (MPI 3), so disjoint groups are built in parallel.
  mpi_check(MPI_Comm_create_group(MPI_COMM_WORLD, group, 0, &comm), "Comm_create_group");
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  return std::make_unique<MpiCommunicator>(comm, true, name, timeout);
}

} // namespace parallax
