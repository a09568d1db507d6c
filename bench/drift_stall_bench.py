#!/usr/bin/env python3
"""Stall bench: Mine latency while a drift update runs with writes queued
behind it, against Mine latency on an idle server.

It starts negmine-server, creates a collection of --targets random unit
vectors (dim --dim, cosine, tree index) with --landmarks landmarks per set,
chooses the landmarks, then:

1. idle: --idle_mines sequential 1-query top-k Mines; their latencies.
2. during: an ApplyDrift (the landmarks' stored vectors, slightly moved) is
   sent, then --writers 1-row upserts (each queued behind the update, since
   changes apply in log order), then 1-query Mines are sent one after the
   other until the ApplyDrift returns; their latencies.

A server that runs the drift update and the writes behind it on the
threads that serve Mine answers the Mines of (2) only after the update;
one that keeps them apart answers them as fast as idle ones (up to the CPU
the update itself takes from them).

  /usr/bin/python3 bench/drift_stall_bench.py --server-bin build/server/negmine-server \\
      --proto-python build/proto/python [--targets 200000 --landmarks 2048]
Prints one line per phase and a JSON summary at the end.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

SERVICE = "/negmine.v1.NegativeMiner/"


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--proto-python", required=True)
    ap.add_argument("--targets", type=int, default=200000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--landmarks", type=int, default=2048)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--idle_mines", type=int, default=50)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--worker_threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="more server flags, space-separated")
    args = ap.parse_args()
    sys.path.insert(0, args.proto_python)
    from negmine.v1 import negmine_pb2 as pb

    def matrix(a):
        a = np.ascontiguousarray(a, dtype="<f4")
        return pb.Matrix(rows=a.shape[0], cols=a.shape[1], dtype=pb.DTYPE_FLOAT32, data=a.tobytes())

    tmp = tempfile.mkdtemp(prefix="negmine-stall-")
    port_file = os.path.join(tmp, "port")
    proc = subprocess.Popen([
        args.server_bin, "--listen=127.0.0.1:0", "--port_file=" + port_file,
        "--data_dir=" + os.path.join(tmp, "data"), "--metrics_listen=", "--log_level=error",
        "--worker_threads=%d" % args.worker_threads, "--snapshot_interval_seconds=0",
        "--snapshot_wal_bytes=0", "--max_message_bytes=%d" % (256 << 20)] + args.extra.split())
    summary = {"server": args.server_bin, "targets": args.targets, "dim": args.dim,
               "landmarks": args.landmarks, "worker_threads": args.worker_threads,
               "writers": args.writers}
    try:
        deadline = time.time() + 120
        while not os.path.exists(port_file):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("negmine-server did not start")
            time.sleep(0.05)
        with open(port_file) as f:
            address = "127.0.0.1:%d" % int(f.read())
        channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20)])
        grpc.channel_ready_future(channel).result(timeout=60)

        def unary(name, req, resp):
            return channel.unary_unary(SERVICE + name, request_serializer=req.SerializeToString,
                                       response_deserializer=resp.FromString)
        create = unary("CreateCollection", pb.CreateCollectionRequest, pb.CreateCollectionResponse)
        landmarks_rpc = unary("GetLandmarks", pb.GetLandmarksRequest, pb.GetLandmarksResponse)
        get = unary("GetTargets", pb.GetTargetsRequest, pb.GetTargetsResponse)
        drift = unary("ApplyDrift", pb.ApplyDriftRequest, pb.ApplyDriftResponse)
        mine = unary("Mine", pb.MineRequest, pb.MineResponse)
        upsert = channel.stream_unary(SERVICE + "UpsertTargets",
                                      request_serializer=pb.UpsertTargetsRequest.SerializeToString,
                                      response_deserializer=pb.UpsertTargetsResponse.FromString)

        create(pb.CreateCollectionRequest(config=pb.CollectionConfig(
            name="c", dim=args.dim, metric=pb.METRIC_COSINE, backend=pb.BACKEND_CPU,
            drift=pb.DriftParams(num_landmarks=args.landmarks))), timeout=60)
        rng = np.random.default_rng(1)
        chunk = 20000

        def chunks():
            for begin in range(0, args.targets, chunk):
                n = min(chunk, args.targets - begin)
                v = rng.standard_normal((n, args.dim)).astype("<f4")
                yield pb.UpsertTargetsRequest(collection="c", ids=range(begin, begin + n),
                                              vectors=matrix(v))
        t = time.time()
        upsert(chunks(), timeout=600)
        print("loaded %d targets in %.1f s" % (args.targets, time.time() - t), flush=True)
        lm = landmarks_rpc(pb.GetLandmarksRequest(collection="c"), timeout=600)
        stored = get(pb.GetTargetsRequest(collection="c", ids=lm.ids), timeout=60)
        moved = np.frombuffer(stored.vectors.data, dtype="<f4").reshape(len(lm.ids), args.dim)
        moved = moved + 0.05 * rng.standard_normal(moved.shape).astype("<f4")
        drift_req = pb.ApplyDriftRequest(collection="c", model_step=10,
                                         landmark_epoch=lm.landmark_epoch,
                                         landmark_embeddings=matrix(moved))

        def small():
            q = rng.standard_normal((1, args.dim)).astype("<f4")
            return pb.MineRequest(collection="c", queries=matrix(q), params=pb.MineParams(k=args.k))

        for _ in range(5):
            mine(small(), timeout=60)  # warm
        time.sleep(1)  # let the tree's background build settle
        idle = []
        for _ in range(args.idle_mines):
            t = time.time()
            mine(small(), timeout=600)
            idle.append(1000 * (time.time() - t))
        print("idle: %d Mines, median %.2f ms, p90 %.2f ms"
              % (len(idle), percentile(idle, 50), percentile(idle, 90)), flush=True)

        done = threading.Event()
        result = {}

        def run_drift():
            t = time.time()
            r = drift(drift_req, timeout=600)
            result.update(seconds=time.time() - t, fit=r.fit_seconds, apply=r.apply_seconds)
            done.set()
        drift_thread = threading.Thread(target=run_drift)
        drift_thread.start()
        time.sleep(0.05)  # the update reaches the server first
        writes = []
        for w in range(args.writers):
            v = rng.standard_normal((1, args.dim)).astype("<f4")
            writes.append(upsert.future(iter([pb.UpsertTargetsRequest(
                collection="c", ids=[10 ** 9 + w], vectors=matrix(v))]), timeout=600))
        during = []
        # Every Mine sent while the update runs counts, also the one that
        # returns only after it (a stalled server answers that one late).
        while not done.is_set():
            t = time.time()
            mine(small(), timeout=600)
            during.append(1000 * (time.time() - t))
        drift_thread.join()
        for w in writes:
            w.result()
        print("during an ApplyDrift of %.2f s (fit %.2f s, apply %.2f s) with %d writes queued: "
              "%d Mines, median %.2f ms, p90 %.2f ms, max %.2f ms"
              % (result["seconds"], result["fit"], result["apply"], args.writers, len(during),
                 percentile(during, 50), percentile(during, 90), max(during, default=float("nan"))),
              flush=True)
        summary.update(idle_median_ms=percentile(idle, 50), idle_p90_ms=percentile(idle, 90),
                       during_mines=len(during), during_median_ms=percentile(during, 50),
                       during_p90_ms=percentile(during, 90),
                       during_max_ms=max(during, default=float("nan")),
                       drift_seconds=result["seconds"], fit_seconds=result["fit"],
                       apply_seconds=result["apply"])
        summary["median_ratio"] = summary["during_median_ms"] / summary["idle_median_ms"]
        channel.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
