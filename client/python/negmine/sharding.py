"""negmine.ShardedClient: one collection spread over several negmine servers.

    import negmine
    shards = negmine.ShardedClient(["10.0.0.1:50051", "10.0.0.2:50051"])
    # or, in Kubernetes: negmine.ShardedClient.from_statefulset(
    #     "negmine", service="negmine-shards", namespace="ml", replicas=4)
    shards.create_collection("docs", dim=64, exist_ok=True)
    shards.upsert("docs", ids, vectors)              # routed by id
    r = shards.mine(q, k=64, collection="docs", mode="sample", temperature=0.05,
                    sampler="exact")                 # fan out, exact merge
    r.ids, r.scores, r.log_q, r.coverage, r.shard_versions

Every shard is an ordinary negmine-server owning the targets that the
consistent-hash ring (HashRing) gives it. The client talks to the shards
directly: writes go to the owner of each id, Mine goes to every shard in
parallel under one deadline and the answers are merged exactly (top-k, and
samples that follow the global softmax with a global log q; method and proof
in docs/SHARDING.md). Drift updates are broadcast. Read-your-writes keeps one
index version per shard.

Failure: a shard that cannot be reached fails the call with UNAVAILABLE
naming it (after the channel's retry policy); with allow_partial=True the
other shards' merged answer comes back with `coverage` < 1 and
`missing_shards`, never silently.

Thread safety: a ShardedClient may be shared by threads. A drift broadcast
and the switch at the end of a reshard wait for the Mine calls in flight and
hold new ones back, so that no answer mixes two models or two shard maps.
"""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from negmine import _arrays
from negmine import _shard_merge as merge
from negmine.client import DEFAULT_COLLECTION, Client
from negmine.errors import (InvalidArgument, NegmineError, NotFound, Unavailable,
                            error_from_status)
from negmine.types import CollectionInfo, DriftResult, MineResult, UpsertResult

__all__ = ["HashRing", "ShardedClient", "ShardedLandmarks", "mix64"]

