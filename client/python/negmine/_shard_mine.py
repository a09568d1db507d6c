"""ShardedClient.mine: fan-out to every shard and the exact merge.

Kept beside sharding.py (which binds it as a method) so that each file stays
readable; the merge math is in _shard_merge.py, the proof in docs/SHARDING.md.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from negmine import _arrays
from negmine import _shard_merge as merge
from negmine.client import DEFAULT_COLLECTION, to_torch
from negmine.errors import InvalidArgument, Unavailable
from negmine.types import MineResult

# Proposal sampler: any positive mixture weights give an exact global log q,
# so log Z_s is asked at this (cheap) width unless the caller sets one.
PROPOSAL_LOG_Z_WIDTH = 0.5
# Exact sampler: an undecided merge asks for a 100x narrower interval, down
# to this width (about the precision of a double's log).
MIN_LOG_Z_WIDTH = 1e-12
DEFAULT_LOG_Z_WIDTH = 1e-2


def _part(shard: int, r: MineResult) -> merge.Part:
    def a(x: Any) -> Any:
        return None if x is None else np.asarray(x)
    q = len(r.ids)
    lo = a(r.log_z_lo)
    hi = a(r.log_z_hi)
    return merge.Part(shard=shard, ids=a(r.ids).astype(np.int64), scores=a(r.scores),
                      log_q=a(r.log_q), counts=a(r.counts),
                      num_eligible=(a(r.num_eligible) if r.num_eligible is not None
                                    else np.zeros(q, dtype=np.int64)),
                      log_z_lo=None if lo is None else lo.astype(np.float64),
                      log_z_hi=None if hi is None else hi.astype(np.float64),
                      index_version=r.index_version)


def _empty(shard: int, q: int, n: int = 0) -> merge.Part:
    return merge.Part(shard=shard, ids=np.full((q, n), -1, dtype=np.int64),
                      scores=np.full((q, n), np.nan, dtype=np.float32),
                      log_q=np.full((q, n), np.nan, dtype=np.float32),
                      counts=np.zeros(q, dtype=np.int64),
                      num_eligible=np.zeros(q, dtype=np.int64),
                      log_z_lo=np.full(q, -np.inf), log_z_hi=np.full(q, -np.inf))


def _rows(lists: Optional[List[Sequence[int]]], rows: np.ndarray) -> Optional[List[Any]]:
    return None if lists is None else [lists[i] for i in rows]


def mine(self: Any, queries: Any, k: int, *, collection: str = DEFAULT_COLLECTION,
         mode: str = "topk", temperature: Optional[float] = None, num_hard: int = 0,
         exclude: Any = None, with_replacement: bool = False, rank_offset: int = 0,
         approximate: bool = False, beam_width: int = 0, sampler: str = "proposal",
         seed: int = 0, return_log_z: bool = False, log_z_width: float = 0.0,
         min_versions: Optional[Sequence[int]] = None, read_your_writes: bool = True,
         allow_partial: Optional[bool] = None, timeout: Optional[float] = None) -> MineResult:
    """Client.mine over all shards, merged exactly (see Client.mine for the
    arguments shared with it).

    Top-k (and the top part of "mixed", and the rank_offset window) is the
    global one. Samples follow the global softmax (sampler="exact") or the
    mixture of the shards' proposals weighted by their Z (sampler="proposal"),
    with or without replacement, and log_q is global.

    Args (beyond Client.mine's):
        min_versions: per shard, the index version to wait for (another
            client's versions()).
        read_your_writes: also require the versions of this client's writes.
        allow_partial: when a shard is down, merge the others' answers and
            report coverage < 1 instead of raising Unavailable (None: the
            client's default).

    Returns:
        MineResult, with extra fields: coverage (the fraction of targets on
        the shards that answered), missing_shards, shard_versions (per shard
        the version answered; -1: missing) and unresolved (queries whose
        exact-sampler merge stopped at MIN_LOG_Z_WIDTH undecided; 0 in
        practice).
    """
    k = int(k)
    hard = int(num_hard) if mode == "mixed" else 0
    if mode not in ("topk", "top_k", "sample", "mixed"):
        raise InvalidArgument(InvalidArgument.code,
                              f"mode = {mode!r}; expected one of ['mixed', 'sample', 'topk']")
    if k < 1 or not 0 <= hard <= k or rank_offset < 0:
        raise InvalidArgument(InvalidArgument.code,
                              f"k = {k}, num_hard = {num_hard}, rank_offset = {rank_offset}: "
                              "need k >= 1, 0 <= num_hard <= k, rank_offset >= 0")
    sampling = mode in ("sample", "mixed")
    if (sampling or return_log_z) and not (temperature and temperature > 0):
        raise InvalidArgument(InvalidArgument.code,
                              f"temperature = {temperature!r}; mode = {mode!r} "
                              f"(or return_log_z) needs one > 0")
    exact_sampler = sampler == "exact"
    like = queries
    if _arrays.is_torch(queries):
        queries = queries.detach().float().cpu().numpy()
    q_rows = _arrays.num_rows_cols(queries, "queries")[0]
    lists = _arrays.exclude_lists(exclude, q_rows)
    partial = self.allow_partial if allow_partial is None else allow_partial
    rng = np.random.default_rng(None if seed == 0 else [int(seed), 0x5EED])
    call_seed = int(seed) if seed else int(rng.integers(1, 2**63))
    dl = self._deadline(timeout)

    with self._gate.read():
        shards = self._read_shards()
        down: set = set()
        sizes = self._shard_sizes(collection, shards, dl, allow_partial=partial)
        known = [n for n in sizes if n is not None]
        mins = list(self._vers(collection)) if read_your_writes else [0] * len(self.shards)
        for s, v in enumerate(min_versions or ()):
            if s < len(mins):
                mins[s] = max(mins[s], int(v))
        answered: Dict[int, int] = {}
        if len(shards) == 1:
            # One shard is the whole collection: its answer is the answer.
            only = shards[0]
            r = self._fan([only], lambda s: self.shards[s].mine(
                queries, k, collection=collection, mode=mode, temperature=temperature,
                num_hard=num_hard, exclude=lists, with_replacement=with_replacement,
                rank_offset=rank_offset, approximate=approximate, beam_width=beam_width,
                sampler=sampler, seed=int(seed), return_log_z=return_log_z,
                log_z_width=log_z_width, min_index_version=mins[s],
                timeout=self._left(dl)), dl)[0][only]
            r.extra.update(coverage=1.0, missing_shards=[], unresolved=0,
                           shard_versions=[r.index_version])
            return to_torch(r, like.device) if _arrays.is_torch(like) else r

        def ask(want: int, excl: Optional[List[Any]], rows: Optional[np.ndarray] = None,
                **opts: Any) -> Dict[int, merge.Part]:
            """Each live shard's answer for `want` results per query."""
            sub = queries if rows is None else queries[rows]
            sub_excl = excl if rows is None else _rows(excl, rows)
            n = q_rows if rows is None else len(rows)
            live = [s for s in shards if s not in down]

            def one(s: int) -> merge.Part:
                for attempt in range(2):
                    size = sizes[s] or 0
                    k_s = min(want, size)
                    if k_s == 0:
                        sizes[s] = None if attempt == 0 else size
                        if attempt == 0:
                            self._shard_sizes(collection, [s], dl, refresh=True)
                            continue
                        return _empty(s, n)
                    o = dict(opts)
                    if "seed" in o:
                        o["seed"] = merge_seed(o["seed"], s, attempt)
                    r = self.shards[s].mine(sub, k_s, collection=collection, exclude=sub_excl,
                                            min_index_version=mins[s],
                                            timeout=self._left(dl), **o)
                    p = _part(s, r)
                    if k_s < want and np.any(p.num_eligible > k_s) and attempt == 0:
                        self._shard_sizes(collection, [s], dl, refresh=True)
                        continue  # the shard grew since its size was read
                    return p
                raise AssertionError("unreachable")

            got, lost = self._fan(live, one, dl, partial)
            down.update(lost)
            for s, p in got.items():
                answered[s] = p.index_version
            if not got:
                raise Unavailable(Unavailable.code, "no shard answered: " + ", ".join(
                    self._name(s) for s in sorted(down)))
            return got

        def merge_seed(base: int, s: int, attempt: int) -> int:
            from negmine.sharding import _shard_seed
            return _shard_seed(base, s, attempt)

        num_eligible = None
        top_ids = top_scores = top_counts = None
        log_z = None
        excl2 = lists
        top_k_needed = mode in ("topk", "top_k") or hard + rank_offset > 0
        if top_k_needed:
            kt = k if not sampling else hard
            parts = ask(rank_offset + kt, lists, mode="topk", approximate=approximate,
                        beam_width=beam_width, temperature=temperature,
                        return_log_z=return_log_z and not sampling, log_z_width=log_z_width)
            plist = [parts[s] for s in sorted(parts)]
            num_eligible = sum(p.num_eligible for p in plist)
            all_ids, _, all_counts = merge.merge_top_k(plist, rank_offset + kt)
            top_ids, top_scores, top_counts = merge.merge_top_k(plist, kt, skip=rank_offset)
            if return_log_z and not sampling:
                log_z = merge.merged_log_z(plist)
            if sampling:
                excl2 = []
                for i in range(q_rows):
                    base = list(lists[i]) if lists is not None else []
                    extra = all_ids[i, :all_counts[i]]
                    excl2.append(np.concatenate([np.asarray(base, dtype=np.int64),
                                                 extra]).tolist())
        m = k - hard if sampling else 0
        samp_ids = samp_scores = samp_logq = None
        samp_counts = np.zeros(q_rows, dtype=np.int64)
        unresolved = 0
        if m > 0:
            width0 = log_z_width or (DEFAULT_LOG_Z_WIDTH if exact_sampler
                                     else PROPOSAL_LOG_Z_WIDTH)
            parts = ask(m, excl2, mode="sample", temperature=temperature, sampler=sampler,
                        with_replacement=with_replacement, seed=call_seed,
                        return_log_z=True, log_z_width=width0)
            order = sorted(parts)
            plist = [parts[s] for s in order]
            if num_eligible is None:
                num_eligible = sum(p.num_eligible for p in plist)
            widths = {s: width0 for s in order}
            inv_tau = 1.0 / float(temperature)

            def tighten(amb: np.ndarray) -> bool:
                """Narrower log Z intervals where amb [Q, S'] says; False when
                every one asked for is already at the floor."""
                progressed = False
                for j, s in enumerate(order):
                    rows = np.nonzero(amb[:, j])[0]
                    if len(rows) == 0 or widths[s] <= MIN_LOG_Z_WIDTH:
                        continue
                    widths[s] = max(MIN_LOG_Z_WIDTH, widths[s] / 100.0)
                    r = self.shards[s].mine(queries[rows], 1, collection=collection,
                                            exclude=_rows(excl2, rows), mode="topk",
                                            temperature=temperature, return_log_z=True,
                                            log_z_width=widths[s],
                                            min_index_version=mins[s],
                                            timeout=self._left(dl))
                    p = parts[s]
                    p.log_z_lo[rows] = np.maximum(p.log_z_lo[rows], np.asarray(r.log_z_lo))
                    p.log_z_hi[rows] = np.minimum(p.log_z_hi[rows], np.asarray(r.log_z_hi))
                    progressed = True
                return progressed

            def bounds() -> Any:
                lo = np.stack([p.log_z_lo for p in plist], axis=1)
                hi = np.stack([p.log_z_hi for p in plist], axis=1)
                lo = np.where(np.isnan(lo), -np.inf, lo)
                hi = np.where(np.isnan(hi), -np.inf, hi)
                if not exact_sampler:
                    lo = hi = merge.midpoint(lo, hi)
                return lo, hi

            if with_replacement:
                u = rng.random((q_rows, m))
                while True:
                    lo, hi = bounds()
                    alloc, amb = merge.allocate_with_replacement(lo, hi, u)
                    nothing = np.all(~np.isfinite(hi), axis=1)  # no eligible target
                    alloc[nothing] = 0
                    amb[nothing] = False
                    if not amb.any() or not tighten(amb):
                        break
                if (alloc < 0).any():
                    mid = merge.midpoint(lo, hi)
                    unresolved = int((alloc < 0).any(axis=1).sum())
                    alloc = np.where(alloc < 0,
                                     merge.allocate_with_replacement(mid, mid, u)[0], alloc)
                # More draws where a shard got more slots than it returned.
                for j, s in enumerate(order):
                    p = parts[s]
                    for attempt in range(1, 50):
                        need = (alloc == j).sum(axis=1)
                        short = np.nonzero(need > p.counts)[0]
                        if len(short) == 0:
                            break
                        o = self.shards[s].mine(
                            queries[short], min(m, sizes[s] or m), collection=collection,
                            exclude=_rows(excl2, short), mode="sample",
                            temperature=temperature, sampler=sampler, with_replacement=True,
                            seed=merge_seed(call_seed, s, attempt), log_z_width=width0,
                            min_index_version=mins[s], timeout=self._left(dl))
                        extra = _part(s, o)
                        width = p.ids.shape[1] + extra.ids.shape[1]
                        grow = {}
                        for name, fill in (("ids", -1), ("scores", np.nan), ("log_q", np.nan)):
                            old = getattr(p, name)
                            new = np.full((q_rows, width), fill, dtype=old.dtype)
                            for i in range(q_rows):
                                new[i, :p.counts[i]] = old[i, :p.counts[i]]
                            grow[name] = new
                        for t, i in enumerate(short):
                            c, e = p.counts[i], extra.counts[t]
                            grow["ids"][i, c:c + e] = extra.ids[t, :e]
                            grow["scores"][i, c:c + e] = extra.scores[t, :e]
                            grow["log_q"][i, c:c + e] = extra.log_q[t, :e]
                            p.counts[i] += e
                        p.ids, p.scores, p.log_q = grow["ids"], grow["scores"], grow["log_q"]
                    need = (alloc == j).sum(axis=1)
                    if np.any(need > p.counts):
                        raise Unavailable(Unavailable.code,
                                          f"{self._name(s)} returned too few draws")
                # Slot t takes its shard's next draw.
                pos = np.zeros_like(alloc)
                for j in range(len(order)):
                    hit = alloc == j
                    pos = np.where(hit, np.cumsum(hit, axis=1) - 1, pos)
                sel_shard, sel_pos = alloc, pos
                samp_counts = np.where(nothing, 0, m).astype(np.int64)
            else:
                gum = [merge.gumbel(rng, p.ids.shape) for p in plist]
                while True:
                    lo, hi = bounds()
                    k_lo, k_hi = [], []
                    for j, p in enumerate(plist):
                        if exact_sampler:
                            logw = p.scores.astype(np.float64) * inv_tau
                            logw_lo = logw_hi = logw
                        else:
                            logw_lo = p.log_q.astype(np.float64) + lo[:, j:j + 1]
                            logw_hi = p.log_q.astype(np.float64) + hi[:, j:j + 1]
                        k_lo.append(merge.shard_keys(logw_lo, p.counts, lo[:, j], gum[j]))
                        k_hi.append(merge.shard_keys(logw_hi, p.counts, hi[:, j], gum[j]))
                    km = merge.merge_without_replacement(k_lo, k_hi, m)
                    if not km.ambiguous.any() or not exact_sampler or not tighten(km.ambiguous):
                        break
                unresolved = int(km.ambiguous.any(axis=1).sum()) if exact_sampler else 0
                sel_shard, sel_pos = km.shard, km.position
                samp_counts = km.counts
            # Gather the merged draws and their global log q.
            lo, hi = bounds()
            mid = merge.midpoint(lo, hi)
            log_total = merge.logsumexp_rows(mid)
            samp_ids = np.full((q_rows, m), -1, dtype=np.int64)
            samp_scores = np.full((q_rows, m), np.nan, dtype=np.float32)
            samp_logq = np.full((q_rows, m), np.nan, dtype=np.float32)
            for j, p in enumerate(plist):
                hit = (sel_shard == j) & (np.arange(m)[None, :] < samp_counts[:, None])
                if not hit.any():
                    continue
                r_idx, c_idx = np.nonzero(hit)
                src = sel_pos[r_idx, c_idx]
                samp_ids[r_idx, c_idx] = p.ids[r_idx, src]
                samp_scores[r_idx, c_idx] = p.scores[r_idx, src]
                if exact_sampler:
                    lq = p.scores[r_idx, src].astype(np.float64) * inv_tau - log_total[r_idx]
                else:
                    lq = p.log_q[r_idx, src].astype(np.float64) + mid[r_idx, j] \
                        - log_total[r_idx]
                samp_logq[r_idx, c_idx] = lq
            if return_log_z:
                log_z = (merge.logsumexp_rows(np.stack([p.log_z_lo for p in plist], 1)),
                         merge.logsumexp_rows(np.stack([p.log_z_hi for p in plist], 1)))

    # Assemble [top part | sampled part].
    width = k
    ids = np.full((q_rows, width), -1, dtype=np.int64)
    scores = np.full((q_rows, width), np.nan, dtype=np.float32)
    log_q = np.full((q_rows, width), np.nan, dtype=np.float32)
    num_top = np.zeros(q_rows, dtype=np.int64)
    counts = np.zeros(q_rows, dtype=np.int64)
    for i in range(q_rows):
        c = 0
        if top_ids is not None:
            t = int(top_counts[i])
            ids[i, :t], scores[i, :t] = top_ids[i, :t], top_scores[i, :t]
            c = t
        num_top[i] = c
        if samp_ids is not None:
            n = int(samp_counts[i])
            ids[i, c:c + n] = samp_ids[i, :n]
            scores[i, c:c + n] = samp_scores[i, :n]
            log_q[i, c:c + n] = samp_logq[i, :n]
            c += n
        counts[i] = c
    sizes_now = self._sizes.get(collection, [])
    known_sizes = [n for n in sizes_now if n is not None] or known
    mean = float(np.mean(known_sizes)) if known_sizes else 1.0
    def size_of(s: int) -> float:
        n = sizes_now[s] if s < len(sizes_now) else None
        return float(mean if n is None else n)
    total = sum(size_of(s) for s in shards)
    covered = sum(size_of(s) for s in shards if s not in down)
    coverage = 1.0 if total == 0 else covered / total
    shard_versions = [answered.get(s, -1) for s in range(len(self.shards))]
    out = MineResult(ids=ids, scores=scores, log_q=log_q, num_top=num_top, counts=counts,
                     index_version=min(answered.values()) if answered else 0,
                     log_z_lo=None if log_z is None else log_z[0],
                     log_z_hi=None if log_z is None else log_z[1],
                     num_eligible=num_eligible,
                     extra=dict(coverage=coverage, missing_shards=sorted(down),
                                shard_versions=shard_versions, unresolved=unresolved))
    if _arrays.is_torch(like):
        out = to_torch(out, like.device)
    return out
