// Structured logging for the server: one logfmt line per event on stderr,
//   ts=2026-11-22T11:00:00.123Z level=info msg="listening" address=127.0.0.1:50051
// Levels below the threshold set by SetLogLevel are dropped.
//
// Thread safety: Log may be called from any thread; lines never interleave.
#ifndef NEGMINE_SERVER_LOG_H_
#define NEGMINE_SERVER_LOG_H_

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/time/time.h"

namespace negmine::server {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Parses "debug" | "info" | "warning" | "error"; false when unknown.
bool ParseLogLevel(std::string_view name, LogLevel* level);
void SetLogLevel(LogLevel level);

using LogField = std::pair<std::string_view, std::string>;
void Log(LogLevel level, std::string_view msg,
         std::initializer_list<LogField> fields = {});
void Log(LogLevel level, std::string_view msg, const std::vector<LogField>& fields);

// Progress lines of a long operation (recovery, a bulk load, a drift
// update), at info level: `msg` with the fields passed and "percent", at
// the first Update (unless `first` is false), then at most once per
// `interval`, and at Done.
//
// Thread safety: one thread at a time.
class ProgressLog {
 public:
  // `first`: log at the first Update too (else only once `interval` has
  // passed since it).
  explicit ProgressLog(std::string msg, absl::Duration interval = absl::Seconds(2),
                       bool first = true)
      : msg_(std::move(msg)), interval_(interval), first_(first) {}
  // `fraction` done (0..1; negative: not known, no "percent").
  void Update(double fraction, std::vector<LogField> fields);
  // The last line: 100%, with "seconds" since the first Update.
  void Done(std::vector<LogField> fields);

 private:
  const std::string msg_;
  const absl::Duration interval_;
  const bool first_;
  absl::Time start_ = absl::InfinitePast();
  absl::Time last_ = absl::InfinitePast();
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_LOG_H_
