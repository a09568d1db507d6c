"""Exceptions raised by the negmine client.

Every failed call raises a NegmineError (or a subclass named after its gRPC
code) that carries the gRPC status code and the server's message, which
names the offending field and value:

    try:
        client.mine(q, k=10, collection="nope")
    except negmine.NotFound as e:
        print(e.code, e.details)   # StatusCode.NOT_FOUND collection 'nope' not found
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import grpc

__all__ = [
    "NegmineError", "Cancelled", "Unknown", "InvalidArgument", "DeadlineExceeded",
    "NotFound", "AlreadyExists", "PermissionDenied", "ResourceExhausted",
    "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented", "Internal",
    "Unavailable", "DataLoss", "Unauthenticated", "error_from_rpc", "error_from_status",
    "error_from_item_status",
]


class NegmineError(Exception):
    """A failed negmine call.

    Attributes:
        code: the gRPC status code.
        details: the server's message (or gRPC's, for transport failures).
        retry_after_ms: the server's retry hint (trailing metadata
            ``retry-after-ms`` of RESOURCE_EXHAUSTED answers), else None.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, details: str,
                 retry_after_ms: Optional[int] = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_ms = retry_after_ms

    def __reduce__(self):  # picklable across processes (e.g. data loaders)
        return (type(self), (self.code, self.details, self.retry_after_ms))


class Cancelled(NegmineError):
    """CANCELLED: the call was cancelled (e.g. the client closed it)."""


class Unknown(NegmineError):
    """UNKNOWN: an error without a better code."""


class InvalidArgument(NegmineError, ValueError):
    """INVALID_ARGUMENT: a bad shape or value (wrong dim, NaN, k out of range...).

    Also raised, before any call, for arguments the client can check itself
    (a 1-D matrix, an unknown mode); it is a ValueError too.
    """


class DeadlineExceeded(NegmineError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class NotFound(NegmineError):
    """NOT_FOUND: an unknown collection, id or batch job."""


class AlreadyExists(NegmineError):
    """ALREADY_EXISTS: creating a collection that exists."""


class PermissionDenied(NegmineError):
    """PERMISSION_DENIED."""


class ResourceExhausted(NegmineError):
    """RESOURCE_EXHAUSTED: over a limit, out of memory, or overloaded (see retry_after_ms)."""


class FailedPrecondition(NegmineError):
    """FAILED_PRECONDITION: the index cannot serve the call yet (empty, old landmark set...)."""


class Aborted(NegmineError):
    """ABORTED."""


class OutOfRange(NegmineError):
    """OUT_OF_RANGE."""


class Unimplemented(NegmineError):
    """UNIMPLEMENTED: a capability this server does not have; the message names it."""


class Internal(NegmineError):
    """INTERNAL: e.g. the server's write-ahead log failed."""


class Unavailable(NegmineError):
    """UNAVAILABLE: the server is down or still starting (after the retries ran out)."""


class DataLoss(NegmineError):
    """DATA_LOSS."""


class Unauthenticated(NegmineError):
    """UNAUTHENTICATED: a bearer token is required and missing or wrong."""


_BY_CODE: Dict[grpc.StatusCode, Type[NegmineError]] = {
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNKNOWN: Unknown,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
for _code, _cls in _BY_CODE.items():
    _cls.code = _code

_BY_NUMBER: Dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def error_from_status(code: grpc.StatusCode, details: str,
                      retry_after_ms: Optional[int] = None) -> NegmineError:
    """The NegmineError subclass for `code`, carrying `details`."""
    return _BY_CODE.get(code, NegmineError)(code, details, retry_after_ms)


def error_from_item_status(code: int, message: str) -> NegmineError:
    """The error of a failed MineStream item (its ItemStatus code and message)."""
    return error_from_status(_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN), message)


def error_from_rpc(err: grpc.RpcError) -> NegmineError:
    """Converts a failed gRPC call into a NegmineError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    retry_after = None
    try:
        for key, value in err.trailing_metadata() or ():
            if key == "retry-after-ms":
                retry_after = int(value)
    except Exception:  # a transport error may have no metadata
        pass
    return error_from_status(code or grpc.StatusCode.UNKNOWN, details or "", retry_after)
