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

namespace negmine::server {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Parses "debug" | "info" | "warning" | "error"; false when unknown.
bool ParseLogLevel(std::string_view name, LogLevel* level);
void SetLogLevel(LogLevel level);

using LogField = std::pair<std::string_view, std::string>;
void Log(LogLevel level, std::string_view msg,
         std::initializer_list<LogField> fields = {});

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_LOG_H_
