// ParallelFor: splits [0, n) into contiguous pieces run on short-lived
// threads (the caller runs the first piece). For per-query host work after a
// GPU batch, where thousands of queries each need a little CPU.
//
// Thread safety: fn must be safe to call concurrently on disjoint ranges.
#ifndef NEGMINE_CORE_PARALLEL_H_
#define NEGMINE_CORE_PARALLEL_H_

#include <algorithm>
#include <cstddef>
#include <thread>
#include <vector>

namespace negmine {

// Calls fn(begin, end) on pieces of at least `min_piece` items, on at most
// std::thread::hardware_concurrency() threads (capped at 16).
template <typename Fn>
void ParallelFor(size_t n, size_t min_piece, Fn fn) {
  const size_t cores = std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 16);
  const size_t pieces = std::clamp<size_t>(n / std::max<size_t>(min_piece, 1), 1, cores);
  std::vector<std::thread> threads;
  threads.reserve(pieces - 1);
  for (size_t p = 1; p < pieces; ++p) {
    threads.emplace_back([&, p] { fn(n * p / pieces, n * (p + 1) / pieces); });
  }
  fn(0, n / pieces);
  for (std::thread& t : threads) t.join();
}

}  // namespace negmine

#endif  // NEGMINE_CORE_PARALLEL_H_
