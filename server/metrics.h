// The server's Prometheus metrics: every family registered once, at startup,
// into this struct of references. Labels are low-cardinality (method, code,
// collection), never request ids. The process_* families follow the
// Prometheus client convention (no negmine_ prefix), so that standard
// dashboards find them.
//
// Thread safety: prometheus-cpp metrics are safe to update from any thread;
// SetIndex and RemoveCollection are serialized internally.
#ifndef NEGMINE_SERVER_METRICS_H_
#define NEGMINE_SERVER_METRICS_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "core/index.h"

namespace negmine::server {

// The labels a request carries besides its method and code: the collection
// it ran on ("" when none, or before it was found; past kMaxCollectionLabels
// distinct names, "other") and, for mining, its mode ("top_k", "sample",
// "mixed", with "_log_z" when a certified log Z was asked for).
struct RequestLabels {
  std::string collection;
  std::string mode;
};

// What the binary was built from, for negmine_build_info.
struct BuildInfo {
  std::string version;   // the project version
  std::string commit;    // git commit at configure time ("unknown" outside git)
  std::string backends;  // "cpu" or "cpu,cuda"
};
BuildInfo GetBuildInfo();

// Recovery's phases, for negmine_recovery_phase.
enum class RecoveryPhase { kStarting, kSnapshot, kLog, kDone };

class Metrics {
 public:
  Metrics();

  const std::shared_ptr<prometheus::Registry>& registry() const {
    return registry_;
  }
  // process_* metrics, read from /proc at scrape time.
  const std::shared_ptr<prometheus::Collectable>& process() const { return process_; }

  // Distinct collection labels before the rest fold into "other".
  static constexpr size_t kMaxCollectionLabels = 32;

  // One finished RPC: its method, canonical code name, latency and labels.
  void ObserveRequest(const std::string& method, const std::string& code,
                      double seconds, const RequestLabels& labels = {});
  // One mining request of `queries` queries that returned `negatives`.
  void ObserveMine(size_t queries, size_t negatives);
  // One mining request's queries: the targets each filter removed (summed
  // over its queries), and the queries that got fewer than k results.
  void ObserveFiltered(const FilterCounts& removed, size_t short_queries);
  // The current size and version of a collection.
  void SetCollection(const std::string& collection, double targets,
                     double version);
  // After a drift update of a collection.
  void SetDrift(const std::string& collection, double step, double residual,
                bool rebased);
  // A collection's full state (GetIndexInfo's figures; refreshed
  // periodically, since the tree's figures cost O(N)).
  void SetIndex(const std::string& collection, const IndexStats& stats,
                const std::optional<TreeSummary>& tree, const DriftSummary& drift);
  void RemoveCollection(const std::string& collection);
  // A GPU's memory in use (by any process) and in all.
  void SetGpuMemory(int device, double used, double total);
  // The write-ahead log: its current size, and its fsyncs since the start
  // over every log generation.
  void SetWal(double bytes, double syncs, double sync_seconds);
  void ObserveSnapshot(double bytes, double seconds);
  // 1 while changes can be logged, 0 while the write-ahead log refuses them
  // (a full disk, retried with backoff; or a failed fsync, until a restart).
  void SetWalWritable(bool writable);
  // Changes waiting for the change before them (a drift fit holds the rest).
  void SetCommitsWaiting(int waiting);
  // Recovery: its phase, and how far it is through it (0..1).
  void SetRecovery(RecoveryPhase phase, double progress);

 private:
  using GaugeFamily = prometheus::Family<prometheus::Gauge>;
  using CounterFamily = prometheus::Family<prometheus::Counter>;
  // Raises the counter of `family` for `collection` to `value` (a
  // cumulative count kept by the index).
  static void CounterTo(CounterFamily& family, const std::string& collection, double value);
  // `collection` as a label value: itself for the first
  // kMaxCollectionLabels names seen, then "other".
  std::string CollectionLabel(const std::string& collection);

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& latency_;
  prometheus::Counter& negatives_;
  prometheus::Family<prometheus::Counter>& filtered_;
  prometheus::Counter& short_queries_;
  prometheus::Histogram& batch_queries_;
  GaugeFamily& targets_;
  GaugeFamily& version_;
  GaugeFamily& memory_;
  GaugeFamily& device_memory_;
  GaugeFamily& gpu_used_;
  GaugeFamily& gpu_total_;
  GaugeFamily& tree_nodes_;
  GaugeFamily& tree_depth_;
  GaugeFamily& tree_looseness_;
  CounterFamily& tree_rebuilds_;
  CounterFamily& tree_subtree_rebuilds_;
  GaugeFamily& tree_rebuild_seconds_;
  GaugeFamily& tree_rebuild_pending_;
  CounterFamily& sampler_proposals_;
  CounterFamily& sampler_accepted_;
  GaugeFamily& drift_step_;
  GaugeFamily& drift_residual_;
  CounterFamily& drift_rebases_;
  prometheus::Gauge& wal_bytes_;
  prometheus::Gauge& wal_writable_;
  prometheus::Counter& wal_syncs_;
  prometheus::Counter& wal_sync_seconds_;
  prometheus::Counter& snapshots_;
  prometheus::Gauge& snapshot_bytes_;
  prometheus::Gauge& snapshot_seconds_;
  prometheus::Gauge& commits_waiting_;
  GaugeFamily& recovery_phase_;
  prometheus::Gauge& recovery_progress_;
  // Per-collection families, for RemoveCollection.
  std::vector<GaugeFamily*> collection_gauges_;
  std::vector<CounterFamily*> collection_counters_;
  absl::Mutex mu_;  // serializes SetIndex / RemoveCollection
  absl::Mutex label_mu_;
  absl::flat_hash_set<std::string> collection_labels_ ABSL_GUARDED_BY(label_mu_);
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_METRICS_H_
