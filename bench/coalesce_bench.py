#!/usr/bin/env python3
"""Micro-batching end to end: many concurrent small top-k Mine calls against
one server, with coalescing off and on (server/coalescer.h), on the same
generated collection. Prints queries/s and latency percentiles per mode.

  bench/coalesce_bench.py --server-bin build/server/negmine-server \
      --proto-python build/proto/python [--clients 64] [--batch 16] [--seconds 10]

It means something on a GPU (a CUDA collection, where a merged batch shares
one scan of the targets); on the CPU the server does not coalesce unless
--coalesce_cpu is passed through --server-flag.
"""
import argparse
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


def run_mode(args, pb, coalesce):
    tmp = tempfile.mkdtemp(prefix="negmine-coalesce-")
    port_file = os.path.join(tmp, "port")
    flags = [args.server_bin, "--listen=127.0.0.1:0", "--port_file=" + port_file,
             "--data_dir=" + os.path.join(tmp, "data"), "--metrics_listen=",
             "--log_level=warning", "--worker_threads=%d" % (args.clients + 4),
             "--default_dim=%d" % args.dim, "--default_index=%s" % args.index,
             "--generate_targets=%d" % args.targets, "--wal_sync=never",
             "--coalesce_max_queries=%d" % (4096 if coalesce else 0)] + args.server_flag
    server = subprocess.Popen(flags)
    try:
        start = time.time()
        while not os.path.exists(port_file):
            if server.poll() is not None or time.time() - start > 600:
                raise RuntimeError("negmine-server did not start")
            time.sleep(0.05)
        channel = grpc.insecure_channel("127.0.0.1:" + open(port_file).read().strip())
        grpc.channel_ready_future(channel).result(timeout=60)
        mine = channel.unary_unary(SERVICE + "Mine", pb.MineRequest.SerializeToString,
                                   pb.MineResponse.FromString)
        rng = np.random.default_rng(7)
        requests = []
        for _ in range(64):
            q = rng.standard_normal((args.batch, args.dim)).astype("<f4")
            requests.append(pb.MineRequest(
                collection="default",
                queries=pb.Matrix(rows=args.batch, cols=args.dim, dtype=pb.DTYPE_FLOAT32,
                                  data=q.tobytes()),
                params=pb.MineParams(k=args.k)))
        mine(requests[0], timeout=600)  # warm-up: the first search uploads the data
        latencies, errors = [], []
        lock = threading.Lock()
        deadline = time.time() + args.seconds

        def client(i):
            n = 0
            while time.time() < deadline:
                t = time.time()
                try:
                    mine(requests[(i + n) % len(requests)], timeout=120)
                    with lock:
                        latencies.append(time.time() - t)
                except grpc.RpcError as e:
                    with lock:
                        errors.append(e.code().name)
                n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        lat = np.array(latencies) * 1e3
        return {"calls": len(latencies), "qps": len(latencies) * args.batch / wall,
                "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                "errors": errors}
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--proto-python", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="queries per Mine call")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--targets", type=int, default=1000000)
    ap.add_argument("--index", default="exact", help="exact | tree (exact top-k either way)")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--server-flag", action="append", default=[],
                    help="extra server flag, e.g. --server-flag=--coalesce_cpu")
    args = ap.parse_args()
    sys.path.insert(0, args.proto_python)
    from negmine.v1 import negmine_pb2 as pb

    print("| coalescing | Mine calls | queries/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for coalesce in (False, True):
        r = run_mode(args, pb, coalesce)
        print("| %s | %d | %.0f | %.1f | %.1f | %d |" % (
            "on" if coalesce else "off", r["calls"], r["qps"], r["p50"], r["p99"],
            len(r["errors"])), flush=True)


if __name__ == "__main__":
    main()
