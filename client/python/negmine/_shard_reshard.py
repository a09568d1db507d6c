"""ShardedClient.reshard: grow a collection from S to S' shards online.

The procedure (docs/SHARDING.md, "Resharding"):
  1. create the collection on the new shards, with the old shards' config;
  2. switch writes to dual-write: each write goes to the id's owner on the
     new ring and to its owner on the old ring, so the old shards stay
     complete and keep serving every read;
  3. copy each moving id (old owner != new owner) from its old owner to its
     new one, one chunk at a time under the client's write lock, so that a
     write through this client is never overwritten by an older copy;
  4. with Mine calls held back: delete the moved ids from their old owners
     and switch reads to the new ring.
Writers in other processes must stop (or go through this client) between
steps 2 and 4; the consistent-hash ring moves ids only from old shards to new
ones, about 1 - S/S' of them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from negmine import _arrays
from negmine.client import DEFAULT_COLLECTION, Client
from negmine.errors import InvalidArgument, NegmineError, NotFound
from negmine.v1 import negmine_pb2 as pb


def _get_present(client: Client, collection: str, ids: np.ndarray, scored: bool,
                 timeout: Optional[float]) -> Any:
    """GetTargets of the ids that still exist (deleted ones are skipped by
    bisecting the batch on NOT_FOUND)."""
    if len(ids) == 0:
        return ids, None, None
    try:
        vectors, steps = client.get(collection, ids, scored=scored, timeout=timeout)
        return ids, vectors, steps
    except NotFound:
        if len(ids) == 1:
            return ids[:0], None, None
        half = len(ids) // 2
        parts = [_get_present(client, collection, ids[:half], scored, timeout),
                 _get_present(client, collection, ids[half:], scored, timeout)]
        parts = [p for p in parts if p[1] is not None]
        if not parts:
            return ids[:0], None, None
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))


def reshard(self: Any, new_addresses: Sequence[str], ids: Any,
            collection: str = DEFAULT_COLLECTION, chunk: int = 2048,
            timeout: Optional[float] = None) -> Dict[str, Any]:
    """Adds the shards at `new_addresses` (S -> S + len(new_addresses)) and
    moves to them the targets the new ring gives them, without losing a
    write made through this client meanwhile.

    ids: every id of the collection (the corpus' id list; the wire has no
    call that lists a shard's ids). Ids written through this client during
    the reshard are tracked on their own.

    If a step fails, the client stays dual-writing with reads on the old
    shards (exact and complete): a new ShardedClient over the old addresses
    can run reshard again (the copy is idempotent).

    Returns {"shards": S', "moving": ids whose owner changed, "copied":
    targets copied, "deleted_from_old": stale copies removed}.
    """
    if self._migration is not None:
        raise InvalidArgument(InvalidArgument.code, "a reshard is already running")
    if not new_addresses:
        raise InvalidArgument(InvalidArgument.code, "new_addresses is empty")
    with self._write_lock:
        self._recorded = set()  # from here on, writes through this client are tracked
    try:
        return _reshard(self, new_addresses, _arrays.as_ids(ids).astype(np.int64),
                        collection, chunk, timeout)
    finally:
        with self._write_lock:
            self._recorded = None


def _reshard(self: Any, new_addresses: Sequence[str], id_array: np.ndarray,
             collection: str, chunk: int, timeout: Optional[float]) -> Dict[str, Any]:
    from negmine.sharding import HashRing
    dl = self._deadline(timeout)
    info = self.shards[0].info(collection, timeout=self._left(dl))
    config = pb.CollectionConfig()
    config.CopyFrom(info.raw.config)
    drift_active = bool(info.drift and info.drift.get("active"))
    drift_step = int(info.drift.get("model_step", info.drift.get("modelStep", 0))
                     if info.drift else 0)
    new_clients = [Client(a, **self._client_args) for a in new_addresses]
    for c in new_clients:
        try:
            c._call(c.stub.CreateCollection, pb.CreateCollectionRequest(config=config),
                    self._left(dl))
        except NegmineError as e:
            if e.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
    old_count = len(self.shards)
    # Step 2: dual-write from here on (Mine keeps reading the old shards).
    with self._gate.write(), self._write_lock:
        old_ring = self.ring
        self.shards.extend(new_clients)
        self.addresses.extend(new_addresses)
        for v in self._versions.values():
            v.extend([0] * len(new_clients))
        for s in self._sizes.values():
            s.extend([None] * len(new_clients))
        self.ring = HashRing(len(self.shards), self.vnodes)
        self._migration = {"old_ring": old_ring}
        # Ids written since reshard() began, before dual-writing: copy them too.
        id_array = np.union1d(id_array, np.fromiter(self._recorded, dtype=np.int64,
                                                    count=len(self._recorded)))
        # Nothing is in flight (both locks held): a pool sized for S' shards.
        self._pool.shutdown(wait=False)
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.shards)))
    old_owner = old_ring.owner(id_array)
    new_owner = self.ring.owner(id_array)
    moving = id_array[old_owner != new_owner]
    copied = 0
    # Step 3: copy, chunk by chunk, each chunk atomic against writes.
    for start in range(0, len(moving), chunk):
        part = moving[start:start + chunk]
        src = old_ring.owner(part)
        dst = self.ring.owner(part)
        with self._write_lock:
            for s in np.unique(src):
                mine_ids = part[src == s]
                got_ids, vectors, steps = _get_present(
                    self.shards[int(s)], collection, mine_ids, drift_active,
                    self._left(dl))
                if vectors is None:
                    continue
                d = self.ring.owner(got_ids)
                for t in np.unique(d):
                    rows = d == t
                    if drift_active:
                        # The scored (drift-corrected) vectors, exact at the
                        # last drift step: the new shard has no drift model.
                        groups = {drift_step: np.nonzero(rows)[0]}
                    else:
                        groups = {int(st): np.nonzero(rows & (steps == st))[0]
                                  for st in np.unique(steps[rows])}
                    for step, sel in groups.items():
                        r = self.shards[int(t)].upsert(collection, got_ids[sel],
                                                       vectors[sel], model_step=step,
                                                       timeout=self._left(dl))
                        self._note_version(collection, int(t), r.index_version)
                        copied += len(sel)
            del dst
    # Step 4: remove the old copies and switch reads, Mine held back.
    with self._gate.write(), self._write_lock:
        written = np.fromiter(self._recorded, dtype=np.int64, count=len(self._recorded))
        written = written[old_ring.owner(written) != self.ring.owner(written)]
        stale = np.unique(np.concatenate([moving, written]))
        deleted = 0
        owners = old_ring.owner(stale)
        for s in np.unique(owners):
            r = self.shards[int(s)].delete(collection, stale[owners == s],
                                           allow_missing=True, timeout=self._left(dl))
            self._note_version(collection, int(s), r.index_version)
            deleted += r.deleted
        self._migration = None
        self._forget_sizes(collection, list(range(len(self.shards))))
    return {"shards": len(self.shards), "old_shards": old_count, "moving": int(len(moving)),
            "copied": int(copied), "deleted_from_old": int(deleted)}


__all__: List[str] = ["reshard"]
