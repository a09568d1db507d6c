#include "server/metrics.h"

#include <dirent.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include <prometheus/client_metric.h>
#include <prometheus/metric_family.h>

namespace negmine::server {
namespace {

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
  return *b;
}

const prometheus::Histogram::BucketBoundaries& BatchBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{
      1, 4, 16, 64, 256, 1024, 4096, 16384, 65536};
  return *b;
}

// The standard process_* metrics of Prometheus clients, from /proc/self.
class ProcessCollector final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    auto add = [&](const char* name, const char* help, prometheus::MetricType type, double v) {
      prometheus::MetricFamily f{.name = name, .help = help, .type = type};
      prometheus::ClientMetric m;
      if (type == prometheus::MetricType::Counter) {
        m.counter.value = v;
      } else {
        m.gauge.value = v;
      }
      f.metric.push_back(m);
      out.push_back(std::move(f));
    };
    const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
    // /proc/self/stat: fields after the parenthesized command name.
    std::ifstream stat_file("/proc/self/stat");
    std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
    const size_t close = stat.rfind(')');
    if (close != std::string::npos) {
      std::istringstream in(stat.substr(close + 2));
      std::vector<std::string> f;
      for (std::string s; in >> s;) f.push_back(s);
      // f[0] is field 3 (state): utime 14, stime 15, num_threads 20,
      // starttime 22, vsize 23, rss 24.
      if (f.size() > 21) {
        add("process_cpu_seconds_total", "User and system CPU time, seconds.",
            prometheus::MetricType::Counter, (std::stod(f[11]) + std::stod(f[12])) / tick);
        add("process_threads", "OS threads.", prometheus::MetricType::Gauge, std::stod(f[17]));
        add("process_virtual_memory_bytes", "Virtual memory size, bytes.",
            prometheus::MetricType::Gauge, std::stod(f[20]));
        add("process_resident_memory_bytes", "Resident memory size, bytes.",
            prometheus::MetricType::Gauge, std::stod(f[21]) * page);
        std::ifstream uptime_file("/proc/uptime");
        double uptime = 0;
        uptime_file >> uptime;
        const double boot = static_cast<double>(time(nullptr)) - uptime;
        add("process_start_time_seconds", "Start time since the Unix epoch, seconds.",
            prometheus::MetricType::Gauge, boot + std::stod(f[19]) / tick);
      }
    }
    if (DIR* d = opendir("/proc/self/fd")) {
      double fds = 0;
      while (readdir(d) != nullptr) ++fds;
      closedir(d);
      add("process_open_fds", "Open file descriptors.", prometheus::MetricType::Gauge,
          fds - 3);  // ".", ".." and the one opendir holds
    }
    return out;
  }
};

}  // namespace

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      process_(std::make_shared<ProcessCollector>()),
      requests_(prometheus::BuildCounter()
                    .Name("negmine_requests_total")
                    .Help("Finished RPCs, by method, gRPC status code, collection and "
                          "mine mode.")
                    .Register(*registry_)),
      latency_(prometheus::BuildHistogram()
                   .Name("negmine_request_duration_seconds")
                   .Help("RPC latency, by method, gRPC status code, collection and mine "
                         "mode.")
                   .Register(*registry_)),
      negatives_(prometheus::BuildCounter()
                     .Name("negmine_negatives_served_total")
                     .Help("Negatives returned by Mine and MineStream.")
                     .Register(*registry_)
                     .Add({})),
      filtered_(prometheus::BuildCounter()
                    .Name("negmine_filtered_targets_total")
                    .Help("Targets a mining query could not get, summed over queries, by "
                          "filter: excluded, positives, max_score, min_score, "
                          "absolute_margin, relative_margin (not eligible), rank_offset, "
                          "dedupe (eligible, skipped or dropped).")
                    .Register(*registry_)),
      short_queries_(prometheus::BuildCounter()
                         .Name("negmine_short_results_total")
                         .Help("Mining queries answered with fewer than k results.")
                         .Register(*registry_)
                         .Add({})),
      batch_queries_(prometheus::BuildHistogram()
                         .Name("negmine_mine_batch_queries")
                         .Help("Queries per mining request.")
                         .Register(*registry_)
                         .Add({}, BatchBuckets())),
      targets_(prometheus::BuildGauge()
                   .Name("negmine_collection_targets")
                   .Help("Live targets per collection.")
                   .Register(*registry_)),
      version_(prometheus::BuildGauge()
                   .Name("negmine_index_version")
                   .Help("Index version per collection.")
                   .Register(*registry_)),
      memory_(prometheus::BuildGauge()
                  .Name("negmine_index_memory_bytes")
                  .Help("Host memory held by a collection's index, bytes.")
                  .Register(*registry_)),
      device_memory_(prometheus::BuildGauge()
                         .Name("negmine_index_device_memory_bytes")
                         .Help("GPU memory held by a collection's index (CUDA backend), bytes.")
                         .Register(*registry_)),
      gpu_used_(prometheus::BuildGauge()
                    .Name("negmine_gpu_memory_used_bytes")
                    .Help("Memory in use on a GPU (by any process), bytes.")
                    .Register(*registry_)),
      gpu_total_(prometheus::BuildGauge()
                     .Name("negmine_gpu_memory_total_bytes")
                     .Help("Memory of a GPU, bytes.")
                     .Register(*registry_)),
      tree_nodes_(prometheus::BuildGauge()
                      .Name("negmine_tree_nodes")
                      .Help("Reachable nodes of a collection's tree.")
                      .Register(*registry_)),
      tree_depth_(prometheus::BuildGauge()
                      .Name("negmine_tree_depth")
                      .Help("Depth of a collection's tree.")
                      .Register(*registry_)),
      tree_looseness_(prometheus::BuildGauge()
                          .Name("negmine_tree_looseness")
                          .Help("Max over nodes of stored radius / a fresh build's radius (1 = tight).")
                          .Register(*registry_)),
      tree_rebuilds_(prometheus::BuildCounter()
                         .Name("negmine_tree_rebuilds_total")
                         .Help("Background tree rebuilds installed.")
                         .Register(*registry_)),
      tree_subtree_rebuilds_(prometheus::BuildCounter()
                                 .Name("negmine_tree_subtree_rebuilds_total")
                                 .Help("Loose subtrees rebuilt alone, between full rebuilds.")
                                 .Register(*registry_)),
      tree_rebuild_seconds_(prometheus::BuildGauge()
                                .Name("negmine_tree_last_rebuild_seconds")
                                .Help("Duration of the last tree rebuild, seconds.")
                                .Register(*registry_)),
      tree_rebuild_pending_(prometheus::BuildGauge()
                                .Name("negmine_tree_rebuild_pending")
                                .Help("1 while a requested tree rebuild has not started.")
                                .Register(*registry_)),
      sampler_proposals_(prometheus::BuildCounter()
                             .Name("negmine_sampler_proposals_total")
                             .Help("Exact sampler: draws proposed.")
                             .Register(*registry_)),
      sampler_accepted_(prometheus::BuildCounter()
                            .Name("negmine_sampler_accepted_total")
                            .Help("Exact sampler: draws accepted (acceptance rate = "
                                  "accepted / proposals).")
                            .Register(*registry_)),
      drift_step_(prometheus::BuildGauge()
                      .Name("negmine_drift_step")
                      .Help("Model step of the last drift update, per collection.")
                      .Register(*registry_)),
      drift_residual_(prometheus::BuildGauge()
                          .Name("negmine_drift_residual")
                          .Help("Held-out relative residual of the last drift fit, "
                                "per collection.")
                          .Register(*registry_)),
      drift_rebases_(prometheus::BuildCounter()
                         .Name("negmine_drift_rebases_total")
                         .Help("Drift re-bases (new frame and landmarks), per "
                               "collection.")
                         .Register(*registry_)),
      wal_bytes_(prometheus::BuildGauge()
                     .Name("negmine_wal_bytes")
                     .Help("Size of the current write-ahead log generation, bytes.")
                     .Register(*registry_)
                     .Add({})),
      wal_writable_(prometheus::BuildGauge()
                        .Name("negmine_wal_writable")
                        .Help("1 while changes can be logged; 0 while the write-ahead log "
                              "refuses them (disk full: retried with backoff; failed "
                              "fsync: until a restart).")
                        .Register(*registry_)
                        .Add({})),
      wal_syncs_(prometheus::BuildCounter()
                     .Name("negmine_wal_syncs_total")
                     .Help("fdatasyncs of the write-ahead log.")
                     .Register(*registry_)
                     .Add({})),
      wal_sync_seconds_(prometheus::BuildCounter()
                            .Name("negmine_wal_sync_seconds_total")
                            .Help("Seconds spent in write-ahead log fdatasyncs.")
                            .Register(*registry_)
                            .Add({})),
      snapshots_(prometheus::BuildCounter()
                     .Name("negmine_snapshots_total")
                     .Help("Snapshots written.")
                     .Register(*registry_)
                     .Add({})),
      snapshot_bytes_(prometheus::BuildGauge()
                          .Name("negmine_snapshot_bytes")
                          .Help("Size of the last snapshot, bytes.")
                          .Register(*registry_)
                          .Add({})),
      snapshot_seconds_(prometheus::BuildGauge()
                            .Name("negmine_snapshot_seconds")
                            .Help("Duration of the last snapshot, seconds.")
                            .Register(*registry_)
                            .Add({})),
      commits_waiting_(prometheus::BuildGauge()
                           .Name("negmine_commits_waiting")
                           .Help("Changes waiting for the change before them to be applied "
                                 "(a drift update holds those behind it).")
                           .Register(*registry_)
                           .Add({})),
      recovery_phase_(prometheus::BuildGauge()
                          .Name("negmine_recovery_phase")
                          .Help("1 for the phase the start is in: starting, snapshot (loading "
                                "it), log (replaying the write-ahead log), done.")
                          .Register(*registry_)),
      recovery_progress_(prometheus::BuildGauge()
                             .Name("negmine_recovery_progress")
                             .Help("How far recovery is through its current phase (0..1; 1 "
                                   "when done).")
                             .Register(*registry_)
                             .Add({})) {
  const BuildInfo build = GetBuildInfo();
  prometheus::BuildGauge()
      .Name("negmine_build_info")
      .Help("1, labelled with the version, the git commit and the backends built.")
      .Register(*registry_)
      .Add({{"version", build.version}, {"commit", build.commit}, {"backends", build.backends}})
      .Set(1);
  SetRecovery(RecoveryPhase::kStarting, 0);
  collection_gauges_ = {&targets_,    &version_,       &memory_,      &device_memory_,
                        &tree_nodes_, &tree_depth_,    &tree_looseness_,
                        &tree_rebuild_seconds_, &tree_rebuild_pending_,
                        &drift_step_, &drift_residual_};
  collection_counters_ = {&tree_rebuilds_, &tree_subtree_rebuilds_, &sampler_proposals_,
                          &sampler_accepted_,
                          &drift_rebases_};
}

