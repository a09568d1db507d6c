"""negmine.Client: the Python client of the negmine service.

    import negmine, numpy as np
    with negmine.Client("127.0.0.1:50051") as c:
        c.wait_ready()
        c.create_collection("docs", dim=64, exist_ok=True)
        c.upsert("docs", ids=np.arange(1000), vectors=np.random.rand(1000, 64))
        r = c.mine(np.random.rand(8, 64), k=10, collection="docs")
        print(r.ids, r.scores)

Thread safety: a Client may be shared by threads (gRPC channels are).

Waiting and retries, all in the channel's service config (no loop here):
- `waitForReady` plus client-side health checking: a call made while the
  server is unreachable, or up but not SERVING on grpc.health.v1 (while it
  recovers its data dir, or drains), waits until it serves, up to the call's
  deadline, instead of failing at once;
- a retry policy (RETRY_POLICY) retries UNAVAILABLE answers (what the
  server says while it is starting, and connections that break before an
  answer) with exponential backoff, up to 5 attempts (gRPC's cap).
Retried writes are idempotent (upserts overwrite, drift steps are checked),
except delete(allow_missing=False), whose retry after a lost answer can
report NOT_FOUND. wait_ready() waits for SERVING explicitly.

This file is one class with one method per RPC (and the request and
response conversions each needs), so it stays whole; what is shared lives
beside it: array conversion (_arrays), result types (types), errors,
prefetching and the drift helper.
"""
from __future__ import annotations

import json
import os
import struct
import time
import zlib
from typing import (Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple,
                    Union)

import grpc
import numpy as np
from google.protobuf import json_format

from negmine import _arrays
from negmine.errors import (DeadlineExceeded, InvalidArgument, NegmineError,
                            ResourceExhausted, error_from_item_status, error_from_rpc,
                            error_from_status)
from negmine.types import (BatchAssignment, CollectionInfo, DeleteResult, DriftResult,
                           FilterCounts, Landmarks, MineResult, ServerLimits,
                           SnapshotResult, TLSConfig, UpsertResult)
from negmine.v1 import negmine_pb2 as pb
from negmine.v1 import negmine_pb2_grpc as pb_grpc

__all__ = ["Client", "DEFAULT_COLLECTION"]

DEFAULT_COLLECTION = "default"
SERVICE_NAME = "negmine.v1.NegativeMiner"

# gRPC caps maxAttempts at 5. Backoff before attempt n is random(0,
# min(initial * multiplier^(n-1), max)): at most 0.25 + 0.625 + 1.6 + 3.9 s.
RETRY_POLICY: Dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.25s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2.5,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

# Requests up to this size stay buffered so that gRPC can retry them (its
# default, 256 KiB, would commit a batch of 512 queries of d = 128 at once,
# i.e. never retry it).
RETRY_BUFFER_BYTES = 64 << 20

# Upsert / AssignBatches chunks: at most this many bytes of vectors each
# (and at most half the server's message limit).
CHUNK_BYTES = 4 << 20

_METRICS = {"cosine": pb.METRIC_COSINE, "ip": pb.METRIC_INNER_PRODUCT,
            "inner_product": pb.METRIC_INNER_PRODUCT}
_INDEXES = {"tree": pb.INDEX_KIND_TREE, "exact": pb.INDEX_KIND_EXACT}
_BACKENDS = {"auto": pb.BACKEND_AUTO, "cpu": pb.BACKEND_CPU, "cuda": pb.BACKEND_CUDA}
_DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16,
           "bfloat16": pb.DTYPE_BFLOAT16}
_MODES = {"topk": pb.MINE_MODE_TOP_K, "top_k": pb.MINE_MODE_TOP_K,
          "sample": pb.MINE_MODE_SAMPLE, "mixed": pb.MINE_MODE_MIXED}
_SAMPLERS = {"proposal": pb.SAMPLER_PROPOSAL, "exact": pb.SAMPLER_EXACT}
_DISTRIBUTIONS = {"softmax": pb.SAMPLE_DISTRIBUTION_SOFTMAX,
                  "simans": pb.SAMPLE_DISTRIBUTION_SIMANS}
# MineFilters fields, each an optional float (None: the filter is off).
_FILTER_NAMES = ("min_score", "max_score", "absolute_margin", "relative_margin",
                 "dedupe_cosine")

# QueryNegatives / MineResponse fields this client maps by name; any other
# field (one the proto gains later) lands in MineResult.extra.
_KNOWN_RESULT_FIELDS = {"ids", "scores", "log_q", "num_top", "log_z_lo", "log_z_hi",
                        "num_eligible", "positive_scores", "removed", "shortfall"}
_HAS_NUM_ELIGIBLE = "num_eligible" in pb.QueryNegatives.DESCRIPTOR.fields_by_name
_KNOWN_RESPONSE_FIELDS = {"request_id", "index_version", "results", "status"}

_HEALTH_SERVING = 1
_HEALTH_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _choice(table: Dict[str, int], value: str, what: str) -> int:
    try:
        return table[value.lower()]
    except (KeyError, AttributeError):
        raise InvalidArgument(InvalidArgument.code,
                              f"{what} = {value!r}; expected one of {sorted(table)}") from None


def _name_of(table: Dict[str, int], number: int, default: str) -> str:
    for name, n in table.items():
        if n == number:
            return name
    return default


def _read_pem(value: Any) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    with open(os.fspath(value), "rb") as f:
        return f.read()


