"""negmine.DriftUpdater: keeps a collection's targets in step with a moving
target encoder, at the cost of a few hundred encodings per update.

    upd = negmine.DriftUpdater(client, "docs", encode=lambda ids: tower(docs[ids]),
                               every=50, reencode_budget=256, target_ids=all_ids)
    for step in range(num_steps):
        train_step(...)
        upd.maybe_update(step)       # every 50 steps: landmarks, encode, ApplyDrift
    print(upd.encodings_spent)

Each update: the landmark ids (GetLandmarks, cached until a re-base), their
embeddings from `encode` at the current step, ApplyDrift; then, with a
re-encode budget, the next `reencode_budget` ids of `target_ids` (rolling
over them, in a fixed shuffled order) are encoded and upserted with
model_step = step, so that they are served exactly as encoded.

Thread safety: one training loop.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Optional

import numpy as np

from negmine.client import Client
from negmine.errors import FailedPrecondition
from negmine.types import DriftResult, Landmarks

__all__ = ["DriftUpdater"]


def _no_grad() -> Any:
    """torch.no_grad() when torch is loaded (encodings need no graph)."""
    torch = sys.modules.get("torch")
    return torch.no_grad() if torch is not None else contextlib.nullcontext()


class DriftUpdater:
    """Calls ApplyDrift every `every` steps with freshly encoded landmarks.

    Args:
        client: a negmine Client.
        collection: the collection holding the targets.
        encode: the current target encoder as a callable on an int64 id
            array [n], returning [n, dim] (numpy or torch, any device and
            float dtype). Called under torch.no_grad() when torch is loaded.
        every: steps between updates (the first at step `every`).
        reencode_budget: targets re-encoded and upserted per update (0: none).
        target_ids: the ids to re-encode from, rolling (needed when
            reencode_budget > 0).
        seed: the order of target_ids is a permutation by this seed (0: as given).

    Attributes:
        encodings_spent: targets encoded so far (landmarks + re-encodes).
        landmark_encodings, reencode_encodings: its two parts.
        updates: updates applied.
        last_result: the last DriftResult, or None.
    """

    def __init__(self, client: Client, collection: str,
                 encode: Callable[[np.ndarray], Any], every: int = 100,
                 reencode_budget: int = 0, target_ids: Optional[Any] = None,
                 seed: int = 0) -> None:
        if every < 1:
            raise ValueError(f"every = {every}; must be >= 1")
        if reencode_budget < 0:
            raise ValueError(f"reencode_budget = {reencode_budget}; must be >= 0")
        if reencode_budget > 0 and target_ids is None:
            raise ValueError("reencode_budget > 0 needs target_ids")
        self.client = client
        self.collection = collection
        self.encode = encode
        self.every = int(every)
        self.reencode_budget = int(reencode_budget)
        order = None
        if target_ids is not None:
            ids = target_ids.detach().cpu().numpy() if hasattr(target_ids, "detach") \
                else np.asarray(target_ids)
            order = ids.astype(np.int64).reshape(-1)
            if seed:
                order = order[np.random.default_rng(seed).permutation(len(order))]
        self._order = order
        self._cursor = 0
        self._next_step = self.every
        self._landmarks: Optional[Landmarks] = None
        self.landmark_encodings = 0
        self.reencode_encodings = 0
        self.updates = 0
        self.last_result: Optional[DriftResult] = None

    @property
    def encodings_spent(self) -> int:
        """Targets encoded so far: landmarks plus re-encoded targets."""
        return self.landmark_encodings + self.reencode_encodings

    def due(self, step: int) -> bool:
        """Whether maybe_update(step) would update."""
        return step >= self._next_step

    def maybe_update(self, step: int, force: bool = False) -> Optional[DriftResult]:
        """Updates when `step` is due (every `every` steps) or `force`;
        returns the DriftResult, or None when nothing was done."""
        if not force and not self.due(step):
            return None
        return self.update(step)

    def _encode(self, ids: np.ndarray) -> Any:
        with _no_grad():
            out = self.encode(ids)
        if hasattr(out, "detach"):
            out = out.detach()
        if int(out.shape[0]) != len(ids):
            raise ValueError(f"encode returned {int(out.shape[0])} rows for {len(ids)} ids")
        return out

    def _apply_landmarks(self, step: int) -> DriftResult:
        if self._landmarks is None:
            self._landmarks = self.client.landmarks(self.collection)
        lm = self._landmarks
        embeddings = self._encode(lm.ids)
        self.landmark_encodings += len(lm.ids)
        return self.client.apply_drift(step, embeddings, lm.epoch, self.collection)

    def update(self, step: int) -> DriftResult:
        """One update at `step`: landmarks, encode, ApplyDrift, then the
        re-encode budget (upserted with model_step = step)."""
        try:
            result = self._apply_landmarks(step)
        except FailedPrecondition as e:
            if "landmark" not in e.details.lower():
                raise
            # The set changed under us (a re-base, a linear map): fetch it again.
            self._landmarks = None
            result = self._apply_landmarks(step)
        if result.rebased or (self._landmarks is not None
                              and result.landmark_epoch != self._landmarks.epoch):
            self._landmarks = None
        if self.reencode_budget and self._order is not None and len(self._order):
            n = min(self.reencode_budget, len(self._order))
            idx = (self._cursor + np.arange(n)) % len(self._order)
            self._cursor = int((self._cursor + n) % len(self._order))
            ids = self._order[idx]
            vectors = self._encode(ids)
            self.reencode_encodings += n
            self.client.upsert(self.collection, ids, vectors, model_step=step)
        self.updates += 1
        self.last_result = result
        self._next_step = step + self.every
        return result