_M = np.uint64(0xFFFFFFFFFFFFFFFF)
_RING_SALT = 0x6E65676D696E6500  # "negmine\0"
_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def mix64(x: Any) -> np.ndarray:
    """splitmix64's finalizer on uint64 (wrapping), the hash of the ring."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class HashRing:
    """A consistent-hash ring: shard i has `vnodes` points
    mix64(SALT ^ (i << 32 | v)); an id belongs to the shard of the first point
    at or after mix64(id), wrapping. Growing from S to S' shards moves only
    ids to the new shards (about 1 - S/S' of them), never between old ones.
    The C++ ShardedClient computes the same owners."""

    def __init__(self, num_shards: int, vnodes: int = 128) -> None:
        if num_shards < 1 or vnodes < 1:
            raise InvalidArgument(InvalidArgument.code,
                                  f"num_shards = {num_shards}, vnodes = {vnodes}; both >= 1")
        self.num_shards = int(num_shards)
        self.vnodes = int(vnodes)
        shard = np.repeat(np.arange(num_shards, dtype=np.uint64), vnodes)
        v = np.tile(np.arange(vnodes, dtype=np.uint64), num_shards)
        points = mix64(np.uint64(_RING_SALT) ^ ((shard << np.uint64(32)) | v))
        # Ties (vanishingly rare) go to the lower shard, as in the C++ ring.
        order = np.lexsort((shard, points))
        self.points = points[order]
        self.shards = shard[order].astype(np.int64)

    def owner(self, ids: Any) -> np.ndarray:
        """The shard of each id ([n] int64)."""
        h = mix64(np.asarray(ids, dtype=np.int64).astype(np.uint64))
        pos = np.searchsorted(self.points, h, side="left")
        return self.shards[pos % len(self.points)]


class ShardedLandmarks:
    """The landmarks of every shard: re-encode `ids` (all shards' sets, in
    order) and pass the embeddings, in the same order, to apply_drift."""

    def __init__(self, per_shard: List[Any]) -> None:
        self.per_shard = per_shard  # negmine.Landmarks per shard
        self.ids = (np.concatenate([lm.ids for lm in per_shard])
                    if per_shard else np.zeros(0, dtype=np.int64))
        self.epochs = [lm.epoch for lm in per_shard]


class _ReadWriteGate:
    """Many readers (Mine calls) or one writer (a drift broadcast, a map switch)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def read(self) -> "_Held":
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        return _Held(self, False)

    def write(self) -> "_Held":
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()
        return _Held(self, True)

    def release(self, writer: bool) -> None:
        with self._cond:
            if writer:
                self._writer = False
            else:
                self._readers -= 1
            self._cond.notify_all()


class _Held:
    def __init__(self, gate: _ReadWriteGate, writer: bool) -> None:
        self.gate, self.writer = gate, writer

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self.gate.release(self.writer)


def _np(x: Any) -> np.ndarray:
    if _arrays.is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _shard_seed(seed: int, shard: int, attempt: int = 0) -> int:
    value = int(mix64(np.uint64(seed) ^ mix64(np.uint64(shard * 1000003 + attempt + 1))))
    return value or 1


class ShardedClient:
    """A client of S negmine servers that together hold each collection.

    Args:
        addresses: "host:port" of shard 0, 1, ..., S - 1. The order is the
            shard map: shard i owns the ids HashRing(S).owner gives i.
        vnodes: points per shard on the ring (the same for every client).
        allow_partial: default of mine(allow_partial=...).
        token, tls, timeout: as negmine.Client (timeout: the default deadline
            of a whole fanned-out call).
        wait_for_ready: as negmine.Client; False (the default) makes a down
            shard fail fast with UNAVAILABLE after the retry policy instead
            of waiting for the deadline.
    """

    def __init__(self, addresses: Sequence[str], *, vnodes: int = 128,
                 allow_partial: bool = False, token: Optional[str] = None,
                 tls: Any = None, timeout: Optional[float] = 60.0,
                 wait_for_ready: bool = False) -> None:
        if not addresses:
            raise InvalidArgument(InvalidArgument.code, "addresses is empty: need >= 1 shard")
        self._client_args = dict(token=token, tls=tls, timeout=timeout,
                                 wait_for_ready=wait_for_ready)
        self.addresses = list(addresses)
        self.shards = [Client(a, **self._client_args) for a in self.addresses]
        self.vnodes = vnodes
        self.ring = HashRing(len(self.shards), vnodes)
        self.allow_partial = allow_partial
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.shards)))
        self._gate = _ReadWriteGate()
        self._write_lock = threading.RLock()  # writes vs. reshard copies
        self._versions: Dict[str, List[int]] = {}
        self._sizes: Dict[str, List[Optional[int]]] = {}
        self._migration: Optional[Dict[str, Any]] = None
        self._recorded: Optional[set] = None  # ids written during a reshard
        self.model_step: Optional[int] = None

    @classmethod
    def from_statefulset(cls, name: str, service: str, namespace: str = "default",
                         replicas: Optional[int] = None, port: int = 50051,
                         cluster_domain: str = "cluster.local", **kwargs: Any
                         ) -> "ShardedClient":
        """The shards of a StatefulSet behind a headless Service: pod i is
        NAME-i.SERVICE.NAMESPACE.svc.DOMAIN. `replicas` None: counted from the
        Service's DNS records (it must publish not-ready pods, as
        deploy/k8s/sharded does, so that a down shard still counts)."""
        host = f"{service}.{namespace}.svc.{cluster_domain}"
        if replicas is None:
            replicas = len({a[4][0] for a in socket.getaddrinfo(host, port,
                                                                  proto=socket.IPPROTO_TCP)})
        return cls([f"{name}-{i}.{host}:{port}" for i in range(replicas)], **kwargs)

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        for c in self.shards:
            c.close()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> "ShardedClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    @staticmethod
    def _left(deadline: Optional[float]) -> Optional[float]:
        return None if deadline is None else max(0.001, deadline - time.monotonic())

    def _name(self, s: int) -> str:
        return f"shard {s} ({self.addresses[s]})"

    def _fan(self, shards: Sequence[int], fn: Any, deadline: Optional[float],
             allow_partial: bool = False) -> Tuple[Dict[int, Any], List[int]]:
        """fn(shard) on each shard in parallel. Returns (answers, the down
        shards). A down shard raises Unavailable naming it unless
        allow_partial; any other error raises with the shard's name."""
        futures = {s: self._pool.submit(fn, s) for s in shards}
        out: Dict[int, Any] = {}
        down: List[int] = []
        first_error: Optional[NegmineError] = None
        for s, f in futures.items():
            try:
                out[s] = f.result(timeout=self._left(deadline))
            except NegmineError as e:
                if e.code in _DOWN:
                    down.append(s)
                    if not allow_partial and first_error is None:
                        first_error = Unavailable(
                            Unavailable.code,
                            f"{self._name(s)} is unavailable ({e.code.name}: {e.details})")
                elif first_error is None:
                    first_error = error_from_status(e.code, f"{self._name(s)}: {e.details}")
        if first_error is not None:
            raise first_error
        return out, down

    def _vers(self, collection: str) -> List[int]:
        return self._versions.setdefault(collection, [0] * len(self.shards))

    def _note_version(self, collection: str, shard: int, version: int) -> None:
        v = self._vers(collection)
        v[shard] = max(v[shard], int(version))

    def versions(self, collection: str = DEFAULT_COLLECTION) -> List[int]:
        """Per shard, the index version of the last write or drift update made
        through this client: pass it as mine(min_versions=...) in another
        process to read these writes."""
        return list(self._vers(collection))

    def _shard_sizes(self, collection: str, shards: Sequence[int], deadline: Optional[float],
                     refresh: bool = False, allow_partial: bool = False) -> List[Optional[int]]:
        sizes = self._sizes.setdefault(collection, [None] * len(self.shards))
        need = [s for s in shards if refresh or sizes[s] is None or sizes[s] == 0]
        if need:
            def size_of(s: int) -> int:
                for c in self.shards[s].list_collections(timeout=self._left(deadline)):
                    if c.name == collection:
                        return c.num_targets
                raise NotFound(NotFound.code, f"collection {collection!r} does not exist")
            got, _ = self._fan(need, size_of, deadline, allow_partial)
            for s, n in got.items():
                sizes[s] = n
        return sizes

    def _forget_sizes(self, collection: str, shards: Sequence[int]) -> None:
        sizes = self._sizes.get(collection)
        if sizes:
            for s in shards:
                sizes[s] = None

    # --------------------------------------------------------- collections

    def _all_shards(self) -> List[int]:
        return list(range(len(self.shards)))

    def create_collection(self, name: str, dim: int, **kwargs: Any) -> List[CollectionInfo]:
        """Creates the collection on every shard (Client.create_collection's
        arguments); its shard count is this client's."""
        got, _ = self._fan(self._all_shards(),
                           lambda s: self.shards[s].create_collection(name, dim, **kwargs),
                           self._deadline(kwargs.get("timeout")))
        return [got[s] for s in sorted(got)]

    def drop_collection(self, name: str, timeout: Optional[float] = None) -> None:
        self._fan(self._all_shards(), lambda s: self.shards[s].drop_collection(name),
                  self._deadline(timeout))
        self._sizes.pop(name, None)
        self._versions.pop(name, None)

    def info(self, collection: str = DEFAULT_COLLECTION,
             timeout: Optional[float] = None) -> List[CollectionInfo]:
        """Every shard's CollectionInfo, in shard order."""
        got, _ = self._fan(self._all_shards(),
                           lambda s: self.shards[s].info(collection, timeout=self._left(dl)),
                           dl := self._deadline(timeout))
        return [got[s] for s in sorted(got)]

    def num_targets(self, collection: str = DEFAULT_COLLECTION) -> int:
        return sum(i.num_targets for i in self.info(collection))

    # -------------------------------------------------------------- targets

    def _groups(self, ids: np.ndarray) -> Dict[int, np.ndarray]:
        owner = self.ring.owner(ids)
        return {int(s): np.nonzero(owner == s)[0] for s in np.unique(owner)}

    def upsert(self, collection: str, ids: Any, vectors: Any, model_step: int = 0,
               timeout: Optional[float] = None) -> UpsertResult:
        """Upserts each target on the shard that owns its id (during a
        reshard, on its old and its new owner). Returns the rows upserted and
        the lowest of the touched shards' versions; versions() has each."""
        id_array = _arrays.as_ids(ids)
        vecs = vectors
        dl = self._deadline(timeout)
        with self._write_lock:
            plan = self._write_plan(id_array)
            got, _ = self._fan(
                list(plan),
                lambda s: self.shards[s].upsert(collection, id_array[plan[s]], vecs[plan[s]],
                                                model_step, timeout=self._left(dl)), dl)
            self._note_migration_writes(id_array)
        for s, r in got.items():
            self._note_version(collection, s, r.index_version)
        self._forget_sizes(collection, list(got))
        return UpsertResult(upserted=len(id_array),
                            index_version=min((r.index_version for r in got.values()),
                                              default=0))

    def delete(self, collection: str, ids: Any, allow_missing: bool = False,
               timeout: Optional[float] = None) -> int:
        """Deletes ids on their owners; returns how many were deleted. With
        allow_missing False an unknown id raises NotFound (naming the shard)
        and that shard deletes nothing (other shards may have deleted theirs)."""
        id_array = _arrays.as_ids(ids)
        dl = self._deadline(timeout)
        with self._write_lock:
            plan = self._write_plan(id_array)
            migrating = self._migration is not None
            got, _ = self._fan(
                list(plan),
                lambda s: self.shards[s].delete(collection, id_array[plan[s]],
                                                allow_missing=allow_missing or migrating,
                                                timeout=self._left(dl)), dl)
            self._note_migration_writes(id_array)
        for s, r in got.items():
            self._note_version(collection, s, r.index_version)
        self._forget_sizes(collection, list(got))
        deleted = sum(r.deleted for s, r in got.items()
                      if not migrating or s < self._migration_old_count())
        return int(deleted)

    def get(self, collection: str, ids: Any, scored: bool = False,
            timeout: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Client.get over the shards: (vectors [n, dim], model_steps [n]) in
        the order of `ids`."""
        id_array = _arrays.as_ids(ids)
        dl = self._deadline(timeout)
        groups = self._read_groups(id_array)
        got, _ = self._fan(list(groups), lambda s: self.shards[s].get(
            collection, id_array[groups[s]], scored=scored, timeout=self._left(dl)), dl)
        dim = next(iter(got.values()))[0].shape[1] if got else 0
        vectors = np.zeros((len(id_array), dim), dtype=np.float32)
        steps = np.zeros(len(id_array), dtype=np.int64)
        for s, (v, st) in got.items():
            vectors[groups[s]] = v
            steps[groups[s]] = st
        return vectors, steps

    def _read_groups(self, ids: np.ndarray) -> Dict[int, np.ndarray]:
        if self._migration is not None:
            owner = self._migration["old_ring"].owner(ids)
            return {int(s): np.nonzero(owner == s)[0] for s in np.unique(owner)}
        return self._groups(ids)

    def _read_shards(self) -> List[int]:
        if self._migration is not None:
            return list(range(self._migration_old_count()))
        return self._all_shards()

    def _migration_old_count(self) -> int:
        assert self._migration is not None
        return self._migration["old_ring"].num_shards

    def _write_plan(self, ids: np.ndarray) -> Dict[int, np.ndarray]:
        """Positions of `ids` per shard to write: the owner, and during a
        reshard the old owner too (old shards stay complete until the switch)."""
        plan: Dict[int, List[np.ndarray]] = {}
        for s, pos in self._groups(ids).items():
            plan.setdefault(s, []).append(pos)
        if self._migration is not None:
            old = self._migration["old_ring"].owner(ids)
            for s in np.unique(old):
                plan.setdefault(int(s), []).append(np.nonzero(old == s)[0])
        return {s: np.unique(np.concatenate(p)) for s, p in plan.items()}

    def _note_migration_writes(self, ids: np.ndarray) -> None:
        """During a reshard, remembers the ids written (they may be missing
        from the caller's id list)."""
        if self._recorded is not None:
            self._recorded.update(int(i) for i in ids)

    @property
    def resharding(self) -> bool:
        """True while reshard() runs (from its start: writes are tracked)."""
        return self._recorded is not None

    # --------------------------------------------------------------- mining

    from negmine._shard_mine import mine  # noqa: E402  (the method lives beside)

    # ---------------------------------------------------------------- drift

    def landmarks(self, collection: str = DEFAULT_COLLECTION,
                  timeout: Optional[float] = None) -> ShardedLandmarks:
        """Every shard's landmark set; re-encode ShardedLandmarks.ids."""
        dl = self._deadline(timeout)
        got, _ = self._fan(self._read_shards(), lambda s: self.shards[s].landmarks(
            collection, timeout=self._left(dl)), dl)
        return ShardedLandmarks([got[s] for s in sorted(got)])

    def apply_drift(self, step: int, embeddings: Any, landmarks: ShardedLandmarks,
                    collection: str = DEFAULT_COLLECTION,
                    timeout: Optional[float] = None) -> List[DriftResult]:
        """Broadcasts one drift step: shard s gets the rows of `embeddings`
        that re-encode its landmarks (ShardedLandmarks order). Mine calls
        through this client wait while it runs, and later ones require every
        shard's version that serves the step, so no answer mixes models."""
        emb = embeddings
        offsets = np.cumsum([0] + [len(lm.ids) for lm in landmarks.per_shard])
        dl = self._deadline(timeout)
        with self._gate.write():
            got, _ = self._fan(
                list(range(len(landmarks.per_shard))),
                lambda s: self.shards[s].apply_drift(
                    step, emb[offsets[s]:offsets[s + 1]], landmarks.epochs[s], collection,
                    timeout=self._left(dl)), dl)
            for s, r in got.items():
                self._note_version(collection, s, r.index_version)
            self.model_step = int(step)
        return [got[s] for s in sorted(got)]

    def apply_linear_map(self, step: int, a: Any, b: Any = None,
                         collection: str = DEFAULT_COLLECTION,
                         timeout: Optional[float] = None) -> List[DriftResult]:
        """Broadcasts an exact linear map to every shard (see apply_drift)."""
        dl = self._deadline(timeout)
        with self._gate.write():
            got, _ = self._fan(self._all_shards(), lambda s: self.shards[s].apply_linear_map(
                step, a, b, collection, timeout=self._left(dl)), dl)
            for s, r in got.items():
                self._note_version(collection, s, r.index_version)
            self.model_step = int(step)
        return [got[s] for s in sorted(got)]

    # ----------------------------------------------------------- resharding

    from negmine._shard_reshard import reshard  # noqa: E402
