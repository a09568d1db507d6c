#!/usr/bin/env python3
"""WordNet: six ways to get negatives for one dual encoder, compared.

    build/venv/bin/python examples/wordnet/run.py \\
        --server-bin build/server/negmine-server --out-dir examples/wordnet/results
    ... --smoke          # every arm on a small subset, with sanity checks (under 2 min)
    ... --export-npy DIR # also write arm 5's target / held-out query embeddings

Writes results.json, results.md (the table) and recall_at_10.png (held-out
recall@10 against the step) to --out-dir. Exits non-zero on any error or, with
--smoke, on a failed check. See README.md in this folder for the protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
try:
    import negmine  # noqa: F401  (the installed package)
except ImportError:  # a source checkout without the venv: the package's own folder
    sys.path.insert(0, os.path.join(REPO, "client", "python"))
    import negmine  # noqa: F401

import wn_data  # noqa: E402
from arms import ARMS, ARM_TITLES, Config, Task, evaluate, train_arm  # noqa: E402
from model import DualEncoder  # noqa: E402


class Server:
    """A negmine server (negmine.LocalServer) with a client on it, and the
    collections of the experiment."""

    def __init__(self, binary: str, dim: int, num_landmarks: int, log_path: str) -> None:
        self.dim, self.num_landmarks = dim, num_landmarks
        self.local = negmine.LocalServer(binary, ["--wal_sync=never", "--worker_threads=2"],
                                         log_path=log_path)
        try:
            self.local.start().wait_port()
            self.client = negmine.Client(self.local.address, timeout=600.0)
            self.client.wait_ready(timeout=60.0)
        except BaseException:
            self.local.stop()
            raise

    def new_collection(self, name: str) -> str:
        """A fresh cosine tree collection of the experiment's dim."""
        self.client.create_collection(name, self.dim, metric="cosine", index="tree",
                                      backend="cpu", num_landmarks=self.num_landmarks)
        return name

    def close(self) -> None:
        """Stops the server and removes its data dir."""
        self.client.close()
        self.local.stop(timeout=20)


def build_task(args: argparse.Namespace, cfg: Config, log) -> tuple:
    """Loads WordNet (or its smoke subset), featurizes it, splits the queries."""
    t0 = time.perf_counter()
    wn = wn_data.load_wordnet(args.wordnet_dir)
    if args.smoke:
        wn = wn_data.subset(wn, args.smoke_targets, seed=cfg.seed)
    split = wn_data.split_queries(len(wn.query_texts), seed=args.split_seed)
    tcsr = wn_data.featurize(wn.target_texts, cfg.buckets)
    qcsr = wn_data.featurize(wn.query_texts, cfg.buckets)
    rng = np.random.default_rng(args.split_seed)
    curve = np.sort(rng.choice(split.heldout, min(cfg.curve_queries, len(split.heldout)),
                               replace=False))
    # The final run trains on the whole 80% (train + validation); --validate
    # trains on the train part and scores the validation part.
    train = np.sort(np.concatenate([split.train, split.val]))
    heldout = split.heldout
    if args.validate:
        train, heldout = split.train, split.val
        curve = np.sort(rng.choice(split.val, min(cfg.curve_queries, len(split.val)), replace=False))
    task = Task(model_fn=lambda: DualEncoder(tcsr, qcsr, cfg.buckets, cfg.hidden, cfg.dim,
                                             seed=cfg.seed),
                num_targets=len(wn.target_texts), query_target=wn.query_target,
                train=train, heldout=heldout, curve=curve)
    log(f"WordNet: {len(wn.target_texts)} targets, {len(wn.query_texts)} queries "
        f"({len(split.train)} train, {len(split.val)} validation, {len(split.heldout)} held out); "
        f"features {tcsr[0][-1] / len(wn.target_texts):.1f} per target, "
        f"{qcsr[0][-1] / len(wn.query_texts):.1f} per query; {time.perf_counter() - t0:.1f}s")
    return task, split