def _health_request(service: str) -> bytes:
    # grpc.health.v1.HealthCheckRequest {string service = 1;}, encoded by
    # hand: Debian ships no grpc_health package.
    raw = service.encode()
    if not raw:
        return b""
    out, n = bytearray(b"\x0a"), len(raw)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + raw


def _health_status(data: bytes) -> int:
    # HealthCheckResponse {ServingStatus status = 1;}: tag 0x08, a varint.
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        value, shift = 0, 0
        while i < len(data):
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if tag == 0x08:
            return value
        if tag & 7 != 0:  # not a varint field: nothing else is expected
            break
    return 0


def _chunk_seed(seed: int, chunk: int) -> int:
    """The seed of the chunk-th piece of a split call (chunk 0 keeps it)."""
    if seed == 0 or chunk == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(struct.pack("<Q", chunk))) % (1 << 64) or 1


def collection_info_from_proto(info: "pb.CollectionInfo",
                               limits: Optional[ServerLimits] = None,
                               detailed: bool = False) -> CollectionInfo:
    """A CollectionInfo dataclass from its message."""
    cfg = info.config

    def as_dict(msg: Any) -> Dict[str, Any]:
        return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                         including_default_value_fields=True)

    return CollectionInfo(
        name=cfg.name or DEFAULT_COLLECTION, dim=cfg.dim,
        metric="cosine" if cfg.metric == pb.METRIC_COSINE else "ip",
        index="exact" if cfg.index_kind == pb.INDEX_KIND_EXACT else "tree",
        backend=_name_of(_BACKENDS, cfg.backend, "auto"),
        active_backend=_name_of(_BACKENDS, info.active_backend, "cpu"),
        num_targets=info.num_targets, index_version=info.index_version,
        memory_bytes=info.memory_bytes, device_memory_bytes=info.device_memory_bytes,
        num_landmarks=cfg.drift.num_landmarks,
        tree=as_dict(info.tree) if detailed and cfg.index_kind != pb.INDEX_KIND_EXACT else None,
        drift=as_dict(info.drift) if detailed else None,
        limits=limits, raw=info)


def _mine_params(k: int, mode: str, temperature: Optional[float], num_hard: int,
                 with_replacement: bool, rank_offset: int, approximate: bool,
                 beam_width: int, sampler: str, seed: int, return_log_z: bool,
                 log_z_width: float, min_score: Optional[float] = None,
                 max_score: Optional[float] = None,
                 absolute_margin: Optional[float] = None,
                 relative_margin: Optional[float] = None,
                 dedupe_cosine: Optional[float] = None, distribution: str = "softmax",
                 simans_a: Optional[float] = None, simans_b: Optional[float] = None,
                 simans_candidates: int = 0) -> "pb.MineParams":
    mode_value = _choice(_MODES, mode, "mode")
    if mode_value != pb.MINE_MODE_TOP_K and temperature is None:
        raise InvalidArgument(InvalidArgument.code,
                              f"mode = {mode!r} needs a temperature")
    params = pb.MineParams(
        mode=mode_value, sampler=_choice(_SAMPLERS, sampler, "sampler"), k=int(k),
        temperature=float(temperature or 0.0), num_hard=int(num_hard),
        with_replacement=bool(with_replacement), rank_offset=int(rank_offset),
        approximate=bool(approximate), beam_width=int(beam_width), seed=int(seed),
        return_log_z=bool(return_log_z), log_z_width=float(log_z_width),
        distribution=_choice(_DISTRIBUTIONS, distribution, "distribution"))
    values = dict(min_score=min_score, max_score=max_score,
                  absolute_margin=absolute_margin, relative_margin=relative_margin,
                  dedupe_cosine=dedupe_cosine)
    for name in _FILTER_NAMES:
        if values[name] is not None:  # presence is the switch: set only what was given
            setattr(params.filters, name, float(values[name]))
    if simans_a is not None:
        params.simans.a = float(simans_a)
    if simans_b is not None:
        params.simans.b = float(simans_b)
    params.simans.candidates = int(simans_candidates)
    return params


MINE_OPTION_NAMES = ("mode", "temperature", "num_hard", "with_replacement",
                     "rank_offset", "approximate", "beam_width", "sampler", "seed",
                     "return_log_z", "log_z_width") + _FILTER_NAMES + (
                         "distribution", "simans_a", "simans_b", "simans_candidates")
MINE_DEFAULTS: Dict[str, Any] = dict(mode="topk", temperature=None, num_hard=0,
                                     with_replacement=False, rank_offset=0,
                                     approximate=False, beam_width=0, sampler="proposal",
                                     seed=0, return_log_z=False, log_z_width=0.0,
                                     min_score=None, max_score=None, absolute_margin=None,
                                     relative_margin=None, dedupe_cosine=None,
                                     distribution="softmax", simans_a=None, simans_b=None,
                                     simans_candidates=0)


