#include "server/batch_jobs.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "server/wire.h"

namespace negmine::server {

BatchJobs::BatchJobs(int max_running, size_t max_kept, int threads_per_job)
    : max_running_(max_running), max_kept_(max_kept), threads_per_job_(threads_per_job) {}

BatchJobs::~BatchJobs() {
  std::vector<std::pair<std::shared_ptr<Job>, std::thread>> threads;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, job] : jobs_) job->cancel = true;
    threads.swap(threads_);
  }
  for (auto& [job, thread] : threads) thread.join();
}

absl::StatusOr<std::shared_ptr<BatchJobs::Job>> BatchJobs::Start(
    std::vector<float> queries, std::vector<float> positives, int dim,
    BatchOptions options, std::function<void(Job&)> on_done) {
  auto job = std::make_shared<Job>();
  job->num_examples = queries.size() / dim;
  absl::MutexLock lock(&mu_);
  if (running_ >= max_running_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        running_, " batch assignments are running, the server's limit; retry when one "
        "has finished"));
  }
  for (auto it = threads_.begin(); it != threads_.end();) {
    if (it->first->exited) {
      it->second.join();
      it = threads_.erase(it);
    } else {
      ++it;
    }
  }
  ++running_;
  job->id = absl::StrCat("batches-", next_id_++);
  jobs_[job->id] = job;
  order_.push_back(job->id);
  // Drop the oldest finished jobs beyond max_kept.
  for (auto it = order_.begin(); jobs_.size() > max_kept_ && it != order_.end();) {
    std::shared_ptr<Job>& old = jobs_[*it];
    bool done;
    {
      absl::MutexLock job_lock(&old->mu);
      done = old->done;
    }
    if (done) {
      jobs_.erase(*it);
      it = order_.erase(it);
    } else {
      ++it;
    }
  }
  options.threads = threads_per_job_;
  Job* raw = job.get();
  options.progress = [raw](double f) {
    raw->progress = f;
    return !raw->cancel.load();
  };
  threads_.emplace_back(job, std::thread([this, job, queries = std::move(queries),
                         positives = std::move(positives), dim, options,
                         on_done = std::move(on_done)]() {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<BatchAssignment> a = AssignBatches(queries, positives, dim, options);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    {
      absl::MutexLock job_lock(&job->mu);
      job->done = true;
      if (a.ok()) {
        ToWireBatches(*a, job->num_examples, seconds, &job->result);
      } else {
        job->status = a.status();
      }
    }
    if (on_done) on_done(*job);
    {
      absl::MutexLock lock(&mu_);
      --running_;
    }
    job->exited = true;
  }));
  return job;
}

std::shared_ptr<BatchJobs::Job> BatchJobs::Find(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : it->second;
}

}  // namespace negmine::server
