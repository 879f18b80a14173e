#include "parallax/executor/async_ps.hpp"

#include "parallax/core/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

namespace parallax {

namespace {

// Tags on the data-parallel group (its own communicator: no other traffic shares them).
constexpr int kGradTag = 0x5001;
constexpr int kParamTag = 0x5002;
constexpr int kNormTag = 0x5003;
constexpr std::int64_t kReportFloats = 4; // loss sum (a double in two floats), time, staleness
// After a version's parameters: server 0's figures of the clock (loss sum and gradient norm as
// doubles, the slowest step time, the largest staleness).
constexpr std::int64_t kVersionReportFloats = 6;

void put_double(float* at, double v) {
  std::memcpy(at, &v, sizeof v);
}
double get_double(const float* at) {
  double v = 0;
  std::memcpy(&v, at, sizeof v);
  return v;
}

} // namespace

AsyncParameterServer::AsyncParameterServer(Communicator& group, std::vector<PsBlock> blocks,
                                           Options options, Update update)
    : group_(group), blocks_(std::move(blocks)), options_(options), update_(std::move(update)),
      me_(group.rank()) {
  PARALLAX_CHECK(options_.max_staleness >= 0, "parameter server: negative staleness bound");
  const int n = group.size();
  PARALLAX_CHECK(options_.workers >= 0 && options_.workers <= n,
                 "parameter server: more workers than ranks");
  workers_ = options_.workers == 0 || options_.workers == n ? n : options_.workers;
  first_server_ = workers_ == n ? 0 : workers_;
  servers_ = workers_ == n ? n : n - workers_;
  shard_ = me_ >= first_server_ ? me_ - first_server_ : -1;
  for (std::size_t b = 0; b < blocks_.size(); ++b) {
    PARALLAX_CHECK(blocks_[b].padded % servers_ == 0,
                   "parameter server: a block not padded to the server count");
    const std::int64_t s = shard_size(b);
    grad_elems_ += s;
    if (server()) {
      const float* mine = blocks_[b].params + shard_ * s;
      master_.emplace_back(mine, mine + s);
      sum_.emplace_back(static_cast<std::size_t>(s), 0.0f);
    }
  }
  version_ = clock_ = options_.start_step;
  if (worker()) {
    versions_.resize(static_cast<std::size_t>(servers_));
    for (int j = 0; j < servers_; ++j) {
      Incoming& v = versions_[static_cast<std::size_t>(j)];
      v.next = version_ + 1;
      v.data.resize(static_cast<std::size_t>(grad_elems_ + kVersionReportFloats));
      post(v, first_server_ + j, kParamTag);
    }
  }
  if (server()) {
    grads_in_.resize(static_cast<std::size_t>(workers_));
    for (int w = 0; w < workers_; ++w) {
      Incoming& g = grads_in_[static_cast<std::size_t>(w)];
      g.next = clock_;
      g.data.resize(static_cast<std::size_t>(grad_elems_ + kReportFloats));
      post(g, w, kGradTag);
    }
    norms_in_.resize(static_cast<std::size_t>(servers_));
    for (int j = 0; j < servers_; ++j) {
      if (j != shard_) {
        Incoming& m = norms_in_[static_cast<std::size_t>(j)];
        m.next = clock_;
        m.data.resize(2);
        post(m, first_server_ + j, kNormTag);
      }
    }
  }
}

AsyncParameterServer::~AsyncParameterServer() {
  // The receives posted for messages that will never come (the next version, push and norm).
  for (auto* list : {&versions_, &grads_in_, &norms_in_}) {
    for (Incoming& in : *list) {
      if (!in.data.empty()) {
        in.request.cancel();
      }
    }
  }
}

std::int64_t AsyncParameterServer::shard_size(std::size_t block) const {
  return blocks_[block].padded / servers_;
}

void AsyncParameterServer::post(Incoming& in, int source, int tag) {
  in.ready = false;
  in.request = group_.irecv(std::span<float>(in.data), source, tag);
}

bool AsyncParameterServer::receive(Incoming& in) {
  if (!in.ready && in.request.test()) {
    in.ready = true;
  }
  return in.ready;
}

void AsyncParameterServer::collect_sends() {
  while (!outgoing_.empty()) {
    Outgoing& o = outgoing_.front();
    bool done = true;
    for (CommRequest& r : o.sends) {
      done = r.test() && done;
    }
    if (!done) {
      break;
    }
    outgoing_.pop_front();
  }
}

void AsyncParameterServer::push(const PsWorkerReport& report) {
  PARALLAX_CHECK(worker(), "parameter server: a push from a dedicated server");
  for (int j = 0; j < servers_; ++j) {
    auto data =
        std::make_shared<std::vector<float>>(static_cast<std::size_t>(grad_elems_ + kReportFloats));
    std::int64_t at = 0;
    for (std::size_t b = 0; b < blocks_.size(); ++b) {
      const std::int64_t s = shard_size(b);
      std::copy_n(blocks_[b].grads + j * s, s, data->begin() + at);
      at += s;
    }
    put_double(data->data() + at, report.loss_sum);
    (*data)[static_cast<std::size_t>(at + 2)] = static_cast<float>(report.step_time_s);
    (*data)[static_cast<std::size_t>(at + 3)] = static_cast<float>(report.staleness);
    Outgoing o{.data = data, .sends = {}};
    o.sends.push_back(group_.isend(std::span<const float>(*data), first_server_ + j, kGradTag));
    outgoing_.push_back(std::move(o));
  }
  serve();
}

void AsyncParameterServer::serve() {
  if (!server()) {
    collect_sends();
    return;
  }
  // Pushes, filed by clock (each worker's arrive in its step order).
  for (int w = 0; w < workers_; ++w) {
    Incoming& in = grads_in_[static_cast<std::size_t>(w)];
    while (receive(in)) {
      auto& slot = pushes_[in.next];
      slot.resize(static_cast<std::size_t>(workers_));
      slot[static_cast<std::size_t>(w)] = std::move(in.data);
      in.data.assign(static_cast<std::size_t>(grad_elems_ + kReportFloats), 0.0f);
      ++in.next;
      post(in, w, kGradTag);
    }
  }
  // The other servers' partial norms, by clock.
  for (int j = 0; j < servers_; ++j) {
    if (j == shard_) {
      continue;
    }
    Incoming& in = norms_in_[static_cast<std::size_t>(j)];
    while (receive(in)) {
      auto& [sum, count] = norms_[in.next];
      sum += get_double(in.data.data());
      ++count;
      ++in.next;
      post(in, first_server_ + j, kNormTag);
    }
  }
  for (;;) {
    if (!summed_) {
      auto it = pushes_.find(clock_);
      if (it == pushes_.end() ||
          std::any_of(it->second.begin(), it->second.end(),
                      [](const std::vector<float>& v) { return v.empty(); })) {
        break;
      }
      // Summed in worker order, so every run (and k = 0) adds the same way.
      partial_ = 0;
      PsClockReport report{.clock = clock_};
      for (std::size_t b = 0; b < blocks_.size(); ++b) {
        std::fill(sum_[b].begin(), sum_[b].end(), 0.0f);
      }
      for (const std::vector<float>& msg : it->second) {
        std::int64_t at = 0;
        for (std::size_t b = 0; b < blocks_.size(); ++b) {
          for (float& v : sum_[b]) {
            v += msg[static_cast<std::size_t>(at++)];
          }
        }
        report.loss_sum += get_double(msg.data() + at);
        report.max_step_time_s = std::max(
            report.max_step_time_s, static_cast<double>(msg[static_cast<std::size_t>(at + 2)]));
        report.max_staleness =
            std::max(report.max_staleness, static_cast<int>(msg[static_cast<std::size_t>(at + 3)]));
      }
      for (const auto& s : sum_) {
        for (const float v : s) {
          partial_ += static_cast<double>(v) * v;
        }
      }
      report_ = report;
      auto data = std::make_shared<std::vector<float>>(2);
      put_double(data->data(), partial_);
      Outgoing o{.data = data, .sends = {}};
      for (int j = 0; j < servers_; ++j) {
        if (j != shard_) {
          o.sends.push_back(
              group_.isend(std::span<const float>(*data), first_server_ + j, kNormTag));
        }
      }
      outgoing_.push_back(std::move(o));
      pushes_.erase(it);
      summed_ = true;
    }
    if (servers_ > 1 && norms_[clock_].second < servers_ - 1) {
      break;
    }
    finish_clock();
  }
  collect_sends();
}

void AsyncParameterServer::finish_clock() {
  const double norm = std::sqrt(partial_ + norms_[clock_].first);
  norms_.erase(clock_);
  std::vector<std::span<float>> sums(sum_.begin(), sum_.end());
  std::vector<std::span<float>> masters(master_.begin(), master_.end());
  update_(clock_, sums, masters, norm);
  auto data = std::make_shared<std::vector<float>>(
      static_cast<std::size_t>(grad_elems_ + kVersionReportFloats), 0.0f);
  std::int64_t at = 0;
  for (const auto& m : master_) {
    std::copy(m.begin(), m.end(), data->begin() + at);
    at += static_cast<std::int64_t>(m.size());
  }
  if (shard_ == 0) {
    put_double(data->data() + at, report_.loss_sum);
    put_double(data->data() + at + 2, norm);
    (*data)[static_cast<std::size_t>(at + 4)] = static_cast<float>(report_.max_step_time_s);
    (*data)[static_cast<std::size_t>(at + 5)] = static_cast<float>(report_.max_staleness);
  }
  Outgoing o{.data = data, .sends = {}};
  for (int w = 0; w < workers_; ++w) {
    o.sends.push_back(group_.isend(std::span<const float>(*data), w, kParamTag));
  }
  outgoing_.push_back(std::move(o));
  ++clock_;
  summed_ = false;
}

bool AsyncParameterServer::version_ready() {
  bool all = true;
  for (int j = 0; j < servers_; ++j) {
    all = receive(versions_[static_cast<std::size_t>(j)]) && all;
  }
  return all;
}

void AsyncParameterServer::consume_version() {
  for (int j = 0; j < servers_; ++j) {
    Incoming& in = versions_[static_cast<std::size_t>(j)];
    std::int64_t at = 0;
    for (std::size_t b = 0; b < blocks_.size(); ++b) {
      const std::int64_t s = shard_size(b);
      std::copy_n(in.data.begin() + at, s, blocks_[b].params + j * s);
      at += s;
    }
    if (j == 0 && me_ == 0) {
      const float* r = in.data.data() + at;
      completed_.push_back({.clock = version_,
                            .loss_sum = get_double(r),
                            .grad_norm = get_double(r + 2),
                            .max_step_time_s = r[4],
                            .max_staleness = static_cast<int>(r[5])});
    }
    ++in.next;
    post(in, first_server_ + j, kParamTag);
  }
  ++version_;
}

template <class Done> void AsyncParameterServer::wait_until(Done done, const char* what) {
  const auto start = std::chrono::steady_clock::now();
  int spins = 0;
  while (!done()) {
    if (++spins > 1000) {
      std::this_thread::yield();
    }
    if (spins % 256 == 0 && std::chrono::steady_clock::now() - start > options_.timeout) {
      throw CommTimeout(fmt::format(
          "the parameter server did not reach {} within {:.0f} s (this rank holds version {}, "
          "serves clock {}; a peer rank died or stopped communicating)",
          what, options_.timeout.count(), version_, clock_));
    }
  }
}

std::int64_t AsyncParameterServer::pull(std::int64_t step) {
  PARALLAX_CHECK(worker(), "parameter server: a pull on a dedicated server");
  const std::int64_t need = std::max(options_.start_step, step - options_.max_staleness);
  serve();
  if (!options_.deterministic) {
    while (version_ < step && version_ready()) { // the newest every server has sent
      consume_version();
    }
  }
  wait_until(
      [&] {
        serve();
        if (version_ < need && version_ready()) {
          consume_version();
        }
        return version_ >= need;
      },
      "the parameter version a step needs");
  return version_;
}

void AsyncParameterServer::progress() {
  serve();
}

void AsyncParameterServer::serve_until(std::int64_t clock) {
  wait_until(
      [&] {
        serve();
        return clock_ >= clock;
      },
      "the clock a server step applies");
}

void AsyncParameterServer::drain(std::int64_t steps) {
  wait_until(
      [&] {
        serve();
        while (worker() && version_ < steps && version_ready()) {
          consume_version();
        }
        collect_sends();
        return (!server() || clock_ >= steps) && (!worker() || version_ >= steps) &&
               outgoing_.empty();
      },
      "a consistent state");
}

std::vector<PsClockReport> AsyncParameterServer::take_completed() {
  std::vector<PsClockReport> out;
  out.swap(completed_);
  return out;
}

} // namespace parallax
