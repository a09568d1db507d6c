#include "server/rpc.h"

#include "absl/strings/strip.h"

namespace negmine::server {

absl::Status NotReady() {
  return absl::UnavailableError(
      "the server is starting (recovering its data dir); retry shortly");
}

const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
      "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
      "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN";
}

absl::Status CheckBearerToken(const std::multimap<grpc::string_ref, grpc::string_ref>& md,
                              const std::string& want) {
  if (want.empty()) return absl::OkStatus();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        "this server requires a bearer token: send the metadata 'authorization: Bearer "
        "<token>'");
  }
  absl::string_view value(it->second.data(), it->second.size());
  bool ok = absl::ConsumePrefix(&value, "Bearer ") && value.size() == want.size();
  // Compared in constant time for tokens of the right length.
  unsigned char diff = 0;
  for (size_t i = 0; ok && i < want.size(); ++i) diff |= value[i] ^ want[i];
  if (!ok || diff != 0) return absl::UnauthenticatedError("invalid bearer token");
  return absl::OkStatus();
}

}  // namespace negmine::server
