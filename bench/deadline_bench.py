#!/usr/bin/env python3
"""Deadline and fairness bench: how much work a Mine does after its deadline,
and how long a small request waits behind huge ones.

It starts negmine-server with a generated default collection, then:

1. deadline: one huge Mine (--queries rows of dim --dim, top-k) with a short
   deadline; the server's CPU time (/proc/<pid>/stat) is read at the
   deadline and again once it is idle: the difference is the work done past
   the deadline.
0. with --throughput, the huge Mine in full (queries/s: what the work
   units cost);
2. fairness: two huge Mines (long deadline), and --small_delay s later a
   1-query Mine; its latency is the wait behind them. The huge ones are then
   cancelled (and the server given time to go idle).

Run it against a binary before and after a change to compare:
  /usr/bin/python3 bench/deadline_bench.py --server-bin build/server/negmine-server \\
      --proto-python build/proto/python [--targets 200000 --queries 65536 --deadline 2]
Prints one line per measurement and a JSON summary at the end.
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
from typing import Dict, List

import grpc
import numpy as np

SERVICE = "/negmine.v1.NegativeMiner/"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, quiet: float = 0.3, step: float = 0.05, limit: float = 300) -> float:
    """Waits until `pid` uses < 2% of a core over `quiet` s; returns its CPU seconds then."""
    start = time.time()
    last = cpu_seconds(pid)
    while time.time() - start < limit:
        time.sleep(quiet)
        now = cpu_seconds(pid)
        if now - last < 0.02 * quiet:
            return now
        last = now
    return cpu_seconds(pid)


def main() -> int:
    """Runs both measurements; returns the exit code."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--proto-python", required=True)
    ap.add_argument("--targets", type=int, default=200000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=65536)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--deadline", type=float, default=2.0, help="seconds, the huge Mine's")
    ap.add_argument("--small_delay", type=float, default=0.5)
    ap.add_argument("--worker_threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="more server flags, space-separated")
    ap.add_argument("--throughput", action="store_true",
                    help="first run the huge Mine in full and report queries/s")
    args = ap.parse_args()
    sys.path.insert(0, args.proto_python)
    from negmine.v1 import negmine_pb2 as pb

    tmp = tempfile.mkdtemp(prefix="negmine-deadline-")
    port_file = os.path.join(tmp, "port")
    proc = subprocess.Popen([
        args.server_bin, "--listen=127.0.0.1:0", "--port_file=" + port_file,
        "--data_dir=" + os.path.join(tmp, "data"), "--metrics_listen=", "--log_level=error",
        "--worker_threads=%d" % args.worker_threads, "--default_dim=%d" % args.dim,
        "--default_metric=inner_product", "--generate_targets=%d" % args.targets,
        "--max_message_bytes=%d" % (256 << 20)] + args.extra.split())
    results: Dict[str, float] = {}
    try:
        deadline = time.time() + 600
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
        mine = channel.unary_unary(SERVICE + "Mine", request_serializer=pb.MineRequest.SerializeToString,
                                   response_deserializer=pb.MineResponse.FromString)
        rng = np.random.default_rng(1)

        def request(n: int) -> "pb.MineRequest":
            q = rng.standard_normal((n, args.dim)).astype("<f4")
            return pb.MineRequest(queries=pb.Matrix(rows=n, cols=args.dim, dtype=pb.DTYPE_FLOAT32,
                                                    data=q.tobytes()),
                                  params=pb.MineParams(k=args.k))

        huge = request(args.queries)
        small = request(1)
        mine(small, timeout=60)  # warm
        wait_idle(proc.pid)

        if args.throughput:
            # 0. The huge Mine in full: the cost of the work units, if any.
            t = time.time()
            mine(huge, timeout=600)
            results["full_queries_per_s"] = args.queries / (time.time() - t)
            print("the %d-query Mine in full: %.0f queries/s"
                  % (args.queries, results["full_queries_per_s"]), flush=True)
            wait_idle(proc.pid)

        # 1. Work past the deadline.
        sent = time.time()
        try:
            mine(huge, timeout=args.deadline)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        answered = time.time() - sent
        at_deadline = cpu_seconds(proc.pid)
        idle = wait_idle(proc.pid)
        results["deadline_answer_s"] = answered
        results["cpu_after_deadline_ms"] = 1000 * (idle - at_deadline)
        print("deadline %.1f s: answered %s after %.2f s; server CPU after the deadline %.0f ms"
              % (args.deadline, code, answered, results["cpu_after_deadline_ms"]), flush=True)

        # 2. A small request behind two huge ones.
        calls: List = [mine.future(huge, timeout=600) for _ in range(2)]
        time.sleep(args.small_delay)
        t = time.time()
        mine(small, timeout=600)
        results["small_latency_ms"] = 1000 * (time.time() - t)
        print("1-query Mine sent %.1f s after two %d-query ones: answered in %.1f ms"
              % (args.small_delay, args.queries, results["small_latency_ms"]), flush=True)
        for c in calls:
            c.cancel()
        before = cpu_seconds(proc.pid)
        idle = wait_idle(proc.pid)
        results["cpu_after_cancel_ms"] = 1000 * (idle - before)
        print("server CPU after cancelling the two huge Mines: %.0f ms"
              % results["cpu_after_cancel_ms"], flush=True)
        channel.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"server": args.server_bin, "targets": args.targets, "dim": args.dim,
                      "queries": args.queries, "k": args.k, "deadline_s": args.deadline,
                      **{k: round(v, 1) for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
