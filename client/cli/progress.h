// Progress lines on stderr for the CLI's long operations.
//
//   Progress progress("upsert 'c'", rows, "targets sent");
//   Ticker ticker(progress);                 // optional: time moves on by itself
//   ... progress.Set(sent) ...
//
// Thread-safe: Set, SetFraction, Tick and Finish may be called from any
// thread (a client callback, a Ticker).
#ifndef NEGMINE_CLIENT_CLI_PROGRESS_H_
#define NEGMINE_CLIENT_CLI_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace negmine::client::cli {

// A progress line on stderr when stderr is a terminal, nothing otherwise
// (piped or redirected output stays clean). Redrawn at most every 100 ms.
// With a total: a bar, the percentage and the counts; without one
// (total 0): the elapsed time only, for a call that reports no progress.
class Progress {
 public:
  Progress(std::string what, uint64_t total, std::string unit);
  ~Progress() { Finish(); }

  bool on() const { return on_; }
  void Set(uint64_t done);
  // A fraction in [0, 1] (a job's own progress) in place of the counts.
  void SetFraction(double f);
  void Tick();
  // The last state, then a newline: later output starts on its own line.
  void Finish();

 private:
  void Draw(bool force) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const bool on_;
  const std::string what_, unit_;
  const uint64_t total_;
  const std::chrono::steady_clock::time_point start_;
  absl::Mutex mu_;
  uint64_t done_ ABSL_GUARDED_BY(mu_) = 0;
  double fraction_ ABSL_GUARDED_BY(mu_) = -1;
  bool drawn_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::chrono::steady_clock::time_point last_ ABSL_GUARDED_BY(mu_);
};

// Redraws `progress` (its elapsed time) from a thread while a call that
// reports no progress of its own runs; stops when destroyed, then finishes
// the line. `progress` must outlive it.
class Ticker {
 public:
  explicit Ticker(Progress& progress);
  ~Ticker();

 private:
  Progress& progress_;
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace negmine::client::cli

#endif  // NEGMINE_CLIENT_CLI_PROGRESS_H_
