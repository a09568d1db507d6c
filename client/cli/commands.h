// The CLI's commands, one function each, grouped by file:
//   collections.cc  create, list, drop, info, snapshot
//   targets.cc      upsert, delete, generate
//   mine.cc         mine
//   drift.cc        landmarks, drift
//   batches.cc      batches
//   health.cc       health
// Each reads its options from `a`, fails with INVALID_ARGUMENT naming the
// option on bad input (before any write reaches the server), prints its
// result on stdout and returns the call's status. cli_main.cc parses the
// command line, connects and dispatches.
#ifndef NEGMINE_CLIENT_CLI_COMMANDS_H_
#define NEGMINE_CLIENT_CLI_COMMANDS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/cli/args.h"
#include "client/negmine_client.h"

namespace negmine::client::cli {

absl::Status Create(Client& c, const Args& a);
absl::Status List(Client& c, const Args& a);
absl::Status Drop(Client& c, const Args& a);
absl::Status Info(Client& c, const Args& a);
absl::Status Snapshot(Client& c, const Args& a);

absl::Status Upsert(Client& c, const Args& a);
absl::Status Delete(Client& c, const Args& a);
// Needs no server.
absl::Status Generate(const Args& a);

absl::Status Mine(Client& c, const Args& a);

absl::Status Landmarks(Client& c, const Args& a);
absl::Status Drift(Client& c, const Args& a);

absl::Status Batches(Client& c, const Args& a);

absl::Status Health(Client& c, const Args& a);

// The dim of `collection` (one GetIndexInfo call).
absl::StatusOr<uint32_t> CollectionDim(Client& c, const std::string& collection);

}  // namespace negmine::client::cli

#endif  // NEGMINE_CLIENT_CLI_COMMANDS_H_
