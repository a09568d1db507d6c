"""Typed results of the negmine client's calls."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = [
    "TLSConfig", "ServerLimits", "CollectionInfo", "UpsertResult", "DeleteResult",
    "FilterCounts", "MineResult", "Landmarks", "DriftResult", "BatchAssignment", "SnapshotResult",
]


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings of a Client.

    Each field is PEM bytes, or a str path to a PEM file.

    Attributes:
        root_certificates: the CA that signed the server's certificate
            (None: the system's roots).
        private_key, certificate_chain: the client's key and certificate,
            for servers that require them (mTLS, --tls_client_ca).
        server_name: the name to check the server's certificate against
            when it differs from the address's host.
    """

    root_certificates: Optional[Any] = None
    private_key: Optional[Any] = None
    certificate_chain: Optional[Any] = None
    server_name: Optional[str] = None


@dataclass(frozen=True)
class ServerLimits:
    """Limits the server enforces (GetIndexInfo's limits)."""

    max_message_bytes: int
    max_batch: int
    max_k: int


@dataclass
class CollectionInfo:
    """A collection's configuration and state.

    Attributes:
        name, dim: as created.
        metric: "cosine" or "ip".
        index: "tree" or "exact".
        backend: as configured ("auto", "cpu", "cuda"); active_backend: the
            one actually serving.
        num_targets: live targets. index_version: increases with every write.
        memory_bytes, device_memory_bytes: host / GPU memory of the index.
        num_landmarks: the configured landmarks per set (0: the default).
        tree, drift: the tree's shape and the drift state as dicts
            (Client.info only; None from list_collections).
        limits: the server's limits (Client.info only).
        raw: the CollectionInfo message itself.
    """

    name: str
    dim: int
    metric: str
    index: str
    backend: str
    active_backend: str
    num_targets: int
    index_version: int
    memory_bytes: int
    device_memory_bytes: int
    num_landmarks: int
    tree: Optional[Dict[str, Any]] = None
    drift: Optional[Dict[str, Any]] = None
    limits: Optional[ServerLimits] = None
    raw: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class UpsertResult:
    """An acknowledged upsert: rows applied, and the version after the last."""

    upserted: int
    index_version: int


@dataclass(frozen=True)
class DeleteResult:
    """An acknowledged delete."""

    deleted: int
    index_version: int


@dataclass
class FilterCounts:
    """Per query, why targets were not eligible (the server's FilterCounts).

    Each field is a [Q] int64 array. With MineResult.num_eligible they add
    up to the live targets: excluded + positives + max_score + min_score +
    absolute_margin + relative_margin + num_eligible; a target two filters
    remove counts once, under the first of that order. rank_offset and
    dedupe count eligible targets the rank window skipped and the dedupe
    dropped.

    Attributes:
        excluded: in the exclude list (and not a positive).
        positives: the query's positives.
        max_score, min_score, absolute_margin, relative_margin: removed by
            that filter.
        rank_offset: eligible targets skipped by rank_offset.
        dedupe: candidates dropped by dedupe_cosine.
    """

    NAMES = ("excluded", "positives", "max_score", "min_score", "absolute_margin",
             "relative_margin", "rank_offset", "dedupe")

    excluded: Any
    positives: Any
    max_score: Any
    min_score: Any
    absolute_margin: Any
    relative_margin: Any
    rank_offset: Any
    dedupe: Any

    def row(self, i: int) -> Dict[str, int]:
        """Query i's counts as a dict of ints."""
        return {name: int(getattr(self, name)[i]) for name in self.NAMES}


@dataclass
class MineResult:
    """Negatives for a batch of Q queries, k per query.

    Arrays are numpy, or torch tensors on the queries' device when the
    queries were a torch tensor.

    Attributes:
        ids: [Q, k] int64; -1 where a query got fewer than k results.
        scores: [Q, k] float32 s(q, y); nan where padded.
        log_q: [Q, k] float32 log q of each sampled result (the correction
            is logit - log q); nan for top-k results and padding.
        num_top: [Q] int64, how many leading results of each row are top-k.
        counts: [Q] int64, results actually returned per query.
        log_z_lo, log_z_hi: [Q] float64 bounds on log Z (return_log_z), else None.
        index_version: the index version the results came from.
        num_eligible: [Q] int64, the live targets each query could get
            (not excluded, not a positive, inside the filters' score window;
            before rank_offset and the dedupe): a query has fewer than k
            results only when num_eligible - rank_offset - removed.dedupe <
            k. None when the server's proto has no such field.
        positive_scores: [Q, P] float32, each query's positives' scores in
            the order given (P the most positives of any query; nan pads
            shorter rows; P = 0 without positives).
        removed: FilterCounts, per query, of the targets that were not
            eligible and why.
        shortfall: Q strings; set (non-empty) where a query got fewer than
            k results, saying why.
        extra: per-query fields of the server's response that this client
            does not know by name (added to the proto later), by field
            name: a [Q] array for a scalar field, a list of Q arrays for a
            repeated one. Also readable as attributes (result.<name>).
    """

    ids: Any
    scores: Any
    log_q: Any
    num_top: Any
    counts: Any
    index_version: int
    log_z_lo: Any = None
    log_z_hi: Any = None
    num_eligible: Any = None
    positive_scores: Any = None
    removed: Optional[FilterCounts] = None
    shortfall: Optional[List[str]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the fields the proto gained.
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"MineResult has no field {name!r}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Landmarks:
    """The current landmark set of a collection.

    Attributes:
        ids: [m] int64, the targets to re-encode with the current model.
        epoch: names the set; pass it to Client.apply_drift.
        index_version: the index version when read.
    """

    ids: np.ndarray
    epoch: int
    index_version: int


@dataclass(frozen=True)
class DriftResult:
    """An applied drift update.

    Attributes:
        heldout_residual: relative fit error over the landmarks, each held
            out in turn (0 for a linear map).
        stale_residual: the same error with no correction.
        kernel, lambda_: the chosen model ("none": no correction) and its ridge.
        rebased: a re-base followed; the landmark set changed.
        landmark_epoch: the set for the next update.
        index_version: the version that serves the update.
        fit_seconds, apply_seconds: the server's time to fit and to apply.
    """

    heldout_residual: float
    stale_residual: float
    kernel: str
    lambda_: float
    rebased: bool
    landmark_epoch: int
    index_version: int
    fit_seconds: float
    apply_seconds: float


@dataclass
class BatchAssignment:
    """A global contrastive batch sampling (GCBS) assignment.

    Attributes:
        batches: one int64 array of example indices (rows of the queries
            given) per batch; every example exactly once; all batches have
            batch_size examples except possibly one.
        bandwidth_before, bandwidth_after: bandwidth of the kNN graph under
            the given order and the new one.
        in_batch_similarity_before, in_batch_similarity_after: sum over
            batches of sum_{i != j} cos(query_i, positive_j).
        num_examples, edges, components: the graph's size.
        seconds: the server's time.
        job_id: the server-side job, when the assignment ran as one.
    """

    batches: List[np.ndarray]
    bandwidth_before: float
    bandwidth_after: float
    in_batch_similarity_before: float
    in_batch_similarity_after: float
    num_examples: int
    edges: int
    components: int
    seconds: float
    job_id: str = ""


@dataclass(frozen=True)
class SnapshotResult:
    """A snapshot written by the server."""

    path: str
    bytes: int
    index_version: int
