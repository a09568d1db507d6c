#include "client/cli/progress.h"

#include <algorithm>
#include <cstdio>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"

namespace negmine::client::cli {

Progress::Progress(std::string what, uint64_t total, std::string unit)
    : on_(isatty(STDERR_FILENO) == 1),
      what_(std::move(what)),
      unit_(std::move(unit)),
      total_(total),
      start_(std::chrono::steady_clock::now()) {}

void Progress::Set(uint64_t done) {
  absl::MutexLock lock(&mu_);
  done_ = done;
  Draw(false);
}

void Progress::SetFraction(double f) {
  absl::MutexLock lock(&mu_);
  fraction_ = std::clamp(f, 0.0, 1.0);
  Draw(false);
}

void Progress::Tick() {
  absl::MutexLock lock(&mu_);
  Draw(false);
}

void Progress::Finish() {
  absl::MutexLock lock(&mu_);
  if (!on_ || finished_) return;
  finished_ = true;
  if (!drawn_) return;  // over before anything was shown
  Draw(true);
  std::fputc('\n', stderr);
}

void Progress::Draw(bool force) {
  if (!on_ || finished_ != force) return;
  const auto now = std::chrono::steady_clock::now();
  if (!force && drawn_ && now - last_ < std::chrono::milliseconds(100)) return;
  drawn_ = true;
  last_ = now;
  const double seconds = std::chrono::duration<double>(now - start_).count();
  std::string line = absl::StrCat("\r", what_);
  const double f = fraction_ >= 0 ? fraction_
                   : total_ > 0   ? static_cast<double>(done_) / total_
                                  : -1;
  if (f >= 0) {
    constexpr int kWidth = 30;
    const int full = static_cast<int>(f * kWidth);
    absl::StrAppend(&line, " [", std::string(full, '#'), std::string(kWidth - full, '.'),
                    "] ", absl::StrFormat("%3.0f%%", 100 * f));
    if (fraction_ < 0) absl::StrAppend(&line, " ", done_, "/", total_, " ", unit_);
  }
  absl::StrAppend(&line, absl::StrFormat(" %.1f s", seconds), "\033[K");
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
}

Ticker::Ticker(Progress& progress) : progress_(progress) {
  if (!progress_.on()) return;
  thread_ = std::thread([this] {
    absl::MutexLock lock(&mu_);
    while (!stop_) {
      progress_.Tick();
      mu_.AwaitWithTimeout(absl::Condition(&stop_), absl::Milliseconds(200));
    }
  });
}

Ticker::~Ticker() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
  progress_.Finish();
}

}  // namespace negmine::client::cli