def build_mine_request(queries: Any, k: int, collection: str = DEFAULT_COLLECTION,
                       exclude: Any = None, min_index_version: int = 0,
                       request_id: str = "", positives: Any = None,
                       **options: Any) -> "pb.MineRequest":
    """A MineRequest for one batch of queries (no splitting). `options` are
    Client.mine's keyword options (mode, temperature, filters, ...);
    `positives` takes the forms `exclude` takes."""
    unknown = set(options) - set(MINE_OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown mine options: {sorted(unknown)}")
    params = _mine_params(int(k), **{**MINE_DEFAULTS, **options})
    host, dtype = _arrays.as_host_matrix(queries, "queries")
    req = pb.MineRequest(collection=collection, request_id=request_id,
                         queries=_arrays.matrix(host, dtype), params=params,
                         min_index_version=int(min_index_version))
    lists = _arrays.exclude_lists(exclude, host.shape[0])
    if lists is not None:
        for ex in lists:
            req.exclude.add(ids=ex)
    pos_lists = _arrays.exclude_lists(positives, host.shape[0], "positives")
    if pos_lists is not None:
        for pos in pos_lists:
            req.positives.add(ids=pos)
    return req


def _response_extra(resp: "pb.MineResponse", results: Sequence[Any]) -> Dict[str, Any]:
    extra: Dict[str, Any] = {}
    for f in pb.QueryNegatives.DESCRIPTOR.fields:
        if f.name in _KNOWN_RESULT_FIELDS:
            continue
        values = [getattr(r, f.name) for r in results]
        if f.label == f.LABEL_REPEATED:
            extra[f.name] = [np.asarray(list(v)) if f.message_type is None else list(v)
                             for v in values]
        elif f.message_type is None:
            extra[f.name] = np.asarray(values)
        else:
            extra[f.name] = values
    for f in pb.MineResponse.DESCRIPTOR.fields:
        if f.name not in _KNOWN_RESPONSE_FIELDS:
            extra[f.name] = getattr(resp, f.name)
    return extra


def parse_mine_responses(responses: Sequence["pb.MineResponse"], k: int,
                         return_log_z: bool, like: Any = None) -> MineResult:
    """One MineResult from the responses of a (possibly split) batch, in
    order. `like`: the queries; a torch tensor makes the result torch
    tensors on its device."""
    results = [r for resp in responses for r in resp.results]
    q = len(results)
    width = max([k] + [len(r.ids) for r in results])
    ids = np.full((q, width), -1, dtype=np.int64)
    scores = np.full((q, width), np.nan, dtype=np.float32)
    log_q = np.full((q, width), np.nan, dtype=np.float32)
    num_top = np.zeros(q, dtype=np.int64)
    counts = np.zeros(q, dtype=np.int64)
    log_z_lo = np.full(q, np.nan) if return_log_z else None
    log_z_hi = np.full(q, np.nan) if return_log_z else None
    for i, r in enumerate(results):
        n = len(r.ids)
        counts[i] = n
        num_top[i] = r.num_top
        if n:
            ids[i, :n] = np.fromiter(r.ids, dtype=np.uint64, count=n).view(np.int64)
            scores[i, :n] = np.fromiter(r.scores, dtype=np.float32, count=n)
            if n > r.num_top:
                lq = np.fromiter(r.log_q, dtype=np.float32, count=len(r.log_q))
                log_q[i, r.num_top:n] = lq[r.num_top:n]
        if return_log_z:
            log_z_lo[i] = r.log_z_lo
            log_z_hi[i] = r.log_z_hi
    num_eligible = None
    if _HAS_NUM_ELIGIBLE:
        num_eligible = np.fromiter((r.num_eligible for r in results), dtype=np.int64, count=q)
    num_pos = max([0] + [len(r.positive_scores) for r in results])
    positive_scores = np.full((q, num_pos), np.nan, dtype=np.float32)
    for i, r in enumerate(results):
        if len(r.positive_scores):
            positive_scores[i, :len(r.positive_scores)] = np.fromiter(
                r.positive_scores, dtype=np.float32, count=len(r.positive_scores))
    removed = FilterCounts(**{
        name: np.fromiter((getattr(r.removed, name) for r in results), dtype=np.int64, count=q)
        for name in FilterCounts.NAMES})
    extra: Dict[str, Any] = {}
    if responses:
        extra = _response_extra(responses[-1], results)
    out = MineResult(ids=ids, scores=scores, log_q=log_q, num_top=num_top, counts=counts,
                     index_version=min(r.index_version for r in responses) if responses else 0,
                     log_z_lo=log_z_lo, log_z_hi=log_z_hi, num_eligible=num_eligible,
                     positive_scores=positive_scores, removed=removed,
                     shortfall=[r.shortfall for r in results], extra=extra)
    if like is not None and _arrays.is_torch(like):
        out = to_torch(out, like.device)
    return out


def to_torch(r: MineResult, device: Any) -> MineResult:
    """The result's arrays as torch tensors on `device`."""
    torch = _arrays.torch_module()

    def t(a: Any) -> Any:
        if a is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    extra = {key: t(v) if isinstance(v, np.ndarray) and v.dtype.kind in "fiub" else v
             for key, v in r.extra.items()}
    return MineResult(ids=t(r.ids), scores=t(r.scores), log_q=t(r.log_q),
                      num_top=t(r.num_top), counts=t(r.counts),
                      index_version=r.index_version, log_z_lo=t(r.log_z_lo),
                      log_z_hi=t(r.log_z_hi), num_eligible=t(r.num_eligible),
                      positive_scores=t(r.positive_scores),
                      removed=None if r.removed is None else FilterCounts(
                          **{name: t(getattr(r.removed, name)) for name in FilterCounts.NAMES}),
                      shortfall=r.shortfall, extra=extra)


class Client:
    """A connection to a negmine server.

    Args:
        address: "host:port" of the server.
        token: the bearer token of a server run with --auth_token_file; sent
            as "authorization: Bearer <token>" on every call.
        tls: a TLSConfig (or True for the system's roots) to connect over
            TLS; None for a plaintext channel.
        timeout: the default deadline of each call, in seconds (None: no
            deadline). Every method takes its own `timeout` too.
        wait_for_ready: calls wait until the server is reachable and its
            health is SERVING, up to their deadline (True, the default),
            instead of failing at once.
        retry: retry UNAVAILABLE answers with backoff (the channel's retry
            policy, RETRY_POLICY).
        options: more gRPC channel options, as (key, value) pairs.
    """

    def __init__(self, address: str, token: Optional[str] = None,
                 tls: Union[TLSConfig, bool, None] = None,
                 timeout: Optional[float] = 60.0, *, wait_for_ready: bool = True,
                 retry: bool = True,
                 options: Optional[Sequence[Tuple[str, Any]]] = None) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ())
        method_config: Dict[str, Any] = {"name": [{"service": SERVICE_NAME}]}
        if wait_for_ready:
            method_config["waitForReady"] = True
        if retry:
            method_config["retryPolicy"] = RETRY_POLICY
        service_config: Dict[str, Any] = {"methodConfig": [method_config]}
        if wait_for_ready:
            # Client-side health checking: the channel is READY only while
            # the server's grpc.health.v1 says SERVING (NOT_SERVING while it
            # recovers or drains), so waiting calls start once it serves.
            # gRPC supports it under round_robin (one address here).
            service_config["loadBalancingConfig"] = [{"round_robin": {}}]
            service_config["healthCheckConfig"] = {"serviceName": ""}
        channel_options: List[Tuple[str, Any]] = [
            ("grpc.service_config", json.dumps(service_config)),
            ("grpc.enable_retries", 1 if retry else 0),
            ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
            # The server caps its own messages (--max_message_bytes); the
            # client accepts whatever it sends.
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            # Reconnect quickly to a server that is (re)starting.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls:
            cfg = tls if isinstance(tls, TLSConfig) else TLSConfig()
            if cfg.server_name:
                channel_options.append(("grpc.ssl_target_name_override", cfg.server_name))
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(cfg.root_certificates),
                private_key=_read_pem(cfg.private_key),
                certificate_chain=_read_pem(cfg.certificate_chain))
            channel_options += list(options or ())
            self._channel = grpc.secure_channel(address, creds, options=channel_options)
        else:
            channel_options += list(options or ())
            self._channel = grpc.insecure_channel(address, options=channel_options)
        self._stub = pb_grpc.NegativeMinerStub(self._channel)
        self._health_check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
            response_deserializer=_health_status)
        self._health_watch = self._channel.unary_stream(
            "/grpc.health.v1.Health/Watch", request_serializer=lambda b: b,
            response_deserializer=_health_status)
        self._limits: Optional[ServerLimits] = None

    # ------------------------------------------------------------ plumbing

    @property
    def stub(self) -> pb_grpc.NegativeMinerStub:
        """The generated gRPC stub, for calls this class does not wrap."""
        return self._stub

    @property
    def metadata(self) -> Tuple[Tuple[str, str], ...]:
        """The metadata sent with every call (the bearer token)."""
        return self._metadata

    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self.timeout if timeout is None else timeout

    def _call(self, method: Callable[..., Any], request: Any,
              timeout: Optional[float] = None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def close(self) -> None:
        """Closes the channel; in-flight calls are cancelled."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"negmine.Client({self.address!r})"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Blocks until the server's grpc.health.v1 status is SERVING (it
        reports NOT_SERVING while it recovers its data dir), waiting for the
        server to become reachable too.

        Raises:
            DeadlineExceeded: not SERVING within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        last = "not reachable"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(
                    DeadlineExceeded.code,
                    f"the server at {self.address} did not report SERVING within "
                    f"{timeout:g} s (last: {last})")
            try:
                for status in self._health_watch(_health_request(""), timeout=remaining,
                                                 wait_for_ready=True,
                                                 metadata=self._metadata):
                    if status == _HEALTH_SERVING:
                        return
                    last = _HEALTH_NAMES.get(status, str(status))
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    # A health service without Watch: ask once per 50 ms.
                    try:
                        status = self._health_check(_health_request(""), timeout=remaining,
                                                    wait_for_ready=True,
                                                    metadata=self._metadata)
                        if status == _HEALTH_SERVING:
                            return
                        last = _HEALTH_NAMES.get(status, str(status))
                    except grpc.RpcError as e2:
                        if e2.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                            last = f"{e2.code().name}: {e2.details()}"
                elif code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    last = f"{code.name}: {e.details()}"
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def limits(self, collection: str = DEFAULT_COLLECTION) -> ServerLimits:
        """The server's limits (cached after the first call; read through
        GetIndexInfo of `collection`, which must exist)."""
        if self._limits is None:
            resp = self._call(self._stub.GetIndexInfo,
                              pb.GetIndexInfoRequest(collection=collection))
            self._limits = ServerLimits(
                max_message_bytes=resp.limits.max_message_bytes or (64 << 20),
                max_batch=resp.limits.max_batch or 65536, max_k=resp.limits.max_k or 4096)
        return self._limits

    # --------------------------------------------------------- collections

    def create_collection(self, name: str, dim: int, metric: str = "ip",
                          index: str = "tree", backend: str = "auto",
                          leaf_size: Optional[int] = None, branching: Optional[int] = None,
                          num_landmarks: Optional[int] = None, exist_ok: bool = False,
                          *, device_dtype: Optional[str] = None,
                          rebase_residual: Optional[float] = None,
                          rebase_every_steps: Optional[int] = None,
                          landmark_seed: Optional[int] = None,
                          timeout: Optional[float] = None) -> CollectionInfo:
        """Creates a collection.

        Args:
            name: [A-Za-z0-9_.-]{1,128}.
            dim: components per vector.
            metric: "ip" (inner product, the default everywhere: what the
                wire's METRIC_UNSPECIFIED means) or "cosine".
            index: "tree" (the dynamic ball tree) or "exact" (brute force).
            backend: "auto", "cpu" or "cuda".
            leaf_size, branching: tree parameters (None: the server's default).
            num_landmarks: landmarks per drift set (None: 4 x dim, >= 64).
            exist_ok: when the collection exists with the same dim and
                metric, return its info instead of raising AlreadyExists.
            device_dtype: "float32", "float16" or "bfloat16" storage on a GPU.
            rebase_residual, rebase_every_steps, landmark_seed: DriftParams.

        Raises:
            AlreadyExists: it exists (and not exist_ok, or with another dim
                or metric).
            InvalidArgument: a bad name, dim or parameter.
        """
        config = pb.CollectionConfig(
            name=name, dim=int(dim), metric=_choice(_METRICS, metric, "metric"),
            backend=_choice(_BACKENDS, backend, "backend"),
            index_kind=_choice(_INDEXES, index, "index"),
            tree=pb.TreeParams(leaf_size=int(leaf_size or 0), branching=int(branching or 0)),
            drift=pb.DriftParams(num_landmarks=int(num_landmarks or 0),
                                 rebase_residual=float(rebase_residual or 0.0),
                                 rebase_every_steps=int(rebase_every_steps or 0),
                                 seed=int(landmark_seed or 0)))
        if device_dtype is not None:
            config.device_dtype = _choice(_DTYPES, device_dtype, "device_dtype")
        try:
            resp = self._call(self._stub.CreateCollection,
                              pb.CreateCollectionRequest(config=config), timeout)
        except NegmineError as e:
            if not (exist_ok and e.code == grpc.StatusCode.ALREADY_EXISTS):
                raise
            info = self.info(name, timeout=timeout)
            if info.dim != int(dim) or info.metric != _name_of(
                    {"cosine": pb.METRIC_COSINE, "ip": pb.METRIC_INNER_PRODUCT},
                    config.metric, "ip"):
                raise error_from_status(
                    e.code, f"{e.details}; it has dim = {info.dim}, metric = {info.metric}, "
                    f"not dim = {dim}, metric = {metric}") from None
            return info
        return collection_info_from_proto(resp.info)

    def list_collections(self, timeout: Optional[float] = None) -> List[CollectionInfo]:
        """Every collection with its size and version."""
        resp = self._call(self._stub.ListCollections, pb.ListCollectionsRequest(), timeout)
        return [collection_info_from_proto(c) for c in resp.collections]

    def drop_collection(self, name: str, timeout: Optional[float] = None) -> None:
        """Removes a collection. Raises NotFound when there is none."""
        self._call(self._stub.DropCollection, pb.DropCollectionRequest(collection=name),
                   timeout)

    def info(self, collection: str = DEFAULT_COLLECTION,
             timeout: Optional[float] = None) -> CollectionInfo:
        """The collection's configuration, size, version, tree shape and
        drift state, and the server's limits (GetIndexInfo; O(N) on the
        server)."""
        resp = self._call(self._stub.GetIndexInfo,
                          pb.GetIndexInfoRequest(collection=collection), timeout)
        limits = ServerLimits(max_message_bytes=resp.limits.max_message_bytes,
                              max_batch=resp.limits.max_batch, max_k=resp.limits.max_k)
        if self._limits is None and limits.max_message_bytes:
            self._limits = limits
        return collection_info_from_proto(resp.info, limits, detailed=True)

    def snapshot(self, collection: str = "", timeout: Optional[float] = None) -> SnapshotResult:
        """Asks the server for a snapshot now."""
        resp = self._call(self._stub.CreateSnapshot,
                          pb.CreateSnapshotRequest(collection=collection), timeout)
        return SnapshotResult(path=resp.path, bytes=resp.bytes,
                              index_version=resp.index_version)

    # -------------------------------------------------------------- targets

    def _rows_per_chunk(self, collection: str, row_bytes: int,
                        chunk_rows: Optional[int]) -> int:
        if chunk_rows is not None:
            if chunk_rows < 1:
                raise InvalidArgument(InvalidArgument.code,
                                      f"chunk_rows = {chunk_rows}; must be >= 1")
            return int(chunk_rows)
        limit = self.limits(collection).max_message_bytes
        budget = min(CHUNK_BYTES, max(1, limit // 2))
        return max(1, budget // max(1, row_bytes))

    def upsert(self, collection: str, ids: Any, vectors: Any, model_step: int = 0,
               chunk_rows: Optional[int] = None,
               timeout: Optional[float] = None) -> UpsertResult:
        """Inserts or overwrites targets.

        Args:
            collection: the collection's name.
            ids: [n] non-negative integer ids (numpy, torch or a sequence); no
                duplicates.
            vectors: [n, dim] numpy array or torch tensor on any device;
                float32, float16 and bfloat16 travel as they are, other dtypes
                as float32. A device tensor is copied to the host one chunk at
                a time.
            model_step: the trainer step that encoded these vectors (drift
                correction serves them as sent, then adds only later drift).
            chunk_rows: rows per stream message (None: what fits in 4 MiB and
                half the server's message limit).

        Each chunk is applied whole when it arrives; a failed chunk fails the
        call (earlier chunks stay applied).

        Returns:
            UpsertResult(upserted, index_version).
        """
        id_array = _arrays.as_ids(ids)
        rows, cols, elem = _arrays.num_rows_cols(vectors, "vectors")
        if rows != len(id_array):
            raise InvalidArgument(InvalidArgument.code,
                                  f"{len(id_array)} ids for {rows} vectors")
        if rows == 0:
            return UpsertResult(0, self.info(collection, timeout=timeout).index_version)
        step = self._rows_per_chunk(collection, cols * elem + 10, chunk_rows)

        def requests() -> Iterator["pb.UpsertTargetsRequest"]:
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                yield pb.UpsertTargetsRequest(
                    collection=collection, ids=id_array[start:stop].tolist(),
                    vectors=_arrays.to_matrix(vectors[start:stop], "vectors"),
                    model_step=int(model_step))

        resp = self._call(self._stub.UpsertTargets, requests(), timeout)
        return UpsertResult(upserted=resp.upserted, index_version=resp.index_version)

    def delete(self, collection: str, ids: Any, allow_missing: bool = False,
               timeout: Optional[float] = None) -> DeleteResult:
        """Deletes targets, all or nothing.

        Raises:
            NotFound: an unknown id (unless allow_missing); nothing deleted.
        """
        req = pb.DeleteTargetsRequest(collection=collection,
                                      ids=_arrays.as_ids(ids).tolist(),
                                      allow_missing=bool(allow_missing))
        resp = self._call(self._stub.DeleteTargets, req, timeout)
        return DeleteResult(deleted=resp.deleted, index_version=resp.index_version)

    def get(self, collection: str, ids: Any, scored: bool = False,
            timeout: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The stored vectors of `ids` (bit-exact, float32 [n, dim]) and the
        model steps they were encoded at (int64 [n]); with `scored`, the
        vectors the index scores with (drift-corrected, unit length for
        cosine).

        Raises:
            NotFound: an unknown id.
        """
        req = pb.GetTargetsRequest(collection=collection, ids=_arrays.as_ids(ids).tolist(),
                                   scored=bool(scored))
        resp = self._call(self._stub.GetTargets, req, timeout)
        return (_arrays.from_matrix(resp.vectors).copy(),
                np.asarray(resp.model_steps, dtype=np.int64))

    # --------------------------------------------------------------- mining

    def _split_rows(self, collection: str, rows: int, cols: int, elem: int, k: int,
                    exclude: Optional[List[Sequence[int]]],
                    positives: Optional[List[Sequence[int]]] = None) -> List[Tuple[int, int]]:
        """Row ranges whose requests and answers fit the server's limits."""
        limits = self.limits(collection)
        budget = int(limits.max_message_bytes * 0.8)
        # ids (<= 10 B), score, log q, framing; the filter counts and shortfall.
        answer_row = 24 * max(1, k) + 160
        ranges, start, req_bytes, resp_bytes = [], 0, 0, 0
        for i in range(rows):
            row_req = cols * elem + (11 * len(exclude[i]) + 4 if exclude else 0)
            if positives:
                row_req += 11 * len(positives[i]) + 4
                answer_row_i = answer_row + 5 * len(positives[i])
            else:
                answer_row_i = answer_row
            if i > start and (i - start >= limits.max_batch or req_bytes + row_req > budget
                              or resp_bytes + answer_row_i > budget):
                ranges.append((start, i))
                start, req_bytes, resp_bytes = i, 0, 0
            req_bytes += row_req
            resp_bytes += answer_row_i
        ranges.append((start, rows))
        return ranges

    def mine(self, queries: Any, k: int, *, collection: str = DEFAULT_COLLECTION,
             mode: str = "topk", temperature: Optional[float] = None, num_hard: int = 0,
             exclude: Any = None, positives: Any = None, with_replacement: bool = False,
             rank_offset: int = 0, approximate: bool = False, beam_width: int = 0,
             sampler: str = "proposal", seed: int = 0, return_log_z: bool = False,
             log_z_width: float = 0.0, min_score: Optional[float] = None,
             max_score: Optional[float] = None, absolute_margin: Optional[float] = None,
             relative_margin: Optional[float] = None,
             dedupe_cosine: Optional[float] = None, distribution: str = "softmax",
             simans_a: Optional[float] = None, simans_b: Optional[float] = None,
             simans_candidates: int = 0, min_index_version: int = 0,
             timeout: Optional[float] = None) -> MineResult:
        """Mines k negatives per query.

        Args:
            queries: [Q, dim] numpy array or torch tensor (any device),
                float32 / float16 / bfloat16, sent in that dtype.
            k: results per query.
            collection: the collection to mine from.
            mode: "topk" (the k best), "sample" (k draws from
                softmax(s / temperature), with log q) or "mixed" (the top
                num_hard, then samples from the rest).
            temperature: tau > 0; required for "sample" and "mixed".
            num_hard: "mixed": how many of the k are top-k results.
            exclude: ids never returned for, nor counted in the softmax of,
                each query: one iterable of ids per query, or a [Q, m]
                integer array whose negative entries are padding (a [Q]
                array: one id per query, e.g. its positive).
            positives: each query's positives, in the forms `exclude` takes.
                Always excluded; their scores come back (positive_scores);
                the margins and SimANS use each query's lowest positive
                score s_pos. An id not in the collection raises NotFound.
            with_replacement: sampling: may a target repeat.
            rank_offset: skip the rank_offset best eligible targets (likely
                false negatives) in every mode.
            approximate, beam_width: approximate top-k on a tree (leaves
                scored per query; 0 = the server's default).
            sampler: "proposal" (cheap, exact log q) or "exact".
            seed: sampling seed (0: fresh randomness); query i uses the
                stream (seed, i).
            return_log_z, log_z_width: a certified log Z interval per query.
            min_score, max_score: drop targets scoring below / above.
            absolute_margin: >= 0; drop s > s_pos - absolute_margin (needs
                positives).
            relative_margin: >= 0; drop s > s_pos - |s_pos| * relative_margin
                (needs positives).
            dedupe_cosine: in (0, 1]; drop a candidate whose cosine to a
                positive or to a negative already taken is >= dedupe_cosine.
                A filter left at None is off. Removed targets are not
                eligible in any mode (top-k skips them, sampling and log Z
                are over the rest).
            distribution: "sample" and "mixed": "softmax" (softmax(s /
                temperature)) or "simans" (weights exp(-a (s - s_pos - b)^2)
                over the simans_candidates best eligible targets; needs
                positives).
            simans_a, simans_b: SimANS's a (>= 0; None: the server's 0.5) and
                b (None: 0).
            simans_candidates: SimANS's pool K >= k (0: max(k, 100)).
            min_index_version: fail with FailedPrecondition unless the index
                has reached this version (read your writes).
            timeout: this call's deadline in seconds.

        A batch larger than the server's max_batch or message limit is sent
        as several calls (pieces after the first get derived seeds).

        Returns:
            MineResult: ids [Q, k] (-1 padding), scores, log_q (nan for top-k
            entries and padding), num_top, counts, log_z_lo / log_z_hi,
            positive_scores, removed (FilterCounts), shortfall,
            index_version, as numpy arrays, or torch tensors on the queries'
            device when `queries` is a torch tensor.
        """
        options = dict(mode=mode, temperature=temperature, num_hard=num_hard,
                       with_replacement=with_replacement, rank_offset=rank_offset,
                       approximate=approximate, beam_width=beam_width, sampler=sampler,
                       seed=seed, return_log_z=return_log_z, log_z_width=log_z_width,
                       min_score=min_score, max_score=max_score,
                       absolute_margin=absolute_margin, relative_margin=relative_margin,
                       dedupe_cosine=dedupe_cosine, distribution=distribution,
                       simans_a=simans_a, simans_b=simans_b,
                       simans_candidates=simans_candidates)
        rows, cols, elem = _arrays.num_rows_cols(queries, "queries")
        lists = _arrays.exclude_lists(exclude, rows)
        pos_lists = _arrays.exclude_lists(positives, rows, "positives")
        ranges = self._split_rows(collection, rows, cols, elem, int(k), lists, pos_lists)
        responses = []
        for c, (start, stop) in enumerate(ranges):
            opts = dict(options, seed=_chunk_seed(int(seed), c))
            req = build_mine_request(
                queries[start:stop] if len(ranges) > 1 else queries, k, collection,
                exclude=None if lists is None else lists[start:stop],
                positives=None if pos_lists is None else pos_lists[start:stop],
                min_index_version=min_index_version, **opts)
            responses.append(self._call(self._stub.Mine, req, timeout))
        return parse_mine_responses(responses, int(k), bool(return_log_z), like=queries)

    # ---------------------------------------------------------------- drift

    def landmarks(self, collection: str = DEFAULT_COLLECTION,
                  timeout: Optional[float] = None) -> Landmarks:
        """The landmark ids to re-encode with the current model, and the
        set's epoch (echo it in apply_drift)."""
        resp = self._call(self._stub.GetLandmarks,
                          pb.GetLandmarksRequest(collection=collection), timeout)
        return Landmarks(ids=np.asarray(resp.ids, dtype=np.uint64).view(np.int64),
                         epoch=resp.landmark_epoch, index_version=resp.index_version)

    @staticmethod
    def _drift_result(resp: "pb.ApplyDriftResponse") -> DriftResult:
        return DriftResult(heldout_residual=resp.heldout_residual,
                           stale_residual=resp.stale_residual, kernel=resp.kernel,
                           lambda_=getattr(resp, "lambda"), rebased=resp.rebased,
                           landmark_epoch=resp.landmark_epoch,
                           index_version=resp.index_version, fit_seconds=resp.fit_seconds,
                           apply_seconds=resp.apply_seconds)

    def apply_drift(self, step: int, embeddings: Any, epoch: int,
                    collection: str = DEFAULT_COLLECTION,
                    timeout: Optional[float] = None) -> DriftResult:
        """Applies a drift update: `embeddings` [m, dim] are the landmarks of
        set `epoch` re-encoded by the model at `step`, in landmarks() order.

        Raises:
            FailedPrecondition: an old landmark set (call landmarks() again)
                or a step below the last update's.
        """
        req = pb.ApplyDriftRequest(collection=collection, model_step=int(step),
                                   landmark_epoch=int(epoch),
                                   landmark_embeddings=_arrays.to_matrix(embeddings,
                                                                         "embeddings"))
        return self._drift_result(self._call(self._stub.ApplyDrift, req, timeout))

    def apply_linear_map(self, step: int, a: Any, b: Any = None,
                         collection: str = DEFAULT_COLLECTION,
                         timeout: Optional[float] = None) -> DriftResult:
        """Applies new = a @ old + b exactly to every target (a [dim, dim],
        b [dim] or None); starts a new landmark set."""
        lin = pb.LinearMap(a=_arrays.to_matrix(a, "a"))
        if b is not None:
            if _arrays.is_torch(b):
                b = b.reshape(1, -1)
            else:
                b = np.asarray(b).reshape(1, -1)
            lin.b.CopyFrom(_arrays.to_matrix(b, "b"))
        req = pb.ApplyDriftRequest(collection=collection, model_step=int(step),
                                   linear_map=lin)
        return self._drift_result(self._call(self._stub.ApplyDrift, req, timeout))

    # -------------------------------------------------------------- batches

    def assign_batches(self, queries: Any, positives: Any, batch_size: int, *,
                       neighbors: int = 0, quantile: float = 0.0, beam_width: int = 0,
                       seed: int = 0, keep_batch_order: bool = False,
                       run_async: Optional[bool] = None, poll_seconds: float = 0.2,
                       progress: Optional[Callable[[float], None]] = None,
                       chunk_rows: Optional[int] = None,
                       timeout: Optional[float] = None) -> BatchAssignment:
        """Global contrastive batch sampling: orders the N training examples
        ((query, positive) embedding pairs, compared by cosine) so that each
        batch holds hard negatives of each other.

        Args:
            queries, positives: [N, dim] each (numpy or torch).
            batch_size: examples per batch.
            neighbors, quantile, beam_width: the kNN graph (0: defaults).
            seed: shuffling seed (0: 1). keep_batch_order: do not shuffle
                the batches.
            run_async: run as a server-side job and poll it (True), in one
                call (False), or (None) in one call unless the server
                refuses it for its size (max_sync_batch_examples).
            poll_seconds, progress: job polling interval, and a callback
                given the fraction done.
            timeout: the deadline of the whole assignment.

        Returns:
            BatchAssignment: batches (int64 example rows) and statistics.
        """
        rows, cols, elem = _arrays.num_rows_cols(queries, "queries")
        prow, pcols, pelem = _arrays.num_rows_cols(positives, "positives")
        if (prow, pcols) != (rows, cols):
            raise InvalidArgument(InvalidArgument.code,
                                  f"positives are {prow} x {pcols}; queries {rows} x {cols}")
        if rows == 0:
            raise InvalidArgument(InvalidArgument.code, "assign_batches got no examples")
        if chunk_rows is not None:
            step = self._rows_per_chunk(DEFAULT_COLLECTION, 1, chunk_rows)
        else:
            budget = CHUNK_BYTES
            if self._limits is not None:
                budget = min(budget, max(1, self._limits.max_message_bytes // 2))
            step = max(1, budget // max(1, cols * (elem + pelem)))
        params = pb.BatchParams(neighbors=int(neighbors), quantile=float(quantile),
                                beam_width=int(beam_width),
                                keep_batch_order=bool(keep_batch_order))
        deadline = None if self._timeout(timeout) is None else \
            time.monotonic() + self._timeout(timeout)

        def remaining() -> Optional[float]:
            return None if deadline is None else max(0.001, deadline - time.monotonic())

        def requests(as_job: bool) -> Iterator["pb.AssignBatchesRequest"]:
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                req = pb.AssignBatchesRequest(
                    queries=_arrays.to_matrix(queries[start:stop], "queries"),
                    positives=_arrays.to_matrix(positives[start:stop], "positives"))
                if start == 0:
                    req.batch_size = int(batch_size)
                    req.seed = int(seed)
                    req.params.CopyFrom(params)
                    setattr(req, "async", as_job)  # a Python keyword
                yield req

        resp = None
        if not run_async:
            try:
                resp = self._call(self._stub.AssignBatches, requests(False), remaining())
            except ResourceExhausted as e:
                if run_async is False or "max_sync_batch_examples" not in e.details:
                    raise
        if resp is None:
            job = self._call(self._stub.AssignBatches, requests(True), remaining())
            resp = self._wait_job(job.job_id, poll_seconds, progress, remaining)
        return BatchAssignment(
            batches=[np.asarray(b.example_indices, dtype=np.int64) for b in resp.batches],
            bandwidth_before=resp.bandwidth_before, bandwidth_after=resp.bandwidth_after,
            in_batch_similarity_before=resp.in_batch_similarity_before,
            in_batch_similarity_after=resp.in_batch_similarity_after,
            num_examples=resp.num_examples, edges=resp.edges, components=resp.components,
            seconds=resp.seconds, job_id=resp.job_id)

    def _wait_job(self, job_id: str, poll_seconds: float,
                  progress: Optional[Callable[[float], None]],
                  remaining: Callable[[], Optional[float]]) -> "pb.AssignBatchesResponse":
        # The protocol is a poll: GetBatchJob until the job is done.
        while True:
            left = remaining()
            if left is not None and left <= 0.001:
                raise DeadlineExceeded(DeadlineExceeded.code,
                                       f"batch job {job_id} did not finish in time")
            state = self._call(self._stub.GetBatchJob, pb.GetBatchJobRequest(job_id=job_id),
                               left)
            if progress is not None:
                progress(state.progress)
            if state.state == pb.JOB_STATE_DONE:
                result = pb.AssignBatchesResponse()
                result.CopyFrom(state.result)
                result.job_id = job_id
                return result
            if state.state == pb.JOB_STATE_FAILED:
                raise error_from_item_status(state.error.code, state.error.message)
            time.sleep(poll_seconds if left is None else min(poll_seconds, left))

