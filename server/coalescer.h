// SearchCoalescer: micro-batching of concurrent searches on one collection.
//
// A GPU scores a batch of 4096 queries in about the time it scores a few
// (the scan of the targets is shared), so concurrent Mine / MineStream
// requests on one collection are merged into one Index::Search call:
//
//   request A (3 queries) --\                      /--> A's 3 results
//   request B (5 queries) ---+--> one Search(9) --+---> B's 5 results
//   request C (1 query)  --/                       \--> C's 1 result
//
// The first request to arrive while no batch of its kind is being formed
// leads: it waits up to `max_delay` (the latency budget) for more, or until
// `max_queries` are queued, then runs the merged search and hands every
// request its own slice. Requests that arrive while a batch runs queue for
// the next one. Requests merge only when their specs are equal
// (SearchParams::Spec), they name no positives, and their mode is top-k,
// whose results do not
// depend on the batch (scores to float rounding: a GEMM's summation order
// follows the batch's shape); sampling results depend on each query's position in
// its call (the seed's stream), so sampling requests run alone.
//
// Each request keeps its own status: its input is validated before it joins
// a batch (a bad request fails alone), a cancelled request gets CANCELLED,
// and the merged search stops only when every member is cancelled. An error
// of the merged search itself (say, out of GPU memory) goes to every member.
//
// Thread safety: Search may be called from any number of threads.
#ifndef NEGMINE_SERVER_COALESCER_H_
#define NEGMINE_SERVER_COALESCER_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/index.h"

namespace negmine::server {

class SearchCoalescer {
 public:
  struct Options {
    // Most queries in one merged search; 0 turns coalescing off.
    size_t max_queries = 4096;
    // How long a batch's leader waits for more requests.
    absl::Duration max_delay = absl::Microseconds(500);
  };

  // `index` must outlive the coalescer.
  SearchCoalescer(const Index* index, const Options& options)
      : index_(index), options_(options) {}

  // As Index::Search, merged with concurrent compatible calls when possible.
  absl::StatusOr<SearchResult> Search(absl::Span<const float> queries,
                                      absl::Span<const std::vector<uint64_t>> exclude,
                                      const SearchParams& params);

  // Merged searches run, and the requests they served (for metrics/tests).
  uint64_t batches() const { return batches_.load(); }
  uint64_t merged_requests() const { return merged_requests_.load(); }

 private:
  struct Pending;

  // Runs the batch `members` (popped from the queue), outside mu_; one
  // result per member.
  std::vector<absl::StatusOr<SearchResult>> RunBatch(const std::vector<Pending*>& members);

  const Index* index_;
  const Options options_;
  absl::Mutex mu_;
  std::deque<Pending*> queue_ ABSL_GUARDED_BY(mu_);
  size_t queued_queries_ ABSL_GUARDED_BY(mu_) = 0;
  bool forming_ ABSL_GUARDED_BY(mu_) = false;  // a leader is gathering
  bool running_ ABSL_GUARDED_BY(mu_) = false;  // a batch is being searched
  std::atomic<uint64_t> batches_{0}, merged_requests_{0};
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_COALESCER_H_
