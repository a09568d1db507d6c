// The CLI's option parser and the two macros every command uses.
//
//   Args a;
//   CLI_CHECK(a.Parse(argc, argv, 1));      // negmine [options] COMMAND [options]
//   CLI_ASSIGN(k, a.Number<uint32_t>("k", 10));
//   CLI_CHECK(a.CheckAllUsed());            // an option no command read is a typo
//
// Options are `--key value` or `--key=value`; the names in kSwitches take no
// value. The first bare word is the command; `help` takes one more (the topic).
// Not thread-safe: one Args per invocation, read from one thread.
#ifndef NEGMINE_CLIENT_CLI_ARGS_H_
#define NEGMINE_CLIENT_CLI_ARGS_H_

#include <map>
#include <set>
#include <string>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

// `auto lhs = expr.value()`, returning expr's status from the enclosing
// function when it is not ok.
#define CLI_ASSIGN(lhs, expr)                 \
  auto lhs##_or = (expr);                     \
  if (!lhs##_or.ok()) return lhs##_or.status(); \
  auto lhs = std::move(lhs##_or).value()

// Returns the status of expr from the enclosing function when it is not ok.
#define CLI_CHECK(expr)                    \
  do {                                     \
    absl::Status cli_s_ = (expr);          \
    if (!cli_s_.ok()) return cli_s_;       \
  } while (0)

namespace negmine::client::cli {

// Parsed `--key value` / `--key=value` options and bare switches.
class Args {
 public:
  static constexpr const char* kSwitches[] = {"json", "with-replacement", "approximate", "log-z",
                                              "allow-missing", "help", "simulate",
                                              "keep-batch-order", "async", "sync",
                                              "version"};

  // Parses argv[start..argc): INVALID_ARGUMENT on a second bare word (other
  // than help's topic) and on an option that needs a value and has none.
  absl::Status Parse(int argc, char** argv, int start);

  const std::string& command() const { return command_; }
  // An option's old name still works, with a note on stderr.
  // INVALID_ARGUMENT when both names are given.
  absl::Status Rename(const std::string& old_name, const std::string& new_name,
                      const std::string& why);
  const std::string& topic() const { return topic_; }
  // Has, Get, Required and Number mark the option as read (CheckAllUsed).
  bool Has(const std::string& k) const {
    used_.insert(k);
    return values_.count(k) > 0;
  }
  std::string Get(const std::string& k, const std::string& def = "") const {
    used_.insert(k);
    auto it = values_.find(k);
    return it == values_.end() ? def : it->second;
  }
  absl::StatusOr<std::string> Required(const std::string& k) const {
    if (!Has(k)) return absl::InvalidArgumentError(absl::StrCat("--", k, " is required"));
    return Get(k);
  }
  // The option as a number, `def` when it is absent; INVALID_ARGUMENT naming
  // the option when it does not parse as a T.
  template <typename T>
  absl::StatusOr<T> Number(const std::string& k, T def) const {
    if (!Has(k)) return def;
    T v;
    bool ok;
    if constexpr (std::is_same_v<T, double>) {
      ok = absl::SimpleAtod(Get(k), &v);
    } else if constexpr (std::is_floating_point_v<T>) {
      ok = absl::SimpleAtof(Get(k), &v);
    } else {
      ok = absl::SimpleAtoi(Get(k), &v);
    }
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", k, " = '", Get(k), "' is not a valid number"));
    }
    return v;
  }
  // Options given but never read by the command: almost always a typo.
  absl::Status CheckAllUsed() const;

 private:
  std::string command_;
  std::string topic_;  // `help TOPIC`
  std::map<std::string, std::string> values_;
  mutable std::set<std::string> used_;
};

}  // namespace negmine::client::cli

#endif  // NEGMINE_CLIENT_CLI_ARGS_H_
