// The maintenance thread: once a second it publishes the log's figures,
// every stats_interval it publishes each collection's full state (tree,
// drift; O(N) each), and it takes a snapshot when one is due (by time, or
// by the log's size), retrying a failed one with backoff.
//
// Thread safety: the thread runs from construction to destruction; the
// callbacks it is given must be safe to call from it.
#ifndef NEGMINE_SERVER_MAINTENANCE_H_
#define NEGMINE_SERVER_MAINTENANCE_H_

#include <thread>

#include "absl/synchronization/mutex.h"
#include "server/commit.h"
#include "server/metrics.h"
#include "server/registry.h"

namespace negmine::server {

// Publishes every collection's full state (tree, drift) to the metrics, and
// the GPU's memory once a collection lives there.
void PublishIndexMetrics(const CollectionRegistry& registry, Metrics& metrics);

class MaintenanceThread {
 public:
  struct Options {
    double stats_interval_seconds = 15;     // 0: never
    double snapshot_interval_seconds = 3600;  // 0: never
    uint64_t snapshot_wal_bytes = uint64_t{1} << 30;  // 0: no size trigger
  };
  // `registry`, `commits` and `metrics` outlive this.
  MaintenanceThread(const Options& options, const CollectionRegistry* registry,
                    CommitPath* commits, Metrics* metrics);
  // Stops the thread and joins it.
  ~MaintenanceThread();

 private:
  void Loop();

  const Options options_;
  const CollectionRegistry* const registry_;
  CommitPath* const commits_;
  Metrics* const metrics_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_MAINTENANCE_H_
