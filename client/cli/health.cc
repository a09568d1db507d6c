// health: grpc.health.v1 Check, or a wait for SERVING.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/synchronization/mutex.h"
#include "client/cli/commands.h"

namespace negmine::client::cli {

// grpc.health.v1.Health/Check through a generic stub: the request is the
// empty HealthCheckRequest (service ""), and SERVING is the response bytes
// 08 01 (field 1, varint 1).
absl::Status Health(Client& c, const Args& a) {
  CLI_ASSIGN(timeout, a.Number<double>("timeout-seconds", 5));
  CLI_ASSIGN(wait, a.Number<double>("wait", 0));
  CLI_CHECK(a.CheckAllUsed());
  if (wait < 0) return absl::InvalidArgumentError("--wait SECONDS must be >= 0");
  if (wait > 0) {
    CLI_CHECK(c.WaitForServing(std::chrono::milliseconds(static_cast<int64_t>(wait * 1000))));
    std::printf("SERVING\n");
    return absl::OkStatus();
  }
  grpc::GenericStub stub(c.channel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000)));
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1), response;
  absl::Mutex mu;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                 &response, [&](grpc::Status s) {
                   absl::MutexLock lock(&mu);
                   status = std::move(s);
                   done = true;
                 });
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(&done));
  }
  if (!status.ok()) return FromGrpc(status, "health");
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::InternalError("health: unreadable response");
  std::string bytes;
  for (const grpc::Slice& sl : slices) bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  if (bytes != std::string("\x08\x01", 2)) {
    return absl::UnavailableError("health: the server is not SERVING (starting or draining)");
  }
  std::printf("SERVING\n");
  return absl::OkStatus();
}

}  // namespace negmine::client::cli
