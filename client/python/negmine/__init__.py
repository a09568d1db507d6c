"""negmine: the Python client of the negmine hard-negative mining service.

    import negmine
    client = negmine.Client("127.0.0.1:50051")
    client.wait_ready()
    result = client.mine(queries, k=64, collection="docs", mode="sample",
                         temperature=0.05, exclude=positive_ids)
    result.ids, result.scores, result.log_q      # numpy, or torch for torch queries

Public names: Client, ShardedClient (one collection over several servers),
HashRing, Prefetcher, DriftUpdater, mine_hard_negatives (sentence-transformers'
function, backed by a server), the result types
(MineResult, CollectionInfo, ...), TLSConfig, and the errors (NegmineError
and one subclass per gRPC code). `negmine.gradcache` (GradCache and the
sampled-softmax loss) needs torch and is imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

try:
    importlib.import_module("negmine.v1.negmine_pb2")  # generated at build time
except ModuleNotFoundError as _e:
    if not (_e.name or "").startswith("negmine.v1"):
        raise
    raise ImportError(
        "negmine's gRPC stubs (negmine/v1/negmine_pb2.py) are missing: install the "
        "package (`make python`, or pip install --no-deps --no-build-isolation "
        "client/python), or, in a source checkout, run "
        "`/usr/bin/python3 client/python/setup.py gen_stubs`") from None

from negmine.client import DEFAULT_COLLECTION, RETRY_POLICY, Client
from negmine.drift import DriftUpdater
from negmine.local_server import LocalServer
from negmine.errors import (Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded,
                            FailedPrecondition, Internal, InvalidArgument, NegmineError,
                            NotFound, OutOfRange, PermissionDenied, ResourceExhausted,
                            Unauthenticated, Unavailable, Unimplemented, Unknown)
from negmine.prefetch import Prefetcher
from negmine.sharding import HashRing, ShardedClient, ShardedLandmarks
from negmine.hard_negatives import mine_hard_negatives
from negmine.types import (BatchAssignment, CollectionInfo, DeleteResult, DriftResult,
                           FilterCounts, Landmarks, MineResult, ServerLimits, SnapshotResult, TLSConfig,
                           UpsertResult)

__version__ = "0.1.0"

__all__ = [
    "Client", "ShardedClient", "HashRing", "ShardedLandmarks", "Prefetcher",
    "DriftUpdater", "LocalServer", "TLSConfig", "DEFAULT_COLLECTION",
    "RETRY_POLICY", "BatchAssignment", "CollectionInfo", "DeleteResult", "DriftResult",
    "FilterCounts", "Landmarks", "MineResult", "ServerLimits", "SnapshotResult", "UpsertResult",
    "NegmineError", "Aborted", "AlreadyExists", "Cancelled", "DataLoss",
    "DeadlineExceeded", "FailedPrecondition", "Internal", "InvalidArgument", "NotFound",
    "OutOfRange", "PermissionDenied", "ResourceExhausted", "Unauthenticated",
    "Unavailable", "Unimplemented", "Unknown", "gradcache", "mine_hard_negatives",
]


def __getattr__(name: str) -> Any:
    """Imports `negmine.gradcache` (which needs torch) on first access."""
    if name == "gradcache":
        module = importlib.import_module("negmine.gradcache")
        globals()["gradcache"] = module
        return module
    raise AttributeError(f"module 'negmine' has no attribute {name!r}")
