#!/usr/bin/env python3
"""Bytes that are not the message a method expects, sent to the real server.

Every stream and call here sends raw bytes (an identity serializer), so a
message can be a valid protobuf or garbage (b"\\xff": a varint cut short).
It checks that a message that does not parse fails its stream with
INVALID_ARGUMENT naming the message, and that nothing after it is applied
or answered (UpsertTargets, MineStream, AssignBatches).

Run by ctest with Debian's python3 (python3-grpcio, python3-protobuf,
python3-numpy):
  python3 tests/wire_robustness_test.py --server-bin build/server/negmine-server \\
      --proto-python build/proto/python
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from typing import List, Optional

import grpc
import numpy as np

ARGS = None
pb = None  # negmine.v1.negmine_pb2, imported in main()

SERVICE = "/negmine.v1.NegativeMiner/"
GARBAGE = b"\xff"  # a varint tag whose continuation byte never comes
DIM = 4


def identity(b: bytes) -> bytes:
    """The raw serializer: bytes go on the wire as they are."""
    return b


class Server:
    """A negmine-server on a free loopback port, with a temporary data dir."""

    def __init__(self, extra: Optional[List[str]] = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="negmine-wire-")
        port_file = os.path.join(self.tmp, "port")
        self.proc = subprocess.Popen([
            ARGS.server_bin, "--listen=127.0.0.1:0", "--port_file=" + port_file,
            "--data_dir=" + os.path.join(self.tmp, "data"), "--metrics_listen=",
            "--log_level=warning", "--worker_threads=2"] + (extra or []))
        deadline = time.time() + 60
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("negmine-server did not start")
            time.sleep(0.02)
        self.address = "127.0.0.1:%d" % int(open(port_file).read())

    def stop(self) -> int:
        """SIGTERM; returns the exit code."""
        self.proc.terminate()
        code = self.proc.wait(timeout=60)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return code


def matrix(x: np.ndarray):
    """A float32 Matrix of the rows of x."""
    x = np.ascontiguousarray(x, dtype="<f4")
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], dtype=pb.DTYPE_FLOAT32,
                     data=x.tobytes())


class StreamParseFailures(unittest.TestCase):
    """[A, garbage, B] on each streaming method."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = Server()
        cls.channel = grpc.insecure_channel(cls.server.address)
        grpc.channel_ready_future(cls.channel).result(timeout=30)
        cls.rng = np.random.default_rng(7)
        cls.unary("CreateCollection", pb.CreateCollectionRequest(config=pb.CollectionConfig(
            name="w", dim=DIM, metric=pb.METRIC_INNER_PRODUCT)), pb.CreateCollectionResponse)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.channel.close()
        assert cls.server.stop() == 0

    @classmethod
    def unary(cls, method: str, req, resp_type):
        return cls.channel.unary_unary(
            SERVICE + method, request_serializer=type(req).SerializeToString,
            response_deserializer=resp_type.FromString)(req, timeout=30)

    def raw_stream_unary(self, method: str, messages: List[bytes]) -> bytes:
        return self.channel.stream_unary(
            SERVICE + method, request_serializer=identity,
            response_deserializer=identity)(iter(messages), timeout=30)

    def upsert_bytes(self, ids: List[int]) -> bytes:
        return pb.UpsertTargetsRequest(
            collection="w", ids=ids,
            vectors=matrix(self.rng.standard_normal((len(ids), DIM)))).SerializeToString()

    def num_targets(self) -> int:
        return self.unary("GetIndexInfo", pb.GetIndexInfoRequest(collection="w"),
                          pb.GetIndexInfoResponse).info.num_targets

    def test_upsert_stream_with_garbage_fails_and_applies_nothing_after_it(self) -> None:
        before = self.num_targets()
        a, b = self.upsert_bytes([101, 102]), self.upsert_bytes([103, 104])
        with self.assertRaises(grpc.RpcError) as cm:
            self.raw_stream_unary("UpsertTargets", [a, GARBAGE, b])
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                         cm.exception.details())
        self.assertIn("message 2", cm.exception.details())
        self.assertIn("does not parse", cm.exception.details())
        # A was applied before the garbage came (it says so); B never is.
        self.assertIn("1 messages before it were applied", cm.exception.details())
        self.assertEqual(self.num_targets(), before + 2)
        with self.assertRaises(grpc.RpcError) as missing:
            self.unary("GetTargets", pb.GetTargetsRequest(collection="w", ids=[103]),
                       pb.GetTargetsResponse)
        self.assertEqual(missing.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_upsert_stream_of_good_messages_still_ends_ok(self) -> None:
        resp = pb.UpsertTargetsResponse.FromString(self.raw_stream_unary(
            "UpsertTargets", [self.upsert_bytes([201, 202]), self.upsert_bytes([203])]))
        self.assertEqual(resp.upserted, 3)

    def test_mine_stream_with_garbage_answers_before_it_then_fails(self) -> None:
        self.raw_stream_unary("UpsertTargets", [self.upsert_bytes(list(range(1, 21)))])
        q = pb.MineRequest(collection="w", queries=matrix(self.rng.standard_normal((1, DIM))),
                           params=pb.MineParams(k=3)).SerializeToString()
        call = self.channel.stream_stream(
            SERVICE + "MineStream", request_serializer=identity,
            response_deserializer=identity)(iter([q, GARBAGE, q]), timeout=30)
        answers = []
        with self.assertRaises(grpc.RpcError) as cm:
            for r in call:
                answers.append(pb.MineResponse.FromString(r))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                         cm.exception.details())
        self.assertIn("message 2", cm.exception.details())
        self.assertEqual(len(answers), 1, "only the request before the garbage is answered")
        self.assertEqual(answers[0].status.code, 0)
        self.assertEqual(len(answers[0].results[0].ids), 3)

    def test_assign_batches_with_garbage_fails(self) -> None:
        x = self.rng.standard_normal((8, DIM))
        first = pb.AssignBatchesRequest(batch_size=4, queries=matrix(x),
                                        positives=matrix(x)).SerializeToString()
        more = pb.AssignBatchesRequest(queries=matrix(x), positives=matrix(x)).SerializeToString()
        with self.assertRaises(grpc.RpcError) as cm:
            self.raw_stream_unary("AssignBatches", [first, GARBAGE, more])
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                         cm.exception.details())
        self.assertIn("message 2", cm.exception.details())
        # Without the garbage the same stream assigns 16 examples.
        resp = pb.AssignBatchesResponse.FromString(
            self.raw_stream_unary("AssignBatches", [first, more]))
        self.assertEqual(resp.num_examples, 16)


def main() -> None:
    """Parses the flags, imports the generated messages, runs the tests."""
    global ARGS, pb
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-bin", required=True)
    parser.add_argument("--proto-python", required=True)
    ARGS, rest = parser.parse_known_args()
    sys.path.insert(0, ARGS.proto_python)
    from negmine.v1 import negmine_pb2
    pb = negmine_pb2
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
