"""Exact merging of per-shard Mine answers (numpy only, no gRPC).

The method and its proof are in docs/SHARDING.md. In short, for a batch of Q
queries and shards s = 1..S:

- top-k: the global top k is within the union of the shards' top k; sort the
  union by (score desc, id asc).
- sampling, with replacement: a draw from the mixture sum_s (A_s / A) q_s is
  a shard s drawn with probability A_s / A, then one of its i.i.d. draws.
  For the exact sampler A_s = Z_s (the shard's partition function), known
  only within a certified interval: a slot's shard is decided from a client
  uniform u by interval arithmetic, and undecided slots ask for a tighter
  interval (allocate_with_replacement reports which).
- sampling, without replacement: Gumbel-top-k. A shard's ordered sample
  without replacement (Plackett-Luce) has the same law as its items sorted by
  keys log w + G; the keys of the items drawn are re-simulated in order from
  the total mass (shard_keys), and the k largest keys over all shards are an
  exact sample without replacement from the union.

Arrays: a shard part has ids [Q, n] (int64, -1 padding), scores [Q, n]
(float32), log_q [Q, n] and counts [Q]. Log masses are float64 [Q].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np


@dataclass
class Part:
    """One shard's answer for a batch, as numpy arrays."""

    shard: int
    ids: np.ndarray        # [Q, n] int64, -1 padding
    scores: np.ndarray     # [Q, n] float32, nan padding
    log_q: np.ndarray      # [Q, n] float32 (samples), nan padding
    counts: np.ndarray     # [Q] results per query
    num_eligible: np.ndarray  # [Q]
    log_z_lo: Optional[np.ndarray] = None  # [Q] float64
    log_z_hi: Optional[np.ndarray] = None
    index_version: int = 0


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis; -inf for rows of -inf."""
    top = np.max(x, axis=-1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.sum(np.exp(x - safe[..., None]), axis=-1))


def merge_top_k(parts: Sequence[Part], k: int, skip: int = 0
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k best of the union per query, after skipping the `skip` best.
    Ties by ascending id, as one server orders them. Returns (ids [Q, k],
    scores [Q, k], counts [Q])."""
    ids = np.concatenate([p.ids for p in parts], axis=1)
    scores = np.concatenate([p.scores for p in parts], axis=1).astype(np.float64)
    valid = ids >= 0
    neg = np.where(valid, -scores, np.inf)
    order = np.lexsort((np.where(valid, ids, np.iinfo(np.int64).max), neg), axis=-1)
    ids = np.take_along_axis(ids, order, axis=1)
    sc = np.take_along_axis(np.concatenate([p.scores for p in parts], axis=1), order, axis=1)
    total = valid.sum(axis=1)
    out_ids = np.full((ids.shape[0], k), -1, dtype=np.int64)
    out_scores = np.full((ids.shape[0], k), np.nan, dtype=np.float32)
    width = max(0, min(k, ids.shape[1] - skip))
    out_ids[:, :width] = ids[:, skip:skip + width]
    out_scores[:, :width] = sc[:, skip:skip + width]
    counts = np.clip(total - skip, 0, k)
    mask = np.arange(k)[None, :] >= counts[:, None]
    out_ids[mask] = -1
    out_scores[mask] = np.nan
    return out_ids, out_scores, counts


def shard_keys(log_w: np.ndarray, counts: np.ndarray, log_mass: np.ndarray,
               gumbel: np.ndarray) -> np.ndarray:
    """Gumbel keys of a shard's ordered sample without replacement.

    log_w: [Q, n] log weights of the items in draw order (absolute, on the
    scale of log_mass); log_mass: [Q] the log of the shard's total weight;
    gumbel: [Q, n] standard Gumbel variates. The first key is
    log_mass + G_0; key j is a Gumbel of location log(mass - drawn mass)
    truncated below key j - 1: -log(exp(-key_{j-1}) + exp(-(phi_j + G_j))).
    Keys are increasing in log_mass. Padding gets -inf."""
    q, n = log_w.shape
    keys = np.full((q, n), -np.inf)
    if n == 0:
        return keys
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        finite_mass = np.isfinite(log_mass)
        mass = np.where(finite_mass, log_mass, 0.0)
        prev = np.where(finite_mass & (counts > 0), mass + gumbel[:, 0], -np.inf)
        keys[:, 0] = prev
        drawn = np.zeros(q)
        for j in range(1, n):
            drawn = drawn + np.where(np.isfinite(log_w[:, j - 1]),
                                     np.exp(log_w[:, j - 1] - mass), 0.0)
            left = 1.0 - drawn
            phi = np.where(left > 0, mass + np.log(np.maximum(left, 1e-300)), -np.inf)
            cur = -np.logaddexp(-prev, -(phi + gumbel[:, j]))
            cur = np.where(np.isnan(cur), -np.inf, cur)
            cur = np.where(j < counts, cur, -np.inf)
            keys[:, j] = cur
            prev = cur
    return keys


@dataclass
class KeyedMerge:
    """The top-m items by key over all shards, in key order."""

    shard: np.ndarray      # [Q, m] index into parts, -1 padding
    position: np.ndarray   # [Q, m] position in that part's row
    counts: np.ndarray     # [Q]
    ambiguous: np.ndarray  # [Q, S] bool: tighten this shard's mass for this query


