#!/usr/bin/env python3
"""Sharding bench: throughput and latency of negmine.ShardedClient with 1, 2
and 4 shards on one machine, and the client-side merge cost and wire bytes
that the 16-machine projection in BENCHMARKS.md uses.

Every shard is a negmine-server process on loopback with `--worker_threads`
threads; all of them share this machine's cores, so S shards on one machine
measure the fan-out and merge overhead, not the scale-out (on S machines each
shard has its own cores and 1/S of the targets).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE nice build/venv/bin/python \
        bench/shard_bench.py --server-bin build/server/negmine-server

Prints one markdown table row per (shards, mode) and the merge timings.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import negmine
from negmine import _shard_merge as merge
from negmine.v1 import negmine_pb2 as pb


def percentile(xs, p):
    return float(np.percentile(np.asarray(xs) * 1e3, p))


def run(args, shards: int, x: np.ndarray, queries: np.ndarray) -> list:
    servers = [negmine.LocalServer(args.server_bin, [f"--worker_threads={args.threads}"])
               .start() for _ in range(shards)]
    rows = []
    try:
        for s in servers:
            s.wait_port()
        c = negmine.ShardedClient([s.address for s in servers], timeout=600)
        c.create_collection("bench", x.shape[1], metric="cosine")
        ids = np.arange(len(x), dtype=np.int64)
        c.upsert("bench", ids, x)
        modes = {
            "top-k": dict(mode="topk"),
            "sample proposal": dict(mode="sample", temperature=0.05),
            "sample exact": dict(mode="sample", temperature=0.05, sampler="exact"),
        }
        for name, opts in modes.items():
            c.mine(queries[:args.batch], args.k, collection="bench", seed=1, **opts)  # warm
            lat = []
            t0 = time.perf_counter()
            for r in range(args.rounds):
                b = queries[(r * args.batch) % len(queries):][:args.batch]
                t = time.perf_counter()
                c.mine(b, args.k, collection="bench", seed=r + 1, **opts)
                lat.append(time.perf_counter() - t)
            wall = time.perf_counter() - t0
            rows.append((shards, name, args.rounds * args.batch / wall, percentile(lat, 50),
                         percentile(lat, 99)))
        c.close()
    finally:
        for s in servers:
            s.stop()
    return rows


def merge_cost(k: int, batch: int, shards: int, reps: int = 20) -> dict:
    """Client-side merge time per batch for `shards` synthetic answers."""
    rng = np.random.default_rng(0)
    parts = []
    for s in range(shards):
        ids = rng.integers(0, 1 << 40, size=(batch, k)).astype(np.int64)
        scores = np.sort(rng.random((batch, k)).astype(np.float32), axis=1)[:, ::-1]
        parts.append(merge.Part(shard=s, ids=ids, scores=scores.copy(),
                                log_q=np.log(np.full((batch, k), 1e-4, np.float32)),
                                counts=np.full(batch, k), num_eligible=np.full(batch, 10**6),
                                log_z_lo=np.full(batch, 5.0), log_z_hi=np.full(batch, 5.0)))
    t = time.perf_counter()
    for _ in range(reps):
        merge.merge_top_k(parts, k)
    top = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(reps):
        keys = [merge.shard_keys(p.log_q.astype(np.float64) + 5.0, p.counts, p.log_z_lo,
                                 merge.gumbel(rng, p.ids.shape)) for p in parts]
        merge.merge_without_replacement(keys, keys, k)
    wor = (time.perf_counter() - t) / reps
    return {"top-k": top, "without replacement": wor}


def wire_bytes(dim: int, k: int) -> dict:
    """Serialized bytes per query to and from one shard (float32 queries)."""
    q = np.zeros((1, dim), np.float32)
    req = pb.MineRequest(collection="bench",
                         queries=pb.Matrix(rows=1, cols=dim, dtype=pb.DTYPE_FLOAT32,
                                           data=q.tobytes()),
                         params=pb.MineParams(k=k))
    res = pb.QueryNegatives(ids=[(1 << 40) + i for i in range(k)], scores=[0.5] * k,
                            log_q=[-9.0] * k, log_z_lo=5.0, log_z_hi=5.01, num_eligible=10**8)
    return {"request": req.ByteSize(), "response": pb.MineResponse(results=[res]).ByteSize()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--targets", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="worker threads per shard")
    ap.add_argument("--shards", default="1,2,4")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(64, args.dim))
    x = (centers[rng.integers(0, 64, args.targets)]
         + 0.5 * rng.normal(size=(args.targets, args.dim))).astype(np.float32)
    queries = (centers[rng.integers(0, 64, 4096)]
               + 0.5 * rng.normal(size=(4096, args.dim))).astype(np.float32)
    print(f"N = {args.targets}, d = {args.dim}, k = {args.k}, batch = {args.batch}, "
          f"{args.rounds} batches, {args.threads} worker thread(s) per shard\n")
    print("| shards | mode | queries/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for s in [int(v) for v in args.shards.split(",")]:
        for row in run(args, s, x, queries):
            print(f"| {row[0]} | {row[1]} | {row[2]:.0f} | {row[3]:.1f} | {row[4]:.1f} |")
    print("\nclient merge per batch of", args.batch, "queries, k =", args.k)
    for s in (2, 4, 16):
        cost = merge_cost(args.k, args.batch, s)
        print(f"  {s:2d} shards: " + ", ".join(f"{m} {t * 1e3:.2f} ms" for m, t in cost.items()))
    b = wire_bytes(args.dim, args.k)
    print(f"\nwire bytes per query per shard (d = {args.dim}, k = {args.k}): "
          f"request {b['request']}, response {b['response']}")
    b = wire_bytes(768, args.k)
    print(f"wire bytes per query per shard (d = 768, k = {args.k}): "
          f"request {b['request']}, response {b['response']}")


if __name__ == "__main__":
    main()
