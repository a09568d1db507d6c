// Status helpers for negmine's core library.
//
// Debian's abseil (20220623) ships absl::Status and absl::StatusOr but no
// status_macros.h, so the two propagation macros live here, once.
//
//   absl::StatusOr<Foo> MakeFoo();
//   absl::Status UseFoo() {
//     ASSIGN_OR_RETURN(Foo foo, MakeFoo());
//     RETURN_IF_ERROR(foo.Check());
//     return absl::OkStatus();
//   }
//
// Choosing a code (they map one-to-one onto gRPC codes):
//   INVALID_ARGUMENT     the caller's input is malformed (shape, value, NaN).
//   NOT_FOUND            an unknown collection or id.
//   ALREADY_EXISTS       creating what exists.
//   FAILED_PRECONDITION  the system is not in a state to serve the call.
//   RESOURCE_EXHAUSTED   out of memory or over a configured limit.
//   UNIMPLEMENTED        a capability that is not built (yet).
//   INTERNAL             a bug or an invariant violation in negmine itself.
#ifndef NEGMINE_CORE_STATUS_H_
#define NEGMINE_CORE_STATUS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define NEGMINE_STATUS_CONCAT_INNER_(a, b) a##b
#define NEGMINE_STATUS_CONCAT_(a, b) NEGMINE_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing
// function when it is not OK.
#define RETURN_IF_ERROR(expr)                                 \
  do {                                                        \
    ::absl::Status negmine_status_ = (expr);                  \
    if (!negmine_status_.ok()) return negmine_status_;        \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status,
// otherwise moves the value into `lhs` (which may be a declaration).
#define ASSIGN_OR_RETURN(lhs, rexpr)                                        \
  NEGMINE_ASSIGN_OR_RETURN_IMPL_(                                           \
      NEGMINE_STATUS_CONCAT_(negmine_statusor_, __LINE__), lhs, rexpr)

#define NEGMINE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                   \
  if (!statusor.ok()) return std::move(statusor).status();   \
  lhs = std::move(statusor).value()

#endif  // NEGMINE_CORE_STATUS_H_
