"""Drift correction on a real training run: the WordNet dual encoder.

One model trains with in-batch negatives (batch 512, cosine, d = 64). After
``--warmup`` steps its target embeddings are loaded into six collections of
one negmine server, which then see the same stream for ``--steps`` more steps:

- ``stale``: nothing more;
- ``corr256`` / ``corr1024``: a drift update (landmarks re-encoded, ApplyDrift)
  every ``--update-every`` steps, m = 256 / 1024;
- ``rolling``: ``--reencode-frac`` of the targets re-encoded and upserted every
  step (round-robin over a fixed random order), no drift update;
- ``rolling_corr256`` / ``rolling_corr1024``: both.

At each checkpoint the figure is recall@64 of each collection's exact top-64
against the exact top-64 over the freshly re-encoded corpus, for
``--eval-queries`` training queries (the trainer's own use: mining for the
queries it trains on). ``--seed`` sets the model's initial weights and the
batch order; choose settings on one seed and report on another.

  build/venv/bin/python examples/wordnet/drift_run.py \\
      --server-bin build/server/negmine-server --seed 2 --out examples/wordnet/results/drift_seed2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import negmine  # noqa: E402
import wn_data  # noqa: E402
from model import DualEncoder  # noqa: E402

ARMS = {  # name: (num_landmarks or 0 for no drift update, rolling re-encode)
    "stale": (0, False),
    "corr256": (256, False),
    "corr1024": (1024, False),
    "rolling": (0, True),
    "rolling_corr256": (256, True),
    "rolling_corr1024": (1024, True),
}


def in_batch_loss(model: DualEncoder, qrows: torch.Tensor, trows: torch.Tensor,
                  tau: float) -> torch.Tensor:
    q = model.query(qrows)
    t = model.target(trows)
    logits = q @ t.T / tau
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(qrows)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-bin", required=True)
    p.add_argument("--out", required=True, help="results JSON (a .md table next to it)")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--checkpoints", default="50,100,200,400,800")
    p.add_argument("--update-every", type=int, default=50)
    p.add_argument("--reencode-frac", type=float, default=0.01)
    p.add_argument("--eval-queries", type=int, default=2000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.1)  # the WordNet example's
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--rebase-every-steps", type=int, default=0)
    p.add_argument("--rebase-residual", type=float, default=0.0)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--wordnet-dir", default=wn_data.WORDNET_DIR)
    args = p.parse_args(argv)
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    arms = args.arms.split(",")
    steps = max(checkpoints)
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    wn = wn_data.load_wordnet(args.wordnet_dir)
    buckets = 1 << 18
    split = wn_data.split_queries(len(wn.query_texts), seed=0)
    train = np.sort(np.concatenate([split.train, split.val]))
    tcsr = wn_data.featurize(wn.target_texts, buckets)
    qcsr = wn_data.featurize(wn.query_texts, buckets)
    n = len(wn.target_texts)
    torch.manual_seed(args.seed)
    model = DualEncoder(tcsr, qcsr, buckets, 64, 64, seed=args.seed)
    opts = model.optimizers(args.lr)
    rng = np.random.default_rng(args.seed)
    qt = torch.as_tensor(wn.query_target)
    eval_rows = torch.as_tensor(np.sort(rng.choice(train, args.eval_queries, replace=False)))
    order = rng.permutation(n)
    per_step = max(1, int(round(args.reencode_frac * n)))

    def train_step() -> float:
        rows = torch.as_tensor(rng.choice(train, args.batch, replace=False))
        for o in opts:
            o.zero_grad()
        loss = in_batch_loss(model, rows, qt[rows], args.tau)
        loss.backward()
        for o in opts:
            o.step()
        return float(loss)

    for _ in range(args.warmup):
        loss = train_step()
    print(f"warm-up {args.warmup} steps, loss {loss:.3f}", flush=True)

    server = negmine.LocalServer(args.server_bin, ["--wal_sync=never", "--worker_threads=2"])
    server.start().wait_port()
    results = {"args": vars(args), "checkpoints": [], "drift": {a: [] for a in arms}}
    try:
        client = negmine.Client(server.address, timeout=600.0)
        client.wait_ready(timeout=60.0)
        with torch.no_grad(), torch_threads(2):
            e0 = model.target.encode_all().numpy()
        for a in arms:
            m, _ = ARMS[a]
            kw = {}
            if m and args.rebase_every_steps:
                kw["rebase_every_steps"] = args.rebase_every_steps
            if m and args.rebase_residual:
                kw["rebase_residual"] = args.rebase_residual
            client.create_collection(a, 64, metric="cosine", index="exact", backend="cpu",
                                     num_landmarks=m or None, **kw)
            client.upsert(a, np.arange(n), e0, model_step=args.warmup)
        cursor = 0
        for s in range(1, steps + 1):
            loss = train_step()
            step = args.warmup + s
            if any(ARMS[a][1] for a in arms):
                rows = order[np.arange(cursor, cursor + per_step) % n]
                cursor += per_step
                with torch.no_grad():
                    v = model.target(torch.as_tensor(rows)).numpy()
                for a in arms:
                    if ARMS[a][1]:
                        client.upsert(a, rows, v, model_step=step)
            if s % args.update_every == 0 or s in checkpoints:
                for a in arms:
                    if not ARMS[a][0]:
                        continue
                    lm = client.landmarks(a)
                    with torch.no_grad():
                        g = model.target(torch.as_tensor(lm.ids)).numpy()
                    r = client.apply_drift(step, g, lm.epoch, collection=a)
                    results["drift"][a].append({
                        "step": s, "heldout_residual": r.heldout_residual,
                        "stale_residual": r.stale_residual, "kernel": r.kernel,
                        "rebased": r.rebased, "fit_s": r.fit_seconds, "apply_s": r.apply_seconds})
            if s in checkpoints:
                with torch.no_grad(), torch_threads(2):
                    fresh = model.target.encode_all()
                    q = model.query.encode_all(eval_rows)
                    truth = (q @ fresh.T).topk(args.k, dim=1).indices.numpy()
                point = {"step": s, "loss": loss}
                for a in arms:
                    got = client.mine(q.numpy(), args.k, collection=a).ids
                    hits = sum(len(set(got[i]) & set(truth[i])) for i in range(len(truth)))
                    point[a] = hits / truth.size
                results["checkpoints"].append(point)
                print(json.dumps(point), f"{time.perf_counter() - t_start:.0f}s", flush=True)
        client.close()
    finally:
        server.stop(timeout=20)
    results["seconds"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f)
    lines = ["| steps after load | " + " | ".join(arms) + " |",
             "| --- |" + " --- |" * len(arms)]
    for pnt in results["checkpoints"]:
        lines.append(f"| +{pnt['step']} | " + " | ".join(f"{pnt[a]:.3f}" for a in arms) + " |")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{results['seconds']:.0f} s")
    return 0


class torch_threads:
    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


if __name__ == "__main__":
    sys.exit(main())
