#!/usr/bin/env python3
"""Crash test: a negmine-server is killed with SIGKILL at seeded random
moments while a client streams upserts, deletes, drift updates and snapshot
requests to it (so recovery goes through snapshots and logs), and also
changes the server refuses (an upsert with a duplicate id, carrying a fresh
id that nothing else writes); after every restart, each acknowledged write
is present bit-exactly, no refused write is visible, and the one write in
flight at the kill is either wholly applied or not at all.

Kill points, in turn: at a random moment of the write stream; just after a
snapshot request is sent (the snapshot is being written); and during
recovery itself (the server is killed again before it serves, and must
still recover).

  crash_test.py --server-bin build/server/negmine-server \
      --proto-python build/proto/python [--iterations 8] [--max-seconds 120] [--seed 1]
  crash_test.py ... --soak --kills 1000     # the long run: prints the totals
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

SERVICE = "/negmine.v1.NegativeMiner/"
DIM, IDS = 8, 400


class Server:
    """A negmine-server on data_dir; waits until it serves (its port file)."""

    def __init__(self, binary, data_dir, tmp, wait=True):
        self.port_file = os.path.join(tmp, "port")
        if os.path.exists(self.port_file):
            os.remove(self.port_file)
        self.proc = subprocess.Popen([
            binary, "--listen=127.0.0.1:0", "--port_file=" + self.port_file,
            "--data_dir=" + data_dir, "--metrics_listen=", "--log_level=error"])
        if not wait:
            return
        start = time.time()
        while not os.path.exists(self.port_file):
            if self.proc.poll() is not None:
                raise RuntimeError("negmine-server exited with %d" % self.proc.returncode)
            if time.time() - start > 60:
                raise RuntimeError("negmine-server did not start")
            time.sleep(0.02)
        self.address = "127.0.0.1:" + open(self.port_file).read().strip()


class Client:
    def __init__(self, pb, address):
        self.pb = pb
        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=30)

    def call(self, method, request, response_type):
        return self.channel.unary_unary(
            SERVICE + method, request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString)(request, timeout=30)

    def upsert(self, ids, x, step):
        pb = self.pb
        req = pb.UpsertTargetsRequest(
            collection="crash", ids=ids, model_step=step,
            vectors=pb.Matrix(rows=len(ids), cols=DIM, dtype=pb.DTYPE_FLOAT32,
                              data=x.astype("<f4").tobytes()))
        stream = self.channel.stream_unary(
            SERVICE + "UpsertTargets", request_serializer=pb.UpsertTargetsRequest.SerializeToString,
            response_deserializer=pb.UpsertTargetsResponse.FromString)
        return stream(iter([req]), timeout=30)


def apply(state, op):
    """The expected state after `op`: id -> (vector bytes, step)."""
    state = dict(state)
    if op[0] == "upsert":
        _, ids, x, step = op
        for i, v in zip(ids, x):
            state[i] = (v.astype("<f4").tobytes(), step)
    elif op[0] == "delete":
        for i in op[1]:
            state.pop(i, None)
    return state


def observe(client, pb):
    state = {}
    for i in range(IDS):
        try:
            r = client.call("GetTargets", pb.GetTargetsRequest(collection="crash", ids=[i]),
                            pb.GetTargetsResponse)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            continue
        state[i] = (r.vectors.data, r.model_steps[0])
    info = client.call("GetIndexInfo", pb.GetIndexInfoRequest(collection="crash"),
                       pb.GetIndexInfoResponse)
    return state, info.info.drift, info.info.num_targets


def visible(client, pb, ids):
    """The ids of `ids` that GetTargets finds."""
    found = []
    for i in ids:
        try:
            client.call("GetTargets", pb.GetTargetsRequest(collection="crash", ids=[i]),
                        pb.GetTargetsResponse)
            found.append(i)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--proto-python", required=True)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="stop starting iterations after this long (0: no limit)")
    ap.add_argument("--soak", action="store_true",
                    help="run until --kills SIGKILLs, print totals, quiet per iteration")
    ap.add_argument("--kills", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.soak:
        args.iterations = 1 << 62
    sys.path.insert(0, args.proto_python)
    from negmine.v1 import negmine_pb2 as pb

    rng = random.Random(args.seed)
    nrng = np.random.default_rng(args.seed)
    tmp = tempfile.mkdtemp(prefix="negmine-crash-")
    data_dir = os.path.join(tmp, "data")
    acked = {}             # the state every acknowledged write implies
    drift_updates = 0      # acknowledged drift updates
    step = 0
    server = None
    started = time.time()
    totals = {"kills": 0, "acknowledged": 0, "refused": 0, "lost": 0, "refused_visible": 0,
              "recovery_kills": 0, "snapshot_kills": 0}
    refused_ids = set()    # fresh ids only refused writes carried: never visible
    next_fresh = [100000]
    try:
        server = Server(args.server_bin, data_dir, tmp)
        client = Client(pb, server.address)
        client.call("CreateCollection", pb.CreateCollectionRequest(config=pb.CollectionConfig(
            name="crash", dim=DIM, metric=pb.METRIC_INNER_PRODUCT,
            drift=pb.DriftParams(num_landmarks=16))), pb.CreateCollectionResponse)
        ids = list(range(IDS))
        x = nrng.standard_normal((IDS, DIM)).astype(np.float32)
        client.upsert(ids, x, 0)
        acked = apply(acked, ("upsert", ids, x, 0))

        for it in range(args.iterations):
            if args.soak and totals["kills"] >= args.kills:
                break
            if args.max_seconds and it > 0 and time.time() - started > args.max_seconds:
                print("stopping after %d iterations (--max-seconds %g)" % (it, args.max_seconds))
                break
            # The kill point of this iteration, in turn.
            point = ["stream", "snapshot", "recovery"][it % 3]
            pending = [None]   # the op in flight when the kill comes
            stop = threading.Event()
            snapshot_sent = threading.Event()
            done = {"drift": 0, "acknowledged": 0, "refused": 0}

            def writer():
                nonlocal acked, step
                while not stop.is_set():
                    kinds = ["upsert", "upsert", "delete", "drift", "snapshot", "refused"]
                    if point == "snapshot" and not snapshot_sent.is_set():
                        kinds = ["upsert", "snapshot"]
                    kind = rng.choice(kinds)
                    step += 1
                    try:
                        if kind == "refused":
                            # A duplicate id: INVALID_ARGUMENT, never applied.
                            fresh = next_fresh[0]
                            next_fresh[0] += 1
                            refused_ids.add(fresh)
                            v = nrng.standard_normal((3, DIM)).astype(np.float32)
                            try:
                                client.upsert([fresh, 7, 7], v, step)
                            except grpc.RpcError as e:
                                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                                    return  # the server is gone
                                done["refused"] += 1
                                continue
                            print("a refused upsert was acknowledged")
                            os._exit(1)
                        if kind == "upsert":
                            n = rng.randint(1, 40)
                            op = ("upsert", rng.sample(range(IDS), n),
                                  nrng.standard_normal((n, DIM)).astype(np.float32), step)
                            pending[0] = op
                            client.upsert(op[1], op[2], step)
                        elif kind == "delete":
                            op = ("delete", rng.sample(range(IDS), rng.randint(1, 10)))
                            pending[0] = op
                            client.call("DeleteTargets", pb.DeleteTargetsRequest(
                                collection="crash", ids=op[1], allow_missing=True),
                                pb.DeleteTargetsResponse)
                        elif kind == "snapshot":
                            op = ("snapshot",)
                            pending[0] = op
                            snapshot_sent.set()
                            client.call("CreateSnapshot", pb.CreateSnapshotRequest(),
                                        pb.CreateSnapshotResponse)
                        else:
                            op = ("drift",)
                            pending[0] = op
                            lm = client.call("GetLandmarks", pb.GetLandmarksRequest(
                                collection="crash"), pb.GetLandmarksResponse)
                            g = nrng.standard_normal((len(lm.ids), DIM)).astype("<f4")
                            client.call("ApplyDrift", pb.ApplyDriftRequest(
                                collection="crash", model_step=step,
                                landmark_epoch=lm.landmark_epoch,
                                landmark_embeddings=pb.Matrix(
                                    rows=len(lm.ids), cols=DIM, dtype=pb.DTYPE_FLOAT32,
                                    data=g.tobytes())), pb.ApplyDriftResponse)
                            done["drift"] += 1
                    except grpc.RpcError:
                        return  # the server is gone: `pending` was not acknowledged
                    acked = apply(acked, op)
                    done["acknowledged"] += 1
                    pending[0] = None

            t = threading.Thread(target=writer)
            t.start()
            if point == "snapshot":
                # Just after a snapshot request: the snapshot is being copied,
                # switched to a new log generation or written.
                snapshot_sent.wait(timeout=10)
                time.sleep(rng.uniform(0, 0.02))
                totals["snapshot_kills"] += 1
            else:
                time.sleep(rng.uniform(0.05, 0.6))
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
            totals["kills"] += 1
            stop.set()
            t.join()
            drift_updates += done["drift"]
            totals["acknowledged"] += done["acknowledged"]
            totals["refused"] += done["refused"]

            if point == "recovery":
                # Killed again while it recovers (before it serves).
                early = Server(args.server_bin, data_dir, tmp, wait=False)
                time.sleep(rng.uniform(0, 0.05))
                early.proc.send_signal(signal.SIGKILL)
                early.proc.wait()
                totals["kills"] += 1
                totals["recovery_kills"] += 1

            server = Server(args.server_bin, data_dir, tmp)
            client = Client(pb, server.address)
            state, drift, num_targets = observe(client, pb)
            allowed = [acked]
            if pending[0] is not None:
                allowed.append(apply(acked, pending[0]))
            ok = state in allowed
            in_flight = pending[0][0] if pending[0] else "none"
            drift_ok = drift.updates in (drift_updates, drift_updates + (in_flight == "drift"))
            # A refused write's fresh id would be a target beyond 0..IDS-1
            # (counted), and the newest ones are looked up by id.
            visible_refused = set(visible(client, pb, sorted(refused_ids)[-5:]))
            if num_targets != len(state):
                visible_refused.add(-1)
            if not ok:
                # Acknowledged rows missing or different, whichever in-flight
                # outcome is assumed.
                totals["lost"] += min(
                    sum(1 for i in a if a[i] != state.get(i)) for a in allowed)
            totals["refused_visible"] += len(visible_refused)
            if not args.soak or not (ok and drift_ok and not visible_refused):
                print("iteration %d (kill point: %s): %d targets acknowledged, in flight: %s, "
                      "drift updates %d (acknowledged %d): %s"
                      % (it, point, len(acked), in_flight, drift.updates, drift_updates,
                         "ok" if ok and drift_ok and not visible_refused else "MISMATCH"))
            elif totals["kills"] % 100 < (2 if point == "recovery" else 1):
                print("%d kills, %.0f s: %s" % (totals["kills"], time.time() - started, totals),
                      flush=True)
            if visible_refused:
                print("  refused writes are visible: ids %s" % sorted(visible_refused)[:10])
                return 1
            if not ok:
                missing = [i for i in acked if acked[i] != state.get(i)]
                extra = [i for i in state if i not in acked]
                print("  differs from the acknowledged state at ids %s, extra %s"
                      % (missing[:10], extra[:10]))
                return 1
            if not drift_ok:
                return 1
            # Whatever the in-flight write did is now the truth.
            acked = state
            drift_updates = drift.updates
        print("totals: %d SIGKILLs (%d during snapshots, %d during recovery), %d acknowledged "
              "writes, %d lost; %d refused writes, %d visible; %.0f s"
              % (totals["kills"], totals["snapshot_kills"], totals["recovery_kills"],
                 totals["acknowledged"], totals["lost"], totals["refused"],
                 totals["refused_visible"], time.time() - started), flush=True)
        files = sorted(os.listdir(data_dir))
        snaps = [f for f in files if f.startswith("snapshot-") and f.endswith(".snap")]
        print("data dir: %s" % files)
        if not snaps or len(snaps) > 2 or any(f.endswith(".tmp") for f in files):
            print("expected one or two snapshots kept and no temporary files")
            return 1
        # A damaged snapshot stops the start with a clear error; repaired,
        # the server starts again with the same state.
        server.proc.terminate()
        server.proc.wait(timeout=30)
        newest = os.path.join(data_dir, snaps[-1])
        good = open(newest, "rb").read()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x40
        open(newest, "wb").write(bytes(bad))
        try:
            Server(args.server_bin, data_dir, tmp)
            print("a damaged snapshot was loaded")
            return 1
        except RuntimeError as e:
            print("damaged snapshot refused: %s" % e)
        open(newest, "wb").write(good)
        server = Server(args.server_bin, data_dir, tmp)
        client = Client(pb, server.address)
        if observe(client, pb)[0] != acked:
            print("the state after the repair differs")
            return 1
        print("crash_test: all passed")
        return 0
    finally:
        if server is not None and server.proc.poll() is None:
            server.proc.terminate()
            server.proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
