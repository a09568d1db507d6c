#!/usr/bin/env python3
"""Load test: many concurrent Mine calls, MineStream streams and upsert
streams for a fixed time on loopback, against a server with one worker and a
short queue. Only OK and the documented overload code (RESOURCE_EXHAUSTED,
with its retry hint) may come back; a client that never reads its stream
does not stall the others. Latency percentiles are printed (not asserted).

  load_test.py --server-bin build/server/negmine-server \
      --proto-python build/proto/python [--seconds 6]
"""
import argparse
import collections
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
DIM = 32


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--proto-python", required=True)
    ap.add_argument("--seconds", type=float, default=6)
    args = ap.parse_args()
    sys.path.insert(0, args.proto_python)
    from negmine.v1 import negmine_pb2 as pb

    tmp = tempfile.mkdtemp(prefix="negmine-load-")
    port_file = os.path.join(tmp, "port")
    server = subprocess.Popen([
        args.server_bin, "--listen=127.0.0.1:0", "--port_file=" + port_file,
        "--data_dir=" + os.path.join(tmp, "data"), "--metrics_listen=", "--log_level=warning",
        "--worker_threads=1", "--max_queued_requests=4", "--default_dim=%d" % DIM,
        "--default_index=exact", "--generate_targets=20000"])
    try:
        start = time.time()
        while not os.path.exists(port_file):
            if server.poll() is not None or time.time() - start > 60:
                raise RuntimeError("negmine-server did not start")
            time.sleep(0.02)
        channel = grpc.insecure_channel("127.0.0.1:" + open(port_file).read().strip())
        grpc.channel_ready_future(channel).result(timeout=30)
        mine = channel.unary_unary(SERVICE + "Mine", pb.MineRequest.SerializeToString,
                                   pb.MineResponse.FromString)
        stream = channel.stream_stream(SERVICE + "MineStream", pb.MineRequest.SerializeToString,
                                       pb.MineResponse.FromString)
        upsert = channel.stream_unary(SERVICE + "UpsertTargets",
                                      pb.UpsertTargetsRequest.SerializeToString,
                                      pb.UpsertTargetsResponse.FromString)
        rng = np.random.default_rng(1)

        def matrix(x):
            return pb.Matrix(rows=x.shape[0], cols=DIM, dtype=pb.DTYPE_FLOAT32,
                             data=x.astype("<f4").tobytes())

        def request():
            q = rng.standard_normal((64, DIM)).astype(np.float32)
            return pb.MineRequest(collection="default", queries=matrix(q),
                                  params=pb.MineParams(k=16))

        codes = collections.Counter()
        latencies = []
        lock = threading.Lock()
        deadline = time.time() + args.seconds
        bad = []

        def record(code, seconds, detail=""):
            with lock:
                codes[code.name] += 1
                if code == grpc.StatusCode.OK:
                    if seconds is not None:
                        latencies.append(seconds)
                elif code != grpc.StatusCode.RESOURCE_EXHAUSTED or "retry" not in detail:
                    bad.append((code.name, detail))

        def unary_client():
            while time.time() < deadline:
                t = time.time()
                try:
                    _, call = mine.with_call(request(), timeout=30)
                    record(call.code(), time.time() - t)
                except grpc.RpcError as e:
                    md = dict(e.trailing_metadata() or ())
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry-after-ms" not in md:
                        bad.append(("no retry-after-ms", e.details()))
                    record(e.code(), None, e.details())
                    time.sleep(0.01)

        def stream_client():
            def requests():
                while time.time() < deadline:
                    yield request()
            try:
                for r in stream(requests(), timeout=60):
                    record(grpc.StatusCode(next(c for c in grpc.StatusCode
                                                if c.value[0] == r.status.code)),
                           None, r.status.message)
            except grpc.RpcError as e:
                record(e.code(), None, e.details())

        def upsert_client(base):
            n = 0
            while time.time() < deadline:
                ids = list(range(base + n, base + n + 50))
                n += 50
                try:
                    upsert(iter([pb.UpsertTargetsRequest(
                        collection="default", ids=ids,
                        vectors=matrix(rng.standard_normal((50, DIM))))]), timeout=30)
                    record(grpc.StatusCode.OK, None)
                except grpc.RpcError as e:
                    record(e.code(), None, e.details())
                    time.sleep(0.01)

        # A client that opens a stream, sends requests and never reads.
        stalled = stream(iter([request() for _ in range(50)]), timeout=60)

        threads = ([threading.Thread(target=unary_client) for _ in range(8)] +
                   [threading.Thread(target=stream_client) for _ in range(2)] +
                   [threading.Thread(target=upsert_client, args=(100000 * (i + 1),))
                    for i in range(2)])
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.seconds + 60)
        stuck = [t for t in threads if t.is_alive()]
        stalled.cancel()

        lat = sorted(latencies)
        pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
        print("codes: %s" % dict(codes))
        print("Mine latency over %d OK calls: p50 %.1f ms, p90 %.1f ms, p99 %.1f ms"
              % (len(lat), pct(0.5), pct(0.9), pct(0.99)))
        ok = True
        if bad:
            print("unexpected answers: %s" % bad[:5])
            ok = False
        if stuck:
            print("%d clients did not finish: a stalled stream held them up" % len(stuck))
            ok = False
        if codes["OK"] == 0 or codes["RESOURCE_EXHAUSTED"] == 0:
            print("expected both served calls and overload refusals")
            ok = False
        if server.poll() is not None:
            print("the server died")
            ok = False
        print("load_test: %s" % ("all passed" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
