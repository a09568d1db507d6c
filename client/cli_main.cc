// negmine: the command-line client. Run `negmine help` for the commands.
// This file parses the command line, connects and dispatches; the commands
// live in client/cli/ (commands.h lists them).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "client/cli/args.h"
#include "client/cli/commands.h"
#include "client/cli/help.h"
#include "client/negmine_client.h"

// The project version; CMake passes it (NEGMINE_VERSION = PROJECT_VERSION).
#ifndef NEGMINE_VERSION
#error "NEGMINE_VERSION is set by client/CMakeLists.txt"
#endif

namespace negmine::client::cli {
namespace {

constexpr char kVersion[] = NEGMINE_VERSION;

absl::Status Run(int argc, char** argv) {
  Args a;
  CLI_CHECK(a.Parse(argc, argv, 1));
  const std::string& cmd = a.command();
  if (a.Has("version")) {
    std::printf("negmine %s\n", kVersion);
    return absl::OkStatus();
  }
  if (cmd.empty() || cmd == "help" || a.Has("help")) {
    const std::string topic = cmd == "help" ? a.topic() : cmd;
    if (topic.empty()) {
      std::fputs(Usage().c_str(), stdout);
      return absl::OkStatus();
    }
    const std::string text = CommandUsage(topic);
    if (text.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown command '", topic, "'; run 'negmine help'"));
    }
    std::fputs(text.c_str(), stdout);
    return absl::OkStatus();
  }
  if (cmd == "create") {
    CLI_CHECK(a.Rename("landmarks", "num-landmarks", "the number of landmarks per set"));
  } else if (cmd == "landmarks") {
    CLI_CHECK(a.Rename("out", "ids-out", "it writes the landmark ids"));
  } else if (cmd == "drift") {
    CLI_CHECK(a.Rename("landmarks", "landmark-embeddings",
                       "it reads the landmarks' re-encoded embeddings"));
  }
  if (cmd == "generate") return Generate(a);
  const char* env = std::getenv("NEGMINE_SERVER");
  const std::string server = a.Get("server", env ? env : "127.0.0.1:50051");
  ClientOptions options;
  options.timeout = std::chrono::seconds(600);
  // TLS and the bearer token.
  for (auto [flag, field] : {std::pair{"tls-ca", &options.tls_root_certs},
                             std::pair{"tls-cert", &options.tls_cert_chain},
                             std::pair{"tls-key", &options.tls_private_key},
                             std::pair{"token-file", &options.auth_token}}) {
    if (!a.Has(flag)) continue;
    std::ifstream in(a.Get(flag), std::ios::binary);
    if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", a.Get(flag), ": cannot read it"));
    field->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  options.auth_token = std::string(absl::StripAsciiWhitespace(options.auth_token));
  if (!a.Has("token-file")) {
    if (const char* t = std::getenv("NEGMINE_TOKEN")) options.auth_token = t;
  }
  auto client = Client::Connect(server, options);
  if (cmd == "health") return Health(*client, a);
  if (cmd == "create") return Create(*client, a);
  if (cmd == "list") return List(*client, a);
  if (cmd == "drop") return Drop(*client, a);
  if (cmd == "upsert") return Upsert(*client, a);
  if (cmd == "delete") return Delete(*client, a);
  if (cmd == "mine") return Mine(*client, a);
  if (cmd == "info") return Info(*client, a);
  if (cmd == "landmarks") return Landmarks(*client, a);
  if (cmd == "drift") return Drift(*client, a);
  if (cmd == "batches") return Batches(*client, a);
  if (cmd == "snapshot") return Snapshot(*client, a);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown command '", cmd, "'; run 'negmine help'"));
}

}  // namespace
}  // namespace negmine::client::cli

int main(int argc, char** argv) {
  absl::Status s = negmine::client::cli::Run(argc, argv);
  if (!s.ok()) {
    std::fprintf(stderr, "negmine: %s: %s\n",
                 absl::StatusCodeToString(s.code()).c_str(),
                 std::string(s.message()).c_str());
    return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