std::string Metrics::CollectionLabel(const std::string& collection) {
  if (collection.empty()) return collection;
  absl::MutexLock lock(&label_mu_);
  if (collection_labels_.contains(collection)) return collection;
  if (collection_labels_.size() >= kMaxCollectionLabels) return "other";
  collection_labels_.insert(collection);
  return collection;
}

void Metrics::ObserveRequest(const std::string& method, const std::string& code,
                             double seconds, const RequestLabels& l) {
  const prometheus::Labels labels = {{"method", method},
                                     {"code", code},
                                     {"collection", CollectionLabel(l.collection)},
                                     {"mode", l.mode}};
  requests_.Add(labels).Increment();
  latency_.Add(labels, LatencyBuckets()).Observe(seconds);
}

void Metrics::SetCommitsWaiting(int waiting) { commits_waiting_.Set(waiting); }

void Metrics::SetRecovery(RecoveryPhase phase, double progress) {
  static const std::pair<RecoveryPhase, const char*> kPhases[] = {
      {RecoveryPhase::kStarting, "starting"},
      {RecoveryPhase::kSnapshot, "snapshot"},
      {RecoveryPhase::kLog, "log"},
      {RecoveryPhase::kDone, "done"}};
  for (const auto& [p, name] : kPhases) {
    recovery_phase_.Add({{"phase", name}}).Set(p == phase ? 1 : 0);
  }
  recovery_progress_.Set(progress);
}

