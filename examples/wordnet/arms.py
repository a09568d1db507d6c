"""The six training arms of the WordNet experiment, one loop.

Every arm trains the same model (same seed, so the same initial weights) for
the same number of steps, with the same batch size, temperature, optimizer and
loss (``negmine.gradcache.sampled_softmax_loss``: each query's positive, the
other positives of the batch, and k extra negatives per query, corrected by
log(k q) when they were sampled). Only where the extra negatives come from
differs:

1. ``inbatch``: none (in-batch negatives only).
2. ``ance``: the top-k of a static index: every ``ance_every`` steps the whole
   corpus is re-encoded; between rebuilds the current query tower searches the
   stale target embeddings.
3. ``oracle_topk``: the exact top-k of the current target tower, the corpus
   re-encoded every ``oracle_every`` steps.
4. ``oracle_sample``: k draws (with replacement) from the exact softmax of
   the same re-encoded corpus, with their exact log q: the ideal sampler.
5. ``negmine``: the targets live in a negmine server (a tree collection); k
   draws from its tree proposal with log q; every ``drift_every`` steps the
   server corrects all targets from ``num_landmarks`` re-encoded landmarks
   (``negmine.DriftUpdater``), and ``reencode_budget`` targets (rolling) are
   re-encoded and upserted exactly; the batch's gradient through GradCache.
6. ``negmine_gcbs``: arm 5, with batches from ``Client.assign_batches`` (global
   contrastive batch sampling), recomputed each epoch from the current query
   embeddings and the server's (drift-corrected) target vectors.

Target encodings are counted in two kinds: *index* encodings (targets
encoded to build or refresh what the negatives are mined from; the figure the
experiment compares) and *loss* encodings (the positives and negatives that
enter the loss, with a graph; GradCache adds one graph-free pass over them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from model import DualEncoder

ARMS = ("inbatch", "ance", "oracle_topk", "oracle_sample", "negmine", "negmine_gcbs")
ARM_TITLES = {
    "inbatch": "1. in-batch negatives only",
    "ance": "2. ANCE-style static index",
    "oracle_topk": "3. brute-force oracle, top-k",
    "oracle_sample": "4. brute-force oracle, softmax samples",
    "negmine": "5. negmine (tree proposal + drift + GradCache)",
    "negmine_gcbs": "6. negmine + GCBS batches",
}


@dataclasses.dataclass
class Config:
    """The protocol: one setting for every arm (see README.md for how it was chosen)."""

    steps: int = 600
    batch_size: int = 128
    k: int = 8                    # extra negatives per query (arms 2-6)
    temperature: float = 0.05
    lr: float = 0.1
    seed: int = 1
    hidden: int = 64              # the hashed table's width
    dim: int = 64                 # the towers' output (cosine)
    buckets: int = 1 << 18
    ance_every: int = 100         # arm 2: corpus re-encode + rebuild period
    oracle_every: int = 5         # arms 3, 4: corpus re-encode period
    drift_every: int = 10         # arms 5, 6: drift update period
    num_landmarks: int = 256      # arms 5, 6: landmarks per update (4 x dim)
    reencode_budget: int = 512    # arms 5, 6: targets re-encoded per update
    gc_chunk: int = 64            # GradCache chunk size
    eval_every: int = 60          # steps between points of the curve
    curve_queries: int = 1000     # held-out queries scored for the curve
    max_train_seconds: float = 0.0  # 0: none; else an arm stops early (reported)
    threads: int = 2              # torch threads for bulk work (corpus encodes, brute force)


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs the block with ``n`` torch threads. Training steps run on one:
    their ops are small, and on a shared machine a second OpenMP thread that
    is descheduled stalls every parallel region."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclasses.dataclass
class Task:
    """What the arms train on. Rows index the model's query / target corpora."""

    model_fn: Callable[[], DualEncoder]
    num_targets: int
    query_target: np.ndarray      # positive target row per query row
    train: np.ndarray             # query rows to train on
    heldout: np.ndarray           # query rows for the final figures
    curve: np.ndarray             # query rows for the curve (a subset of heldout)


