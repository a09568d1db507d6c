#include "client/cli/args.h"

#include <cstdio>

namespace negmine::client::cli {

absl::Status Args::Parse(int argc, char** argv, int start) {
  for (int i = start; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) {
      if (command_.empty()) {
        command_ = a;
        continue;
      }
      if (command_ == "help" && topic_.empty()) {
        topic_ = a;
        continue;
      }
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", a, "'"));
    }
    a = a.substr(2);
    const size_t eq = a.find('=');
    if (eq != std::string::npos) {
      values_[a.substr(0, eq)] = a.substr(eq + 1);
      continue;
    }
    bool is_switch = false;
    for (const char* s : kSwitches) is_switch |= a == s;
    if (is_switch) {
      values_[a] = "true";
    } else if (i + 1 < argc) {
      values_[a] = argv[++i];
    } else {
      return absl::InvalidArgumentError(absl::StrCat("--", a, " needs a value"));
    }
  }
  return absl::OkStatus();
}

absl::Status Args::Rename(const std::string& old_name, const std::string& new_name,
                          const std::string& why) {
  auto it = values_.find(old_name);
  if (it == values_.end()) return absl::OkStatus();
  if (values_.count(new_name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", old_name, " is the old name of --", new_name, "; give one of them"));
  }
  std::fprintf(stderr, "negmine: %s --%s is deprecated: use --%s (%s)\n", command_.c_str(),
               old_name.c_str(), new_name.c_str(), why.c_str());
  values_[new_name] = it->second;
  values_.erase(it);
  return absl::OkStatus();
}

absl::Status Args::CheckAllUsed() const {
  for (auto& [k, v] : values_) {
    if (!used_.count(k)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown option --", k, " for '", command_, "'"));
    }
  }
  return absl::OkStatus();
}

}  // namespace negmine::client::cli
