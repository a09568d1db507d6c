// BatchJobs: runs GCBS batch assignments (core/batches/gcbs.h) off the RPC
// and worker threads, one thread per job, so that a long assignment never
// holds up mining. At most `max_running` jobs run at once; finished jobs are
// kept (the newest `max_kept`) for GetBatchJob.
//
// Thread safety: every method may be called from any thread.
#ifndef NEGMINE_SERVER_BATCH_JOBS_H_
#define NEGMINE_SERVER_BATCH_JOBS_H_

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/batches/gcbs.h"
#include "negmine/v1/negmine.pb.h"

namespace negmine::server {

class BatchJobs {
 public:
  struct Job {
    std::string id;
    size_t num_examples = 0;
    std::atomic<double> progress{0};
    std::atomic<bool> cancel{false};  // set to stop the work
    std::atomic<bool> exited{false};  // its thread has nothing left to do
    absl::Mutex mu;
    bool done ABSL_GUARDED_BY(mu) = false;
    absl::Status status ABSL_GUARDED_BY(mu);
    v1::AssignBatchesResponse result ABSL_GUARDED_BY(mu);
  };

  BatchJobs(int max_running, size_t max_kept, int threads_per_job);
  // Cancels the running jobs and waits for them.
  ~BatchJobs();

  // Starts a job over `queries` and `positives` (n x dim each). `on_done`
  // (may be empty) runs on the job's thread when it ends, after the result
  // is stored.
  //   RESOURCE_EXHAUSTED: max_running jobs are running.
  absl::StatusOr<std::shared_ptr<Job>> Start(std::vector<float> queries,
                                             std::vector<float> positives, int dim,
                                             BatchOptions options,
                                             std::function<void(Job&)> on_done);

  // The job `id`, or null.
  std::shared_ptr<Job> Find(const std::string& id) const;

 private:
  const int max_running_;
  const size_t max_kept_;
  const int threads_per_job_;
  mutable absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> order_ ABSL_GUARDED_BY(mu_);  // oldest first
  // Job threads, joined once exited (at the next Start) or at destruction.
  std::vector<std::pair<std::shared_ptr<Job>, std::thread>> threads_ ABSL_GUARDED_BY(mu_);
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_BATCH_JOBS_H_
