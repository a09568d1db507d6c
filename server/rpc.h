// The RPC helpers every handler and reactor of NegativeMinerService shares:
// the bearer-token check, the names of gRPC codes (metric labels), the one
// reader of streamed raw messages, and the small reactors.
//
// Thread safety: the free functions are pure; MessageReader is used by one
// reactor, one read at a time.
#ifndef NEGMINE_SERVER_RPC_H_
#define NEGMINE_SERVER_RPC_H_

#include <chrono>
#include <cstddef>
#include <map>
#include <string>

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace negmine::server {

using Clock = std::chrono::steady_clock;

inline double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The retry hint of RESOURCE_EXHAUSTED answers, also sent as the trailing
// metadata "retry-after-ms" on unary calls.
inline constexpr int kRetryAfterMs = 100;

// What every RPC answers before recovery has finished.
absl::Status NotReady();

// OK when `token` is empty or `metadata` carries "authorization: Bearer
// <token>"; else UNAUTHENTICATED saying what to send.
absl::Status CheckBearerToken(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                              const std::string& token);

// The name of a gRPC code, as used in metric labels ("OK", "NOT_FOUND").
const char* CodeName(grpc::StatusCode code);

// `message` as the bytes of a raw response.
template <typename Msg>
void SerializeTo(const Msg& message, grpc::ByteBuffer* out) {
  bool own = false;
  grpc::SerializationTraits<Msg>::Serialize(message, out, &own);
}

// The one reader of streamed messages: each arrives as raw bytes (the
// methods are registered raw, see service.h) and is parsed here, so that a
// message that does not parse fails its stream instead of ending it.
// A read with ok = false is then always the client closing its side.
//
// Use: StartRead(reader.buffer()); in OnReadDone(ok), reader.Parse(&msg).
template <typename Msg>
class MessageReader {
 public:
  explicit MessageReader(const char* method) : method_(method) {}

  grpc::ByteBuffer* buffer() { return &buffer_; }

  // Parses the message just read into *out (1-based index: count()).
  //   INVALID_ARGUMENT: the bytes are not a `Msg`; the message names it.
  absl::Status Parse(Msg* out) {
    ++count_;
    const size_t bytes = buffer_.Length();
    const grpc::Status s = grpc::SerializationTraits<Msg>::Deserialize(&buffer_, out);
    buffer_.Clear();
    if (!s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "message ", count_, " of the ", method_, " stream (", bytes,
          " bytes) does not parse as ", Msg::descriptor()->full_name(),
          "; the stream is refused from there"));
    }
    return absl::OkStatus();
  }

  // Messages read so far, the last one included.
  size_t count() const { return count_; }

 private:
  const char* const method_;
  grpc::ByteBuffer buffer_;
  size_t count_ = 0;
};

// A stream refused at its start (e.g. UNAUTHENTICATED).
template <typename Base>
class RejectingReactor final : public Base {
 public:
  explicit RejectingReactor(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

// One unary call's reactor, owning its parsed request and its response.
template <typename Req, typename Resp>
class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  Req request;
  Resp response;
  void OnDone() override { delete this; }
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_RPC_H_