void Metrics::ObserveMine(size_t queries, size_t negatives) {
  batch_queries_.Observe(static_cast<double>(queries));
  negatives_.Increment(static_cast<double>(negatives));
}

void Metrics::ObserveFiltered(const FilterCounts& removed, size_t short_queries) {
  const std::pair<const char*, size_t> counts[] = {
      {"excluded", removed.excluded},
      {"positives", removed.positives},
      {"max_score", removed.max_score},
      {"min_score", removed.min_score},
      {"absolute_margin", removed.absolute_margin},
      {"relative_margin", removed.relative_margin},
      {"rank_offset", removed.rank_offset},
      {"dedupe", removed.dedupe}};
  for (const auto& [filter, n] : counts) {
    if (n > 0) filtered_.Add({{"filter", filter}}).Increment(static_cast<double>(n));
  }
  if (short_queries > 0) short_queries_.Increment(static_cast<double>(short_queries));
}

void Metrics::SetCollection(const std::string& collection, double targets,
                            double version) {
  targets_.Add({{"collection", collection}}).Set(targets);
  version_.Add({{"collection", collection}}).Set(version);
}

void Metrics::SetDrift(const std::string& collection, double step,
                       double residual, bool rebased) {
  drift_step_.Add({{"collection", collection}}).Set(step);
  drift_residual_.Add({{"collection", collection}}).Set(residual);
  prometheus::Counter& rebases = drift_rebases_.Add({{"collection", collection}});
  if (rebased) rebases.Increment();
}

