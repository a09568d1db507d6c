#!/usr/bin/env python3
"""Bytes that are not the message a method expects, sent to the real server.

Every stream and call here sends raw bytes (an identity serializer), so a
message can be a valid protobuf or garbage (b"\\xff": a varint cut short).
It checks that a message that does not parse fails its stream with
INVALID_ARGUMENT naming the message, and that nothing after it is applied
or answered (UpsertTargets, MineStream, AssignBatches); that a unary request
that does not parse is INVALID_ARGUMENT with a message; that the metrics
port serves exactly /metrics; and that server reflection needs the bearer
token when one is required (UNAUTHENTICATED without it, unless
--reflection=on), and --reflection=off (UNIMPLEMENTED).

Run by ctest with Debian's python3 (python3-grpcio, python3-protobuf,
python3-numpy):
  python3 tests/wire_robustness_test.py --server-bin build/server/negmine-server \\
      --proto-python build/proto/python
"""
import argparse
import os
import shutil
import socket
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
        with open(port_file) as f:
            self.address = "127.0.0.1:%d" % int(f.read())

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


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, request_line: str) -> int:
    """Sends one raw HTTP request line; returns the status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((request_line + "\r\nHost: x\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ")[1])


REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
LIST_SERVICES = b"\x3a\x00"  # ServerReflectionRequest{list_services: ""} (field 7)


class UnaryMetricsAndReflection(unittest.TestCase):
    """A unary request that does not parse, the metrics paths, reflection and tokens."""

    def test_unary_request_that_does_not_parse_is_invalid_argument(self) -> None:
        server = Server()
        try:
            channel = grpc.insecure_channel(server.address)
            for method in ["Mine", "GetTargets", "CreateCollection", "DeleteTargets"]:
                with self.assertRaises(grpc.RpcError) as cm:
                    channel.unary_unary(SERVICE + method, request_serializer=identity,
                                        response_deserializer=identity)(GARBAGE, timeout=30)
                self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                                 cm.exception.details())
                self.assertIn("does not parse as negmine.v1.", cm.exception.details())
            # A good raw request still works.
            ok = channel.unary_unary(SERVICE + "ListCollections", request_serializer=identity,
                                     response_deserializer=identity)(b"", timeout=30)
            self.assertEqual(len(pb.ListCollectionsResponse.FromString(ok).collections), 0)
            channel.close()
        finally:
            self.assertEqual(server.stop(), 0)

    def test_metrics_port_serves_exactly_the_metrics_path(self) -> None:
        port = free_port()
        server = Server(["--metrics_listen=127.0.0.1:%d" % port])
        try:
            self.assertEqual(http(port, "GET /metrics HTTP/1.1"), 200)
            self.assertEqual(http(port, "GET /metrics?x=1 HTTP/1.1"), 200)
            for path in ["/metricsX", "/metrics/", "//metrics", "/", "/metrics/../metrics"]:
                self.assertEqual(http(port, "GET %s HTTP/1.1" % path), 404, path)
            self.assertEqual(http(port, "POST /metrics HTTP/1.1"), 405)
        finally:
            self.assertEqual(server.stop(), 0)

    def reflect(self, server: "Server", metadata=None) -> bytes:
        channel = grpc.insecure_channel(server.address)
        try:
            call = channel.stream_stream(REFLECTION, request_serializer=identity,
                                         response_deserializer=identity)
            return b"".join(call(iter([LIST_SERVICES]), timeout=30, metadata=metadata))
        finally:
            channel.close()

    def test_reflection_follows_the_token(self) -> None:
        open_server = Server()
        try:
            self.assertIn(b"negmine.v1.NegativeMiner", self.reflect(open_server))
        finally:
            self.assertEqual(open_server.stop(), 0)
        token_file = os.path.join(tempfile.mkdtemp(prefix="negmine-token-"), "token")
        with open(token_file, "w") as f:
            f.write("s3cret\n")
        guarded = Server(["--auth_token_file=" + token_file])
        try:
            # With a token, reflection needs it too: refused without it or
            # with a wrong one (UNAUTHENTICATED, saying what to send; it
            # used to end CANCELLED), served with it.
            for metadata, says in [(None, "requires a bearer token"),
                                   ([("authorization", "Bearer wrong!")], "invalid bearer token")]:
                with self.assertRaises(grpc.RpcError) as cm:
                    self.reflect(guarded, metadata=metadata)
                self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED,
                                 cm.exception.details())
                self.assertIn(says, cm.exception.details())
            self.assertIn(b"negmine.v1.NegativeMiner",
                          self.reflect(guarded, metadata=[("authorization", "Bearer s3cret")]))
        finally:
            self.assertEqual(guarded.stop(), 0)
        opted_in = Server(["--auth_token_file=" + token_file, "--reflection=on"])
        try:
            self.assertIn(b"negmine.v1.NegativeMiner", self.reflect(opted_in))
        finally:
            self.assertEqual(opted_in.stop(), 0)
        off = Server(["--reflection=off"])
        try:
            with self.assertRaises(grpc.RpcError) as cm:
                self.reflect(off)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNIMPLEMENTED,
                             cm.exception.details())
            self.assertIn("--reflection", cm.exception.details())
        finally:
            self.assertEqual(off.stop(), 0)
            shutil.rmtree(os.path.dirname(token_file), ignore_errors=True)

class MiningMemoryBound(unittest.TestCase):
    """--max_mine_memory_bytes: a request that alone exceeds it says how to split."""

    def test_a_request_over_the_bound_is_refused_with_how_to_split_it(self) -> None:
        server = Server(["--max_mine_memory_bytes=1000000"])
        try:
            channel = grpc.insecure_channel(server.address)
            unary = lambda m, req, resp: channel.unary_unary(  # noqa: E731
                SERVICE + m, request_serializer=type(req).SerializeToString,
                response_deserializer=resp.FromString)(req, timeout=30)
            unary("CreateCollection", pb.CreateCollectionRequest(config=pb.CollectionConfig(
                name="m", dim=DIM, metric=pb.METRIC_INNER_PRODUCT)), pb.CreateCollectionResponse)
            rng = np.random.default_rng(3)
            channel.stream_unary(
                SERVICE + "UpsertTargets",
                request_serializer=pb.UpsertTargetsRequest.SerializeToString,
                response_deserializer=pb.UpsertTargetsResponse.FromString)(iter([
                    pb.UpsertTargetsRequest(collection="m", ids=list(range(100)),
                                            vectors=matrix(rng.standard_normal((100, DIM))))]),
                    timeout=30)
            # 2000 queries x (dim 4 x 8 + 56 x k 10 + 128) = 1,440,000 bytes.
            big = pb.MineRequest(collection="m", queries=matrix(rng.standard_normal((2000, DIM))),
                                 params=pb.MineParams(k=10))
            with self.assertRaises(grpc.RpcError) as cm:
                unary("Mine", big, pb.MineResponse)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                             cm.exception.details())
            self.assertIn("max_mine_memory_bytes", cm.exception.details())
            self.assertIn("at most 1388 queries", cm.exception.details())
            ok = pb.MineRequest(collection="m", queries=matrix(rng.standard_normal((1388, DIM))),
                                params=pb.MineParams(k=10))
            self.assertEqual(len(unary("Mine", ok, pb.MineResponse).results), 1388)
            channel.close()
        finally:
            self.assertEqual(server.stop(), 0)


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
