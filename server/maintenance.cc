#include "server/maintenance.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/cuda/device.h"
#include "server/log.h"
#include "server/rpc.h"

namespace negmine::server {

void PublishIndexMetrics(const CollectionRegistry& registry, Metrics& metrics) {
  bool any_gpu = false;
  for (const std::shared_ptr<Collection>& c : registry.List()) {
    metrics.SetIndex(c->name, c->index->Stats(), c->index->TreeInfo(), c->index->DriftInfo());
    any_gpu = any_gpu || c->index->active_backend() == Backend::kCuda;
  }
  // The GPU's own figures once a collection lives there (asking earlier
  // would create a CUDA context, ~0.5 GB of device memory, for nothing).
  for (int d = 0; any_gpu && d < CudaDeviceCount(); ++d) {
    size_t used = 0, total = 0;
    if (CudaMemoryInfo(d, &used, &total)) metrics.SetGpuMemory(d, used, total);
  }
}

MaintenanceThread::MaintenanceThread(const Options& options, const CollectionRegistry* registry,
                                     CommitPath* commits, Metrics* metrics)
    : options_(options), registry_(registry), commits_(commits), metrics_(metrics) {
  thread_ = std::thread([this] { Loop(); });
}

MaintenanceThread::~MaintenanceThread() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void MaintenanceThread::Loop() {
  using std::chrono::seconds;
  auto last_stats = Clock::now(), last_snapshot = Clock::now();
  auto snapshot_retry_at = Clock::now();
  seconds snapshot_backoff(0);
  auto every = [](double s) { return absl::ToChronoSeconds(absl::Seconds(s)); };
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Seconds(1))) return;
    }
    const auto now = Clock::now();
    if (options_.stats_interval_seconds > 0 &&
        now - last_stats >= every(options_.stats_interval_seconds)) {
      PublishIndexMetrics(*registry_, *metrics_);
      last_stats = now;
    }
    const uint64_t wal_bytes = commits_->PublishWalMetrics();
    const bool interval_due = options_.snapshot_interval_seconds > 0 && wal_bytes > 0 &&
                              now - last_snapshot >= every(options_.snapshot_interval_seconds);
    const bool size_due =
        options_.snapshot_wal_bytes > 0 && wal_bytes >= options_.snapshot_wal_bytes;
    if ((interval_due || size_due) && now >= snapshot_retry_at) {
      absl::StatusOr<CommitPath::SnapshotInfo> info = commits_->TakeSnapshot();
      if (info.ok()) {
        Log(LogLevel::kInfo, "periodic snapshot",
            {{"path", info->path}, {"bytes", absl::StrCat(info->bytes)}});
        snapshot_backoff = seconds(0);
      } else {
        // A failed attempt (a full disk) may have started a new, empty log
        // generation: retry with backoff (10 s doubling to 10 min), not at
        // every tick of the size trigger.
        snapshot_backoff = std::clamp(2 * snapshot_backoff, seconds(10), seconds(600));
        snapshot_retry_at = now + snapshot_backoff;
        Log(LogLevel::kError, "periodic snapshot failed",
            {{"error", info.status().ToString()},
             {"retry_in_seconds", absl::StrCat(snapshot_backoff.count())}});
      }
      last_snapshot = now;
    }
  }
}

}  // namespace negmine::server