@torch.no_grad()
def evaluate(model: DualEncoder, qrows: np.ndarray, query_target: np.ndarray,
             ks=(1, 10, 100), targets: Optional[torch.Tensor] = None,
             chunk: int = 1024) -> Dict[str, float]:
    """recall@k of ``qrows`` over all targets (exact, brute force): the share of
    queries whose positive ranks in the top k (rank = targets scoring above it),
    on the current torch threads."""
    e = model.target.encode_all() if targets is None else targets
    q = model.query.encode_all(torch.as_tensor(qrows))
    pos = torch.as_tensor(query_target[qrows])
    ranks = []
    for a in range(0, len(qrows), chunk):
        s = q[a:a + chunk] @ e.T
        sp = s.gather(1, pos[a:a + chunk, None])
        ranks.append((s > sp).sum(1))
    r = torch.cat(ranks)
    return {f"recall@{k}": float((r < k).float().mean()) for k in ks}


@torch.no_grad()
def index_staleness(model: DualEncoder, client: Any, coll: str, task: Task) -> Dict[str, float]:
    """How far the server's view of the targets is from the trained target
    tower: the mean cosine between each target's fresh encoding and the
    server's scored (drift-corrected) vector, and its stored vector as sent
    (no correction); and the curve queries' recall@10 when the current query
    tower searches each of the three (fresh, scored, stored)."""
    ids = np.arange(task.num_targets)
    fresh = model.target.encode_all()
    out: Dict[str, float] = {}
    views = {"fresh": fresh}
    for name, scored in (("scored", True), ("stored", False)):
        v, _ = client.get(coll, ids, scored=scored)
        views[name] = torch.nn.functional.normalize(torch.as_tensor(np.asarray(v, np.float32)), dim=1)
        out[f"cos_fresh_{name}"] = float((views[name] * fresh).sum(1).mean())
    for name, e in views.items():
        out[f"curve_recall@10_{name}"] = evaluate(model, task.curve, task.query_target,
                                                  ks=(10,), targets=e)["recall@10"]
    return out


class Schedule:
    """Batches of training query rows, epoch after epoch; full batches only."""

    def __init__(self, train: np.ndarray, batch_size: int, seed: int,
                 gcbs: Optional[Callable[[int, np.ndarray], List[np.ndarray]]] = None) -> None:
        self.train, self.b, self.gcbs = train, batch_size, gcbs
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.queue: List[np.ndarray] = []
        self.epoch_stats: List[Dict[str, Any]] = []

    def next(self, step: int) -> np.ndarray:
        """The next batch (query rows); a new epoch when the last one is used up."""
        if not self.queue:
            if self.gcbs is not None:
                batches = self.gcbs(step, self.train)
            else:
                perm = self.train[self.rng.permutation(len(self.train))]
                batches = [perm[i:i + self.b] for i in range(0, len(perm), self.b)]
            self.queue = [b for b in batches if len(b) == self.b]
            if not self.queue:
                raise RuntimeError(f"no full batch of {self.b} in {len(self.train)} examples")
            self.epoch += 1
        return self.queue.pop(0)


def softmax_draws(s: torch.Tensor, tau: float, k: int, gen: torch.Generator):
    """k draws with replacement per row from softmax(s / tau), exactly, and
    their log-probabilities: inverse CDF over each row's cumulative weights
    (-inf scores have weight 0 and are never drawn)."""
    m = s.max(dim=1, keepdim=True).values
    w = ((s - m) / tau).exp_()
    cdf = w.cumsum_(dim=1)
    z = cdf[:, -1:]
    u = torch.rand(s.shape[0], k, generator=gen, dtype=cdf.dtype) * z
    ids = torch.searchsorted(cdf, u, right=True).clamp_(max=s.shape[1] - 1)
    log_q = (s.gather(1, ids) - m) / tau - z.log()
    return ids, log_q