def merge_without_replacement(key_lo: Sequence[np.ndarray], key_hi: Sequence[np.ndarray],
                              m: int) -> KeyedMerge:
    """Selects the m largest keys per query. key_lo / key_hi: per part,
    [Q, n_s] keys at the low and high end of its mass interval (equal when
    the mass is exact). A query is ambiguous where two items of different
    shards that could be in its top m have overlapping key intervals: their
    order (or membership) depends on where the true masses lie."""
    s_count = len(key_lo)
    lo = np.concatenate(list(key_lo), axis=1)
    hi = np.concatenate(list(key_hi), axis=1)
    shard_of = np.concatenate([np.full(k.shape[1], s) for s, k in enumerate(key_lo)])
    pos_of = np.concatenate([np.arange(k.shape[1]) for k in key_lo])
    q = lo.shape[0]
    with np.errstate(invalid="ignore"):
        mid = np.where(np.isfinite(lo) & np.isfinite(hi), 0.5 * (lo + hi),
                       np.where(np.isfinite(hi), hi, lo))
    valid = np.isfinite(mid)
    order = np.argsort(np.where(valid, -mid, np.inf), axis=1, kind="stable")
    counts = np.minimum(valid.sum(axis=1), m)
    width = min(m, lo.shape[1])
    sel = order[:, :width]
    shard = np.full((q, m), -1, dtype=np.int64)
    position = np.full((q, m), -1, dtype=np.int64)
    shard[:, :width] = shard_of[sel]
    position[:, :width] = pos_of[sel]
    pad = np.arange(m)[None, :] >= counts[:, None]
    shard[pad] = -1
    position[pad] = -1
    ambiguous = np.zeros((q, s_count), dtype=bool)
    exact = np.all(lo == hi) or s_count < 2
    if not exact:
        for i in range(q):
            ok = valid[i]
            if not ok.any():
                continue
            los = np.sort(np.where(ok, lo[i], -np.inf))[::-1]
            threshold = los[min(m, ok.sum()) - 1] if ok.sum() > m else -np.inf
            cand = np.nonzero(ok & (hi[i] >= threshold))[0]
            a_lo, a_hi, a_s = lo[i, cand], hi[i, cand], shard_of[cand]
            overlap = ((a_lo[:, None] < a_hi[None, :]) & (a_lo[None, :] < a_hi[:, None])
                       & (a_s[:, None] != a_s[None, :]))
            if overlap.any():
                rows, cols = np.nonzero(overlap)
                ambiguous[i, a_s[rows]] = True
                ambiguous[i, a_s[cols]] = True
    return KeyedMerge(shard=shard, position=position, counts=counts, ambiguous=ambiguous)


def allocate_with_replacement(log_lo: np.ndarray, log_hi: np.ndarray, u: np.ndarray
                              ) -> Tuple[np.ndarray, np.ndarray]:
    """The shard of each draw: slot j of query i goes to the first shard s
    with sum_{t<=s} Z_t > u_ij sum_t Z_t. log_lo / log_hi: [Q, S] bounds on
    log Z_s (-inf: nothing eligible); u: [Q, m] uniforms in (0, 1).
    Returns (shard [Q, m], -1 where undecided; ambiguous [Q, S]: the
    inexact intervals of queries with an undecided slot)."""
    q, s_count = log_lo.shape
    top = np.max(np.where(np.isfinite(log_hi), log_hi, -np.inf), axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    z_lo = np.exp(log_lo - top)
    z_hi = np.exp(log_hi - top)
    left_lo = np.cumsum(z_lo, axis=1)            # sum_{t<=s}
    left_hi = np.cumsum(z_hi, axis=1)
    right_lo = np.cumsum(z_lo[:, ::-1], axis=1)[:, ::-1] - z_lo  # sum_{t>s}
    right_hi = np.cumsum(z_hi[:, ::-1], axis=1)[:, ::-1] - z_hi
    right_lo = np.maximum(right_lo, 0.0)
    right_hi = np.maximum(right_hi, 0.0)
    uu = u[:, :, None]
    sure_true = uu * right_hi[:, None, :] < (1 - uu) * left_lo[:, None, :]
    sure_false = uu * right_lo[:, None, :] >= (1 - uu) * left_hi[:, None, :]
    # The condition is monotone in s: the chosen shard is its first true one.
    first_true = np.argmax(sure_true, axis=2)
    any_true = sure_true.any(axis=2)
    before = np.arange(s_count)[None, None, :] < first_true[:, :, None]
    decided = any_true & np.all(sure_false | ~before, axis=2)
    shard = np.where(decided, first_true, -1)
    # An undecided slot depends on every shard's Z (through both sums):
    # tighten all of that query's inexact intervals.
    undecided = ~decided.all(axis=1)
    ambiguous = undecided[:, None] & (log_lo < log_hi)
    return shard, ambiguous


def gumbel(rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    """Standard Gumbel variates."""
    u = rng.random(shape)
    return -np.log(-np.log(np.clip(u, 1e-300, 1.0 - 1e-16)))


def merged_log_z(parts: Sequence[Part]) -> Tuple[np.ndarray, np.ndarray]:
    """[log sum_s Z_s lo, hi] per query from the parts' intervals."""
    lo = np.stack([p.log_z_lo for p in parts], axis=1)
    hi = np.stack([p.log_z_hi for p in parts], axis=1)
    return logsumexp_rows(lo), logsumexp_rows(hi)


def midpoint(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(lo) & np.isfinite(hi), 0.5 * (lo + hi),
                        np.where(np.isfinite(hi), hi, lo))


__all__: List[str] = ["Part", "merge_top_k", "shard_keys", "merge_without_replacement",
                      "allocate_with_replacement", "gumbel", "merged_log_z", "midpoint",
                      "logsumexp_rows", "KeyedMerge"]