void Metrics::CounterTo(CounterFamily& family, const std::string& collection, double value) {
  prometheus::Counter& c = family.Add({{"collection", collection}});
  if (value > c.Value()) c.Increment(value - c.Value());
}

void Metrics::SetIndex(const std::string& collection, const IndexStats& stats,
                       const std::optional<TreeSummary>& tree,
                       const DriftSummary& drift) {
  absl::MutexLock lock(&mu_);
  const prometheus::Labels labels = {{"collection", collection}};
  SetCollection(collection, static_cast<double>(stats.num_targets),
                static_cast<double>(stats.version));
  memory_.Add(labels).Set(static_cast<double>(stats.memory_bytes));
  device_memory_.Add(labels).Set(static_cast<double>(stats.device_memory_bytes));
  if (tree) {
    tree_nodes_.Add(labels).Set(static_cast<double>(tree->num_nodes));
    tree_depth_.Add(labels).Set(tree->depth);
    tree_looseness_.Add(labels).Set(tree->looseness);
    tree_rebuild_seconds_.Add(labels).Set(tree->last_rebuild_seconds);
    tree_rebuild_pending_.Add(labels).Set(tree->rebuild_pending ? 1 : 0);
    CounterTo(tree_rebuilds_, collection, static_cast<double>(tree->rebuilds));
    CounterTo(tree_subtree_rebuilds_, collection, static_cast<double>(tree->subtree_rebuilds));
    CounterTo(sampler_proposals_, collection, static_cast<double>(tree->sampler_proposals));
    CounterTo(sampler_accepted_, collection, static_cast<double>(tree->sampler_accepted));
  }
  if (drift.active) {
    drift_step_.Add(labels).Set(static_cast<double>(drift.step));
    drift_residual_.Add(labels).Set(drift.heldout_residual);
    CounterTo(drift_rebases_, collection, static_cast<double>(drift.rebases));
  }
}

void Metrics::SetWalWritable(bool writable) { wal_writable_.Set(writable ? 1 : 0); }

void Metrics::SetWal(double bytes, double syncs, double sync_seconds) {
  absl::MutexLock lock(&mu_);
  wal_bytes_.Set(bytes);
  if (syncs > wal_syncs_.Value()) wal_syncs_.Increment(syncs - wal_syncs_.Value());
  if (sync_seconds > wal_sync_seconds_.Value()) {
    wal_sync_seconds_.Increment(sync_seconds - wal_sync_seconds_.Value());
  }
}

void Metrics::ObserveSnapshot(double bytes, double seconds) {
  snapshots_.Increment();
  snapshot_bytes_.Set(bytes);
  snapshot_seconds_.Set(seconds);
}

void Metrics::RemoveCollection(const std::string& collection) {
  absl::MutexLock lock(&mu_);
  const prometheus::Labels labels = {{"collection", collection}};
  for (GaugeFamily* f : collection_gauges_) {
    if (f->Has(labels)) f->Remove(&f->Add(labels));
  }
  for (CounterFamily* f : collection_counters_) {
    if (f->Has(labels)) f->Remove(&f->Add(labels));
  }
}

void Metrics::SetGpuMemory(int device, double used, double total) {
  absl::MutexLock lock(&mu_);
  const prometheus::Labels labels = {{"device", std::to_string(device)}};
  gpu_used_.Add(labels).Set(used);
  gpu_total_.Add(labels).Set(total);
}

}  // namespace negmine::server
