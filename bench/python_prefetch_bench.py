#!/usr/bin/env python3
"""How much mining time negmine.Prefetcher hides behind training.

A fake training loop: per batch, mine k negatives for its queries, then a
"train step" of a fixed duration (a sleep: it holds no CPU, so this is the
overlap the client achieves when training runs elsewhere, e.g. on a GPU).
Against the real server (started here on generated targets), the loop runs
twice on the same batches:

  sequential   mine(batch i), then train(i)        wall = sum(mine) + sum(train)
  prefetcher   Prefetcher mines i+1.. while i trains

and reports both wall times and the fraction of the mining time hidden:
(wall_sequential - wall_prefetcher) / sum(mine). 1.0 means every mining call
overlapped a train step; the loop then costs max(train, mine) per batch
("ideal": the slower stream plus the first call). When mining is the slower
stream, it can exceed train/mine: with depth >= 2 the server works on two
batches at once, on more of its worker threads.

  build/venv/bin/python bench/python_prefetch_bench.py \
      --server-bin build/server/negmine-server --n 200000 --dim 64 \
      --batches 40 --batch-size 256 --k 64 --mode sample --temperature 0.05
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np

import negmine


def run_sequential(client: negmine.Client, batches: List[np.ndarray], train_s: float,
                   mine_kwargs: Dict[str, Any]) -> Dict[str, float]:
    mine_total = 0.0
    start = time.perf_counter()
    for q in batches:
        t0 = time.perf_counter()
        client.mine(q, **mine_kwargs)
        mine_total += time.perf_counter() - t0
        time.sleep(train_s)
    return {"wall": time.perf_counter() - start, "mine": mine_total}


def run_prefetched(client: negmine.Client, batches: List[np.ndarray], train_s: float,
                   depth: int, mine_kwargs: Dict[str, Any]) -> Dict[str, float]:
    waited = 0.0
    start = time.perf_counter()
    with negmine.Prefetcher(client, batches, depth=depth, **mine_kwargs) as pf:
        while True:
            t0 = time.perf_counter()
            try:
                next(pf)
            except StopIteration:
                break
            waited += time.perf_counter() - t0
            time.sleep(train_s)
    return {"wall": time.perf_counter() - start, "waited": waited}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-bin", required=True)
    p.add_argument("--n", type=int, default=200000, help="targets (generated, cosine)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--mode", default="sample", choices=["topk", "sample", "mixed"])
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--worker-threads", type=int, default=2)
    p.add_argument("--train-ratios", default="0.5,1,2",
                   help="train step durations, as multiples of the mean mining time")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()

    server = negmine.LocalServer(args.server_bin, [
        f"--worker_threads={args.worker_threads}", f"--default_dim={args.dim}",
        f"--generate_targets={args.n}", f"--generate_seed={args.seed}"]).start()
    try:
        server.wait_port(timeout=600)
        client = negmine.Client(server.address, timeout=600)
        client.wait_ready(timeout=600)
        rng = np.random.default_rng(args.seed)
        batches = [rng.standard_normal((args.batch_size, args.dim)).astype(np.float32)
                   for _ in range(args.batches)]
        mine_kwargs: Dict[str, Any] = dict(k=args.k, mode=args.mode, seed=args.seed)
        if args.mode != "topk":
            mine_kwargs["temperature"] = args.temperature
        for q in batches[:3]:  # warm up the server and the channel
            client.mine(q, **mine_kwargs)
        probe = run_sequential(client, batches, 0.0, mine_kwargs)
        mean_mine = probe["mine"] / len(batches)
        print(f"negmine prefetch bench: N = {args.n}, d = {args.dim}, {args.batches} batches "
              f"of {args.batch_size} queries, k = {args.k}, mode = {args.mode}, "
              f"depth = {args.depth}, server worker threads = {args.worker_threads}, "
              f"{os.cpu_count()} cores")
        print(f"mean mining call: {1e3 * mean_mine:.1f} ms")
        print(f"{'train/step':>10} {'mine total':>10} {'train total':>11} {'sequential':>10} "
              f"{'prefetcher':>10} {'ideal':>7} {'hidden':>7} {'exposed wait':>12}")
        rows = []
        for ratio in [float(r) for r in args.train_ratios.split(",")]:
            train_s = ratio * mean_mine
            seq = run_sequential(client, batches, train_s, mine_kwargs)
            pf = run_prefetched(client, batches, train_s, args.depth, mine_kwargs)
            hidden = (seq["wall"] - pf["wall"]) / seq["mine"]
            # Perfect overlap: the slower of the two streams, plus the one
            # call nothing can hide (the first batch's).
            ideal = max(seq["mine"], train_s * len(batches)) + seq["mine"] / len(batches)
            row = {"train_ratio": ratio, "train_step_s": train_s, "mine_total_s": seq["mine"],
                   "train_total_s": train_s * len(batches), "wall_sequential_s": seq["wall"],
                   "wall_prefetcher_s": pf["wall"], "wall_ideal_s": ideal,
                   "hidden_fraction": hidden,
                   "prefetcher_wait_s": pf["waited"]}
            rows.append(row)
            print(f"{1e3 * train_s:8.1f}ms {seq['mine']:9.2f}s {row['train_total_s']:10.2f}s "
                  f"{seq['wall']:9.2f}s {pf['wall']:9.2f}s {ideal:6.2f}s {100 * hidden:6.1f}% "
                  f"{pf['waited']:11.2f}s")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "mean_mine_s": mean_mine, "rows": rows}, f,
                          indent=2)
        client.close()
    finally:
        server.stop(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