def _mask_rows(s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return s.scatter(1, pos[:, None], -math.inf)


def train_arm(arm: str, task: Task, cfg: Config, server: Any = None,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Trains one arm from the common initial model; returns its figures.

    ``server`` (arms 5, 6): an object with ``client`` (a ``negmine.Client``)
    and ``new_collection(name) -> str``. The trained model is in the result
    under ``"model"``.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; one of {ARMS}")
    import negmine
    from negmine.gradcache import GradCache, sampled_softmax_loss

    torch.manual_seed(cfg.seed)
    model = task.model_fn()
    opts = model.optimizers(cfg.lr)
    n, b, k, tau = task.num_targets, cfg.batch_size, cfg.k, cfg.temperature
    qt = torch.as_tensor(task.query_target)
    all_rows = torch.arange(n)

    counts = {"index_encodings": 0, "loss_encodings": 0, "gradcache_extra_encodings": 0,
              "gcbs_query_encodings": 0}
    timing = {"train_s": 0.0, "mine_s": 0.0, "refresh_s": 0.0, "drift_s": 0.0,
              "gcbs_s": 0.0, "eval_s": 0.0}
    curve: List[Dict[str, float]] = []
    checks = {"mined": 0, "mined_positive": 0, "padded": 0, "nonfinite_log_q": 0}
    index: Optional[torch.Tensor] = None
    client = coll = updater = gc = None
    drift_log: List[Dict[str, Any]] = []

    if arm in ("negmine", "negmine_gcbs"):
        if server is None:
            raise ValueError(f"arm {arm} needs a negmine server")
        client = server.client
        coll = server.new_collection(arm)
        t0 = time.perf_counter()
        with torch_threads(cfg.threads):
            e0 = model.target.encode_all()
        counts["index_encodings"] += n
        client.upsert(coll, np.arange(n), e0.numpy(), model_step=0)
        timing["refresh_s"] += time.perf_counter() - t0
        updater = negmine.DriftUpdater(
            client, coll, encode=lambda ids: model.target(torch.as_tensor(ids)),
            every=cfg.drift_every, reencode_budget=cfg.reencode_budget,
            target_ids=np.arange(n), seed=cfg.seed)
        gc = GradCache(model.query, model.target, chunk_size=cfg.gc_chunk,
                       batch_size=b, partial="keep")

    gcbs_fn = None
    if arm == "negmine_gcbs":
        def gcbs_fn(step: int, train: np.ndarray) -> List[np.ndarray]:
            t0 = time.perf_counter()
            with torch_threads(cfg.threads):
                qe = model.query.encode_all(torch.as_tensor(train)).numpy()
            counts["gcbs_query_encodings"] += len(train)
            pos = task.query_target[train]
            uniq, inv = np.unique(pos, return_inverse=True)
            vecs, _ = client.get(coll, uniq, scored=True)
            pe = np.ascontiguousarray(np.asarray(vecs, np.float32)[inv])
            ba = client.assign_batches(qe, pe, b, seed=cfg.seed + step)
            batches = [train[np.asarray(x, np.int64)] for x in ba.batches]
            timing["gcbs_s"] += time.perf_counter() - t0
            stats = {"step": step, "in_batch_similarity_before": ba.in_batch_similarity_before,
                     "in_batch_similarity_after": ba.in_batch_similarity_after,
                     "batches": len(batches), "seconds": ba.seconds}
            sched.epoch_stats.append(stats)
            log(f"  [{arm}] GCBS at step {step}: in-batch similarity "
                f"{ba.in_batch_similarity_before:.3f} -> {ba.in_batch_similarity_after:.3f}")
            return batches
    sched = Schedule(task.train, b, cfg.seed, gcbs_fn)

    def eval_point(step: int) -> None:
        t0 = time.perf_counter()
        with torch_threads(cfg.threads):
            r = evaluate(model, task.curve, task.query_target)
        timing["eval_s"] += time.perf_counter() - t0
        curve.append({"step": step, **r})
        log(f"  [{arm}] step {step:5d}  curve recall@10 {r['recall@10']:.4f}  "
            f"train {timing['train_s']:.1f}s")

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.set_num_threads(1)
    eval_point(0)
    steps_done = 0
    losses: List[float] = []
    for step in range(cfg.steps):
        if cfg.max_train_seconds and timing["train_s"] > cfg.max_train_seconds:
            log(f"  [{arm}] stopped at step {step}: train time over {cfg.max_train_seconds}s")
            break
        t_step = time.perf_counter()
        rows = sched.next(step)
        qr = torch.as_tensor(rows)
        pos = qt[qr]
        neg_ids = neg_log_q = neg_mask = None

        if arm in ("ance", "oracle_topk", "oracle_sample"):
            every = cfg.ance_every if arm == "ance" else cfg.oracle_every
            if step % every == 0:
                t0 = time.perf_counter()
                with torch_threads(cfg.threads):
                    index = model.target.encode_all()
                counts["index_encodings"] += n
                timing["refresh_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad(), torch_threads(cfg.threads):
                s = _mask_rows(model.query(qr) @ index.T, pos)
                if arm == "oracle_sample":
                    neg_ids, neg_log_q = softmax_draws(s, tau, k, gen)
                else:
                    neg_ids = s.topk(k, dim=1).indices
            timing["mine_s"] += time.perf_counter() - t0
        elif arm in ("negmine", "negmine_gcbs"):
            t0 = time.perf_counter()
            res = updater.maybe_update(step)
            if res is not None:
                drift_log.append({"step": step, "heldout_residual": res.heldout_residual,
                                  "stale_residual": res.stale_residual, "kernel": res.kernel})
            timing["drift_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            q_emb = gc.encode(qr, which="query")
            r = client.mine(q_emb.numpy(), k, collection=coll, mode="sample",
                            temperature=tau, exclude=pos.numpy(), with_replacement=True,
                            seed=cfg.seed * 100003 + step + 1)
            ids = torch.as_tensor(np.asarray(r.ids, np.int64))
            lq = torch.as_tensor(np.asarray(r.log_q, np.float32))
            neg_mask = ids >= 0
            checks["padded"] += int((~neg_mask).sum())
            checks["nonfinite_log_q"] += int((~torch.isfinite(lq[neg_mask])).sum())
            neg_log_q = torch.where(neg_mask, lq, torch.full_like(lq, math.inf))
            neg_ids = ids.clamp(min=0)
            timing["mine_s"] += time.perf_counter() - t0

        if neg_ids is not None:
            checks["mined"] += int(neg_ids.numel())
            checks["mined_positive"] += int((neg_ids == pos[:, None]).sum())

        for o in opts:
            o.zero_grad()
        if gc is not None:
            loss = gc.step(qr, pos, negatives=neg_ids.reshape(-1), negative_log_q=neg_log_q,
                           negative_mask=neg_mask, temperature=tau)
            counts["gradcache_extra_encodings"] += b * (1 + k)
        else:
            qv = model.query(qr)
            tv = model.target(pos)
            nv = None
            if neg_ids is not None:
                nv = model.target(neg_ids.reshape(-1)).reshape(b, k, -1)
            lt = sampled_softmax_loss(qv, tv, nv, neg_log_q, temperature=tau)
            lt.backward()
            loss = float(lt)
        counts["loss_encodings"] += b * (1 + (k if neg_ids is not None else 0))
        for o in opts:
            o.step()
        losses.append(float(loss))
        timing["train_s"] += time.perf_counter() - t_step
        steps_done = step + 1
        if steps_done % cfg.eval_every == 0 or steps_done == cfg.steps:
            eval_point(steps_done)

    if updater is not None:
        counts["index_encodings"] += updater.encodings_spent
    t0 = time.perf_counter()
    with torch_threads(cfg.threads):
        final = evaluate(model, task.heldout, task.query_target)
    timing["eval_s"] += time.perf_counter() - t0
    staleness = None
    if client is not None:
        with torch_threads(cfg.threads):
            staleness = index_staleness(model, client, coll, task)
        log(f"  [{arm}] the server's vectors at the end: {staleness}")
    out: Dict[str, Any] = {
        "arm": arm, "title": ARM_TITLES[arm], "steps": steps_done, "heldout": final,
        "curve": curve, **counts, "timing": timing,
        "seconds_per_step": timing["train_s"] / max(1, steps_done),
        "loss_first": float(np.mean(losses[:10])) if losses else math.nan,
        "loss_last": float(np.mean(losses[-10:])) if losses else math.nan,
        "checks": checks, "epochs": sched.epoch, "model": model,
    }
    if staleness is not None:
        out["staleness"] = staleness
    if updater is not None:
        out["drift"] = {"updates": updater.updates, "landmark_encodings": updater.landmark_encodings,
                        "reencode_encodings": updater.reencode_encodings,
                        "encodings_spent": updater.encodings_spent, "log": drift_log}
    if arm == "negmine_gcbs":
        out["gcbs"] = sched.epoch_stats
    log(f"  [{arm}] done: {steps_done} steps, {out['seconds_per_step']:.3f} s/step, "
        f"held-out recall@10 {final['recall@10']:.4f}, index encodings {counts['index_encodings']}")
    return out
