#include "parallax/executor/grad_compression.hpp"

#include "parallax/core/error.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

namespace parallax {

namespace {

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ColMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

// Modified Gram-Schmidt on the columns of p (rows × r), in place; a column with no length left
// becomes zero (PowerSGD's epsilon guard).
void orthonormalize(Eigen::Map<ColMajor> p) {
  for (Eigen::Index j = 0; j < p.cols(); ++j) {
    for (Eigen::Index i = 0; i < j; ++i) {
      p.col(j) -= p.col(i).dot(p.col(j)) * p.col(i);
    }
    const float norm = p.col(j).norm();
    p.col(j) /= norm + 1e-8f;
  }
}

// The indices of the k elements of g largest in magnitude (ties: the lower index), by a radix
// select on the magnitude's bits: one pass counts the top 16 bits, a second collects the
// elements above the bucket holding the k-th and the candidates inside it, and only those
// candidates are ordered. Two memory-bound passes, like a GPU radix select.
std::vector<std::uint32_t> largest_magnitudes(std::span<const float> g, std::size_t k) {
  const auto key = [&](std::size_t i) { return std::bit_cast<std::uint32_t>(g[i]) & 0x7fffffffu; };
  std::vector<std::uint32_t> out;
  if (k == 0) {
    return out;
  }
  std::vector<std::size_t> count(1u << 15, 0);
  for (std::size_t i = 0; i < g.size(); ++i) {
    ++count[key(i) >> 16];
  }
  std::size_t above = 0;
  std::size_t bucket = count.size();
  while (bucket > 0 && above + count[bucket - 1] < k) {
    above += count[--bucket];
  }
  --bucket; // the bucket holding the k-th largest
  std::vector<std::uint32_t> candidates;
  out.reserve(k);
  for (std::size_t i = 0; i < g.size(); ++i) {
    const std::size_t b = key(i) >> 16;
    if (b > bucket) {
      out.push_back(static_cast<std::uint32_t>(i));
    } else if (b == bucket) {
      candidates.push_back(static_cast<std::uint32_t>(i));
    }
  }
  const std::size_t need = k - out.size();
  const auto larger = [&](std::uint32_t a, std::uint32_t b) {
    return key(a) > key(b) || (key(a) == key(b) && a < b);
  };
  std::nth_element(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(need),
                   candidates.end(), larger);
  out.insert(out.end(), candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(need));
  return out;
}

} // namespace

GradCompressor::GradCompressor(GradCompression method, bool error_feedback,
                               const BlockLayout& layout, std::uint64_t seed)
    : method_(method), error_feedback_(error_feedback && method.lossy()) {
  PARALLAX_CHECK(method.enabled(), "a gradient compressor needs a compression method");
  std::int64_t covered = 0; // the flat buffer's elements not in a factorised matrix go whole
  if (method.kind == CompressionKind::powersgd) {
    const std::int64_t r = method.rank;
    std::vector<const ParamInfo*> params;
    for (const ParamInfo& p : layout.params) {
      params.push_back(&p);
    }
    std::sort(params.begin(), params.end(),
              [](const ParamInfo* a, const ParamInfo* b) { return a->offset < b->offset; });
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (const ParamInfo* p : params) {
      const std::int64_t rows = p->local_rows;
      const std::int64_t cols = p->local_cols;
      if (rows < 2 || cols < 2 || (rows + cols) * r >= rows * cols) {
        continue;
      }
      if (p->offset > covered) {
        vectors_.emplace_back(covered, p->offset);
      }
      Matrix m{.offset = p->offset, .rows = rows, .cols = cols};
      m.q.resize(static_cast<std::size_t>(cols * r));
      for (float& v : m.q) {
        v = normal(rng);
      }
      matrices_.push_back(std::move(m));
      covered = p->offset + rows * cols;
    }
  }
  if (covered < layout.padded) {
    vectors_.emplace_back(covered, layout.padded);
  }
  if (error_feedback_) {
    residual_.assign(static_cast<std::size_t>(layout.padded), 0.0f);
  }
}

double GradCompressor::all_reduce(Communicator& comm, std::span<float> grads) {
  PARALLAX_CHECK(!error_feedback_ || grads.size() == residual_.size(),
                 "gradient compression: the block's gradient buffer changed size");
  switch (method_.kind) {
  case CompressionKind::bf16:
    return all_reduce_bf16(comm, grads);
  case CompressionKind::topk:
    return all_reduce_topk(comm, grads);
  case CompressionKind::powersgd:
    return all_reduce_powersgd(comm, grads);
  case CompressionKind::none:
    break;
  }
  comm.all_reduce_sum(grads);
  return static_cast<double>(grads.size_bytes());
}

void GradCompressor::add_residual(std::span<float> grads) {
  if (!error_feedback_) {
    return;
  }
  for (std::size_t i = 0; i < grads.size(); ++i) {
    grads[i] += residual_[i];
  }
}

double GradCompressor::all_reduce_bf16(Communicator& comm, std::span<float> grads) {
  std::vector<std::uint16_t> wire(grads.size());
  std::transform(grads.begin(), grads.end(), wire.begin(), float_to_bf16);
  comm.all_reduce_sum_bf16(wire);
  std::transform(wire.begin(), wire.end(), grads.begin(), bf16_to_float);
  return static_cast<double>(wire.size() * sizeof(std::uint16_t));
}

double GradCompressor::all_reduce_topk(Communicator& comm, std::span<float> grads) {
  add_residual(grads);
  const std::size_t n = grads.size();
  const auto k = std::min<std::size_t>(
      n, static_cast<std::size_t>(std::ceil(method_.fraction * static_cast<double>(n))));
  const std::vector<std::uint32_t> order = largest_magnitudes(grads, k);
  // (index, value) pairs; the index travels bit for bit in a float slot.
  std::vector<float> mine(2 * k);
  for (std::size_t i = 0; i < k; ++i) {
    mine[2 * i] = std::bit_cast<float>(order[i]);
    mine[2 * i + 1] = grads[order[i]];
  }
  if (error_feedback_) {
    std::copy(grads.begin(), grads.end(), residual_.begin());
    for (std::size_t i = 0; i < k; ++i) {
      residual_[order[i]] = 0.0f;
    }
  }
  std::vector<float> all(mine.size() * static_cast<std::size_t>(comm.size()));
  comm.all_gather(mine, all);
  std::fill(grads.begin(), grads.end(), 0.0f);
  for (std::size_t i = 0; i < all.size(); i += 2) { // in rank order: the same sum everywhere
    const auto index = std::bit_cast<std::uint32_t>(all[i]);
    PARALLAX_CHECK(index < n, "top-k: a peer sent an index outside the block");
    grads[index] += all[i + 1];
  }
  return static_cast<double>(mine.size() * sizeof(float));
}

double GradCompressor::all_reduce_powersgd(Communicator& comm, std::span<float> grads) {
  add_residual(grads);
  const Eigen::Index r = method_.rank;
  std::int64_t first = 0;
  for (auto [b, e] : vectors_) {
    first += e - b;
  }
  std::int64_t second = 0;
  for (const Matrix& m : matrices_) {
    first += m.rows * r;
    second += m.cols * r;
  }
  // Round one: the vectors whole and P = M·Q of every matrix.
  std::vector<float> one(static_cast<std::size_t>(first));
  std::int64_t at = 0;
  for (auto [b, e] : vectors_) {
    std::copy(grads.begin() + b, grads.begin() + e, one.begin() + at);
    at += e - b;
  }
  const auto matrix = [&](const Matrix& m) {
    return Eigen::Map<RowMajor>(grads.data() + m.offset, m.rows, m.cols);
  };
  for (Matrix& m : matrices_) {
    Eigen::Map<ColMajor> p(one.data() + at, m.rows, r);
    p.noalias() = matrix(m) * Eigen::Map<const ColMajor>(m.q.data(), m.cols, r);
    at += m.rows * r;
  }
  comm.all_reduce_sum(std::span<float>(one));
  at = 0;
  for (auto [b, e] : vectors_) {
    std::copy(one.begin() + at, one.begin() + at + (e - b), grads.begin() + b);
    at += e - b;
  }
  // Round two: Q = Mᵀ·P̂ with P̂ the orthonormalised sum of P.
  std::vector<float> two(static_cast<std::size_t>(second));
  std::int64_t at2 = 0;
  const std::int64_t p_start = at;
  for (Matrix& m : matrices_) {
    Eigen::Map<ColMajor> p(one.data() + at, m.rows, r);
    orthonormalize(p);
    Eigen::Map<ColMajor> q(two.data() + at2, m.cols, r);
    q.noalias() = matrix(m).transpose() * p;
    if (error_feedback_) {
      // What this rank's message does not carry: M − P̂·Q_iᵀ.
      Eigen::Map<RowMajor> e(residual_.data() + m.offset, m.rows, m.cols);
      e = matrix(m) - p * q.transpose();
    }
    at += m.rows * r;
    at2 += m.cols * r;
  }
  comm.all_reduce_sum(std::span<float>(two));
  at = p_start;
  at2 = 0;
  for (Matrix& m : matrices_) {
    Eigen::Map<const ColMajor> p(one.data() + at, m.rows, r);
    Eigen::Map<const ColMajor> q(two.data() + at2, m.cols, r);
    matrix(m).noalias() = p * q.transpose();
    std::copy(q.data(), q.data() + q.size(), m.q.begin()); // warm start for the next step
    at += m.rows * r;
    at2 += m.cols * r;
  }
  return static_cast<double>((one.size() + two.size()) * sizeof(float));
}

} // namespace parallax
