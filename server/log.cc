#include "server/log.h"

#include <atomic>
#include <cstdio>

#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace negmine::server {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
absl::Mutex g_mu;

const char* LevelName(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "info";
}

// Quotes a logfmt value when it holds spaces, quotes or '='.
std::string Quote(std::string_view v) {
  const bool plain = !v.empty() && v.find_first_of(" \"=\t\n") == v.npos;
  if (plain) return std::string(v);
  std::string out = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out + "\"";
}

}  // namespace

bool ParseLogLevel(std::string_view name, LogLevel* level) {
  for (LogLevel l : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarning,
                     LogLevel::kError}) {
    if (name == LevelName(l)) {
      *level = l;
      return true;
    }
  }
  return false;
}

void SetLogLevel(LogLevel level) { g_level.store(static_cast<int>(level)); }

void Log(LogLevel level, std::string_view msg,
         std::initializer_list<LogField> fields) {
  Log(level, msg, std::vector<LogField>(fields));
}

void Log(LogLevel level, std::string_view msg, const std::vector<LogField>& fields) {
  if (static_cast<int>(level) < g_level.load()) return;
  std::string line = "ts=" + absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(),
                                              absl::UTCTimeZone());
  line += " level=";
  line += LevelName(level);
  line += " msg=" + Quote(msg);
  for (const LogField& f : fields) {
    line += ' ';
    line += f.first;
    line += '=';
    line += Quote(f.second);
  }
  line += '\n';
  absl::MutexLock lock(&g_mu);
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
}

void ProgressLog::Update(double fraction, std::vector<LogField> fields) {
  const absl::Time now = absl::Now();
  if (start_ == absl::InfinitePast()) {
    start_ = now;
    if (!first_) last_ = now;
  }
  if (last_ != absl::InfinitePast() && now - last_ < interval_) return;
  last_ = now;
  if (fraction >= 0) fields.emplace_back("percent", absl::StrFormat("%.1f", 100 * fraction));
  Log(LogLevel::kInfo, msg_, fields);
}

void ProgressLog::Done(std::vector<LogField> fields) {
  const absl::Time now = absl::Now();
  if (start_ == absl::InfinitePast()) start_ = now;
  fields.emplace_back("percent", "100.0");
  fields.emplace_back("seconds", absl::StrFormat("%.3f", absl::ToDoubleSeconds(now - start_)));
  Log(LogLevel::kInfo, msg_, fields);
}

}  // namespace negmine::server
