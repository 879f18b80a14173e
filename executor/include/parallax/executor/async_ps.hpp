// The asynchronous parameter server with stale-synchronous bounds (grad_sync
// "parameter_server_async", max_staleness k) over one group of ranks: the first `workers`
// compute, and the shards are served either by every worker (co-located, the default: each
// rank serves 1/n of every parameter block) or by the group's remaining ranks (dedicated
// servers, plan field parameter_servers: each serves 1/N and computes nothing).
//
// Worker w, step t: pull a parameter version v with t − k <= v (exactly v = max(0, t − k) in
// the deterministic mode, else the newest one every server has sent), compute its gradients
// on it, push each server its slice of them (with the step's loss sum, time and staleness
// t − v). Nothing waits for the other workers except the bound.
// Server j, clock c: once every worker's clock-c slice is in, sum them in worker order, add
// its share of the squared gradient norm to the other servers' (sent to each other, so every
// shard clips by the global norm), apply the optimizer to its shard (the trainer's update
// callback) and send every worker the shard's version c + 1 (server 0 adds the clock's
// figures, which worker 0 reports).
// With k = 0 every step sees the previous step's parameters: exactly the synchronous result.
//
// Every wait polls the group's requests and serves meanwhile (a rank waiting for a version
// keeps its own shard moving), with a deadline. Clock, version and message order follow from
// MPI's non-overtaking order per (source, tag).
#pragma once

#include "parallax/executor/comm.hpp"

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <vector>

namespace parallax {

// One parameter block as the server sees it: the rank's full local buffers, of which server j
// serves the slice [j·shard, (j + 1)·shard) of the padded length (shard = padded / servers).
struct PsBlock {
  float* params = nullptr;
  const float* grads = nullptr; // a worker's (unused on a dedicated server)
  std::int64_t padded = 0;      // a multiple of the server count
};

// What a worker reports with its push, and what worker 0 learns of each clock from server 0.
struct PsWorkerReport {
  double loss_sum = 0;
  double step_time_s = 0;
  int staleness = 0;
};
struct PsClockReport {
  std::int64_t clock = 0; // the step whose gradients were applied
  double loss_sum = 0;    // over every worker
  double grad_norm = 0;   // of the summed gradient, before clipping
  double max_step_time_s = 0;
  int max_staleness = 0;
};

class AsyncParameterServer {
public:
  // Applies clock `clock`'s summed gradients (`grad_sum[b]`, this shard's slice of block b)
  // to the shard's master parameters (`master[b]`), the global gradient norm given.
  using Update = std::function<void(std::int64_t clock, std::span<const std::span<float>> grad_sum,
                                    std::span<const std::span<float>> master, double grad_norm)>;
  struct Options {
    int max_staleness = 0;
    bool deterministic = false;
    std::int64_t start_step = 0; // the version every rank holds (a resumed run's step)
    std::chrono::duration<double> timeout{600.0};
    // The group's first `workers` ranks compute and the rest are dedicated servers; 0 (or the
    // group size): every rank computes and serves a shard.
    int workers = 0;
  };

  AsyncParameterServer(Communicator& group, std::vector<PsBlock> blocks, Options options,
                       Update update);
  AsyncParameterServer(const AsyncParameterServer&) = delete;
  AsyncParameterServer& operator=(const AsyncParameterServer&) = delete;
  ~AsyncParameterServer();

  // Worker: makes the blocks' params a version allowed at `step` and returns it.
  std::int64_t pull(std::int64_t step);
  // Worker: sends this step's gradients (the blocks' grads) to every server.
  void push(const PsWorkerReport& report);
  // Serves whatever has arrived (never blocks).
  void progress();
  // Server: serves until clocks < `clock` are applied (a dedicated server's step).
  void serve_until(std::int64_t clock);
  // Until every server has applied clocks < `steps`, this worker holds version `steps` and
  // every message this rank sent has been delivered: a consistent state (checkpoints, the end).
  void drain(std::int64_t steps);
  // Worker 0: the clocks of the versions it took since the last call, in order (empty on
  // other ranks).
  std::vector<PsClockReport> take_completed();
  bool worker() const { return me_ < workers_; }
  bool server() const { return shard_ >= 0; }

  std::int64_t version() const { return version_; }
  std::int64_t server_clock() const { return clock_; }

private:
  struct Outgoing {
    std::shared_ptr<std::vector<float>> data;
    std::vector<CommRequest> sends;
  };
  struct Incoming {
    std::vector<float> data;
    CommRequest request;
    std::int64_t next = 0; // the clock (or version) the posted receive is for
    bool ready = false;    // received and not yet used
  };
  std::int64_t shard_size(std::size_t block) const;
  void post(Incoming& in, int source, int tag);
  bool receive(Incoming& in); // true once ready (the caller reposts after use)
  void serve();
  void finish_clock();
  void consume_version();
  bool version_ready();
  void collect_sends();
  template <class Done> void wait_until(Done done, const char* what);

  Communicator& group_;
  std::vector<PsBlock> blocks_;
  Options options_;
  Update update_;
  int me_ = 0;
  int workers_ = 1;      // ranks 0 .. workers_ − 1 compute
  int servers_ = 1;      // shards, served by ranks first_server_ .. first_server_ + servers_ − 1
  int first_server_ = 0; // 0 (co-located) or workers_ (dedicated)
  int shard_ = -1;       // the shard this rank serves, or −1
  std::int64_t grad_elems_ = 0; // Σ shard sizes: one worker's push to one server
  // Worker side.
  std::int64_t version_ = 0;
  std::vector<Incoming> versions_; // per server: its next version slices
  // Server side.
  std::int64_t clock_ = 0;                 // the next clock to apply
  std::vector<std::vector<float>> master_; // per block: this shard's parameters
  std::vector<Incoming> grads_in_;         // per worker: its next push
  std::map<std::int64_t, std::vector<std::vector<float>>> pushes_; // clock → per worker
  std::vector<Incoming> norms_in_;                       // per server: its next partial norm
  std::map<std::int64_t, std::pair<double, int>> norms_; // clock → (Σ partials, count)
  bool summed_ = false;                 // the current clock's sum and partial norm are sent
  std::vector<std::vector<float>> sum_; // per block: the current clock's summed slice
  double partial_ = 0;
  PsClockReport report_; // server 0: the current clock's figures
  std::deque<Outgoing> outgoing_;
  std::vector<PsClockReport> completed_;
};

} // namespace parallax