def expected_index_encodings(arm: str, r: Dict[str, Any], cfg: Config, n: int) -> int:
    """The index encodings an arm must have spent, from the protocol alone."""
    steps = r["steps"]
    if arm == "inbatch":
        return 0
    if arm == "ance":
        return n * -(-steps // cfg.ance_every)
    if arm in ("oracle_topk", "oracle_sample"):
        return n * -(-steps // cfg.oracle_every)
    updates = (steps - 1) // cfg.drift_every if steps > 0 else 0
    return n + updates * (r["drift"]["landmark_encodings"] // max(1, r["drift"]["updates"])
                          + min(cfg.reencode_budget, n))


def write_table(results: Dict[str, Any], path: str, cmd: str) -> str:
    """The markdown table of the arms' figures."""
    n_oracle = results["arms"].get("oracle_topk", {}).get("index_encodings")
    lines = [f"Command: `{cmd}`", "",
             f"{results['num_targets']} targets, {results['num_train']} training queries, "
             f"{results['num_heldout']} held-out queries; {results['config']['steps']} steps "
             f"of {results['config']['batch_size']} queries, k = {results['config']['k']}, "
             f"tau = {results['config']['temperature']}.", "",
             "| arm | recall@1 | recall@10 | recall@100 | index target encodings | vs oracle | "
             "loss encodings | s / step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    u = results["untrained"]
    lines.append(f"| untrained encoder | {u['recall@1']:.4f} | {u['recall@10']:.4f} | "
                 f"{u['recall@100']:.4f} | | | | |")
    for arm in ARMS:
        r = results["arms"].get(arm)
        if r is None:
            continue
        h = r["heldout"]
        share = (f"{100 * r['index_encodings'] / n_oracle:.2f}%" if n_oracle else "")
        loss_enc = r["loss_encodings"] + r["gradcache_extra_encodings"]
        lines.append(f"| {r['title']} | {h['recall@1']:.4f} | {h['recall@10']:.4f} | "
                     f"{h['recall@100']:.4f} | {r['index_encodings']:,} | {share} | "
                     f"{loss_enc:,} | {r['seconds_per_step']:.3f} |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def plot(results: Dict[str, Any], path: str) -> None:
    """Held-out recall@10 (the curve's query subset) against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in ARMS:
        r = results["arms"].get(arm)
        if r is None:
            continue
        ax.plot([p["step"] for p in r["curve"]], [p["recall@10"] for p in r["curve"]],
                marker="o", ms=3, label=r["title"])
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out recall@10 ({results['curve_queries']} queries)")
    ax.set_title(f"WordNet: {results['num_targets']} synsets, d = {results['config']['dim']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smoke_checks(results: Dict[str, Any], cfg: Config, task: Task) -> List[str]:
    """Sanity checks that can fail; returns the failures."""
    fails = []
    ut = results["untrained_train"]["recall@10"]
    for arm, r in results["arms"].items():
        if r["steps"] != cfg.steps:
            fails.append(f"{arm}: ran {r['steps']} of {cfg.steps} steps")
        want = expected_index_encodings(arm, r, cfg, task.num_targets)
        if r["index_encodings"] != want:
            fails.append(f"{arm}: {r['index_encodings']} index encodings, expected {want}")
        k_arm = 0 if arm == "inbatch" else cfg.k
        want_loss = r["steps"] * cfg.batch_size * (1 + k_arm)
        if r["loss_encodings"] != want_loss:
            fails.append(f"{arm}: {r['loss_encodings']} loss encodings, expected {want_loss}")
        if r["train_recall"]["recall@10"] <= ut:
            fails.append(f"{arm}: recall@10 on training queries {r['train_recall']['recall@10']:.4f}"
                         f" does not beat the untrained encoder's {ut:.4f}")
        if not r["loss_last"] < r["loss_first"]:
            fails.append(f"{arm}: the loss did not fall ({r['loss_first']:.3f} -> {r['loss_last']:.3f})")
        c = r["checks"]
        if k_arm and c["mined"] != r["steps"] * cfg.batch_size * cfg.k:
            fails.append(f"{arm}: {c['mined']} mined negatives, expected {r['steps'] * cfg.batch_size * cfg.k}")
        if c["mined_positive"] or c["nonfinite_log_q"] or c["padded"]:
            fails.append(f"{arm}: mined checks {c}")
        if "drift" in r:
            d = r["drift"]
            want_updates = (r["steps"] - 1) // cfg.drift_every
            if d["updates"] != want_updates:
                fails.append(f"{arm}: {d['updates']} drift updates, expected {want_updates}")
            if d["landmark_encodings"] != d["updates"] * cfg.num_landmarks:
                fails.append(f"{arm}: {d['landmark_encodings']} landmark encodings for "
                             f"{d['updates']} updates of {cfg.num_landmarks}")
            if r["index_encodings"] != task.num_targets + d["encodings_spent"]:
                fails.append(f"{arm}: index encodings {r['index_encodings']} != N + the "
                             f"updater's {d['encodings_spent']}")
    if "negmine_gcbs" in results["arms"] and not results["arms"]["negmine_gcbs"].get("gcbs"):
        fails.append("negmine_gcbs: no GCBS assignment was made")
    return fails


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the experiment; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-bin", required=True, help="the negmine-server binary")
    p.add_argument("--out-dir", required=True, help="where results.json, results.md and the plot go")
    p.add_argument("--wordnet-dir", default=wn_data.WORDNET_DIR)
    p.add_argument("--smoke", action="store_true", help="a small subset, every arm, sanity checks")
    p.add_argument("--smoke-targets", type=int, default=3000)
    p.add_argument("--validate", action="store_true",
                   help="score on the validation split (carved out of the training queries) "
                        "instead of the held-out one: for choosing hyperparameters")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--export-npy", metavar="DIR",
                   help="write arm 5's target and held-out query embeddings (float32 .npy)")
    p.add_argument("--split-seed", type=int, default=0)
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                       help=f"(default {f.default}; smoke: see README)")
    args = p.parse_args(argv)

    cfg = Config()
    if args.smoke:
        cfg = dataclasses.replace(cfg, steps=40, batch_size=32, k=4, eval_every=20,
                                  ance_every=20, oracle_every=2, drift_every=5,
                                  num_landmarks=64, reencode_budget=64, gc_chunk=16,
                                  curve_queries=400)
    for f in dataclasses.fields(Config):
        v = getattr(args, f.name)
        if v is not None:
            cfg = dataclasses.replace(cfg, **{f.name: v})
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        p.error(f"unknown arms {bad}; choose from {ARMS}")
    os.makedirs(args.out_dir, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    torch.set_num_threads(cfg.threads)
    t_all = time.perf_counter()
    task, split = build_task(args, cfg, log)
    untrained_model = task.model_fn()
    untrained = evaluate(untrained_model, task.heldout, task.query_target)
    train_probe = np.sort(np.random.default_rng(7).choice(task.train, min(1000, len(task.train)),
                                                          replace=False))
    untrained_train = evaluate(untrained_model, train_probe, task.query_target)
    del untrained_model
    log(f"untrained encoder: held-out {untrained}")
    results: Dict[str, Any] = {
        "config": dataclasses.asdict(cfg), "smoke": args.smoke, "validate": args.validate,
        "num_targets": task.num_targets, "num_train": len(task.train),
        "num_heldout": len(task.heldout), "curve_queries": len(task.curve),
        "untrained": untrained, "untrained_train": untrained_train, "arms": {},
        "torch": torch.__version__,
    }
    server = None
    try:
        if any(a.startswith("negmine") for a in arms):
            server = Server(args.server_bin, cfg.dim, cfg.num_landmarks,
                            os.path.join(tempfile.gettempdir(), f"negmine-wordnet-server-{os.getpid()}.log"))
        for arm in arms:
            log(f"== {ARM_TITLES[arm]}")
            r = train_arm(arm, task, cfg, server=server, log=log)
            model = r.pop("model")
            r["train_recall"] = evaluate(model, train_probe, task.query_target)
            torch.set_num_threads(cfg.threads)
            if arm == "negmine" and args.export_npy:
                os.makedirs(args.export_npy, exist_ok=True)
                with torch.no_grad():
                    np.save(os.path.join(args.export_npy, "targets.npy"),
                            model.target.encode_all().numpy().astype(np.float32))
                    np.save(os.path.join(args.export_npy, "queries.npy"),
                            model.query.encode_all(torch.as_tensor(task.heldout)).numpy().astype(np.float32))
                    np.save(os.path.join(args.export_npy, "query_positives.npy"),
                            task.query_target[task.heldout].astype(np.int64))
                log(f"  exported arm 5's embeddings to {args.export_npy}")
            results["arms"][arm] = r
            with open(os.path.join(args.out_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    finally:
        if server is not None:
            server.close()
    results["total_seconds"] = time.perf_counter() - t_all
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    cmd = "python examples/wordnet/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log(write_table(results, os.path.join(args.out_dir, "results.md"), cmd))
    plot(results, os.path.join(args.out_dir, "recall_at_10.png"))
    log(f"total {results['total_seconds']:.0f}s; wrote {args.out_dir}")
    if args.smoke:
        fails = smoke_checks(results, cfg, task)
        if args.export_npy and "negmine" in results["arms"]:
            t = np.load(os.path.join(args.export_npy, "targets.npy"))
            q = np.load(os.path.join(args.export_npy, "queries.npy"))
            if t.shape != (task.num_targets, cfg.dim) or q.shape != (len(task.heldout), cfg.dim) \
                    or t.dtype != np.float32:
                fails.append(f"export: shapes {t.shape} {q.shape} dtype {t.dtype}")
        for f in fails:
            log("SMOKE FAIL: " + f)
        if fails:
            return 1
        log("smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
