#!/usr/bin/env python3
"""An independent negmine client, written from proto/negmine/v1/negmine.proto
alone (messages from protoc --python_out; RPCs called by their method paths),
against the real server binary on a free loopback port.

It checks what a user in another language relies on: create a collection,
upsert 10k vectors, exact top-k equal to numpy brute force with exclusions
honored, sampling frequencies that match the exact softmax (chi-square at a
fixed seed), float16 queries, clear errors for malformed requests, and
grpc.health.v1.

Run by ctest with Debian's python3 (python3-grpcio, python3-protobuf,
python3-numpy):
  python3 tests/python_client_test.py --server-bin build/server/negmine-server \
      --proto-python build/proto/python
"""
import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import grpc
import numpy as np

ARGS = None
pb = None  # negmine.v1.negmine_pb2, imported in main()

SERVICE = "/negmine.v1.NegativeMiner/"


def chi_square_critical(df, z=3.09):
    """Upper 0.1% quantile of chi-square(df), Wilson-Hilferty."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


class NegmineClient:
    """A minimal client: one callable per RPC."""

    def __init__(self, address):
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 256 << 20)])
        grpc.channel_ready_future(self.channel).result(timeout=30)

        def unary(name, req, resp):
            return self.channel.unary_unary(
                SERVICE + name, request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString)

        self.create = unary("CreateCollection", pb.CreateCollectionRequest,
                            pb.CreateCollectionResponse)
        self.mine = unary("Mine", pb.MineRequest, pb.MineResponse)
        self.info = unary("GetIndexInfo", pb.GetIndexInfoRequest,
                          pb.GetIndexInfoResponse)
        self.get = unary("GetTargets", pb.GetTargetsRequest,
                         pb.GetTargetsResponse)
        self.landmarks = unary("GetLandmarks", pb.GetLandmarksRequest,
                               pb.GetLandmarksResponse)
        self.drift = unary("ApplyDrift", pb.ApplyDriftRequest,
                           pb.ApplyDriftResponse)
        self.upsert_stream = self.channel.stream_unary(
            SERVICE + "UpsertTargets",
            request_serializer=pb.UpsertTargetsRequest.SerializeToString,
            response_deserializer=pb.UpsertTargetsResponse.FromString)
        self.health = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)


def matrix(x):
    x = np.ascontiguousarray(x)
    dtype = {np.dtype("<f4"): pb.DTYPE_FLOAT32,
             np.dtype("<f2"): pb.DTYPE_FLOAT16}[x.dtype]
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], dtype=dtype,
                     data=x.tobytes())


def upsert(client, collection, ids, x, chunk=2500, step=0):
    def requests():
        for b in range(0, len(ids), chunk):
            yield pb.UpsertTargetsRequest(
                collection=collection, ids=ids[b:b + chunk].tolist(),
                vectors=matrix(x[b:b + chunk]), model_step=step)
    return client.upsert_stream(requests())


def mine_request(collection, q, k, exclude=None, **params):
    req = pb.MineRequest(collection=collection, queries=matrix(q),
                         params=pb.MineParams(k=k, **params))
    for ex in exclude or []:
        req.exclude.add(ids=list(ex))
    return req


class NegmineFromPython(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="negmine-py-")
        port_file = os.path.join(cls.tmp, "port")
        cls.server = subprocess.Popen([
            ARGS.server_bin, "--listen=127.0.0.1:0", "--port_file=" + port_file,
            "--data_dir=" + os.path.join(cls.tmp, "data"), "--metrics_listen=",
            "--log_level=warning"])
        deadline = time.time() + 60
        while not os.path.exists(port_file):
            if cls.server.poll() is not None or time.time() > deadline:
                raise RuntimeError("negmine-server did not start")
            time.sleep(0.02)
        port = int(open(port_file).read())
        cls.client = NegmineClient("127.0.0.1:%d" % port)
        cls.rng = np.random.default_rng(12345)

        # 10k targets, d = 32, inner product, ids that are not 0..n-1.
        cls.dim = 32
        cls.x = cls.rng.standard_normal((10000, cls.dim)).astype(np.float32)
        cls.ids = np.arange(10000, dtype=np.uint64) * 3 + 17
        cls.client.create(pb.CreateCollectionRequest(config=pb.CollectionConfig(
            name="py", dim=cls.dim, metric=pb.METRIC_INNER_PRODUCT)))
        resp = upsert(cls.client, "py", cls.ids, cls.x)
        assert resp.upserted == 10000, resp

    @classmethod
    def tearDownClass(cls):
        cls.client.channel.close()
        cls.server.terminate()
        code = cls.server.wait(timeout=60)
        shutil.rmtree(cls.tmp, ignore_errors=True)
        assert code == 0, "server exited with %d after SIGTERM" % code

    def assert_status(self, fn, req, code, text):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(req)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        self.assertIn(text, cm.exception.details())

    def test_exact_top_k_equals_brute_force_with_exclusions(self):
        q = self.rng.standard_normal((20, self.dim)).astype(np.float32)
        scores = q.astype(np.float64) @ self.x.astype(np.float64).T
        order = np.argsort(-scores, axis=1, kind="stable")
        exclude = [self.ids[order[i, :3]] for i in range(20)]
        resp = self.client.mine(mine_request("py", q, 10, exclude))
        self.assertEqual(len(resp.results), 20)
        for i, res in enumerate(resp.results):
            want = order[i, 3:13]
            got = np.array(res.ids, dtype=np.uint64)
            self.assertFalse(set(got) & set(exclude[i]), "excluded id returned")
            np.testing.assert_allclose(res.scores, scores[i, want], atol=1e-4)
            for j in np.nonzero(got != self.ids[want])[0]:
                # Only a near-tie in the oracle may swap ids.
                self.assertAlmostEqual(scores[i, want[j]],
                                       scores[i, order[i, 3 + j + 1]], delta=1e-4)

    def test_sampling_matches_the_exact_softmax(self):
        n, tau = 40, 0.5
        x = (0.3 * self.rng.standard_normal((n, 8))).astype(np.float32)
        ids = np.arange(n, dtype=np.uint64)
        self.client.create(pb.CreateCollectionRequest(config=pb.CollectionConfig(
            name="pysample", dim=8, metric=pb.METRIC_INNER_PRODUCT)))
        upsert(self.client, "pysample", ids, x)
        q = self.rng.standard_normal((1, 8)).astype(np.float32)
        batch = np.repeat(q, 250, axis=0)
        resp = self.client.mine(mine_request(
            "pysample", batch, n, exclude=[[5]] * 250, mode=pb.MINE_MODE_SAMPLE,
            temperature=tau, with_replacement=True, seed=2024, return_log_z=True))
        s = (x.astype(np.float64) @ q[0].astype(np.float64))
        s[5] = -np.inf
        p = np.exp((s - s.max()) / tau)
        p /= p.sum()
        counts = np.zeros(n)
        for res in resp.results:
            self.assertEqual(len(res.ids), n)
            np.add.at(counts, np.array(res.ids, dtype=np.int64), 1)
            log_z = res.log_z_lo
            np.testing.assert_allclose(
                res.log_q, s[np.array(res.ids, dtype=np.int64)] / tau - log_z,
                atol=1e-3)
        self.assertEqual(counts[5], 0, "excluded id sampled")
        draws = counts.sum()
        expected = p * draws
        big = expected >= 5
        stat = (((counts[big] - expected[big]) ** 2) / expected[big]).sum()
        df = int(big.sum()) - 1
        if (~big).any() and expected[~big].sum() > 0:
            e = expected[~big].sum()
            stat += (counts[~big].sum() - e) ** 2 / e
            df += 1
        self.assertLess(stat, chi_square_critical(df), "df %d" % df)

    def test_float16_queries(self):
        q = self.rng.standard_normal((3, self.dim)).astype(np.float16)
        resp = self.client.mine(mine_request("py", q, 5))
        scores = q.astype(np.float64) @ self.x.astype(np.float64).T
        for i, res in enumerate(resp.results):
            np.testing.assert_allclose(res.scores, np.sort(scores[i])[::-1][:5],
                                       atol=1e-3)

    def test_get_targets_is_bit_exact(self):
        resp = self.client.get(pb.GetTargetsRequest(
            collection="py", ids=[int(self.ids[7]), int(self.ids[0])]))
        got = np.frombuffer(resp.vectors.data, dtype="<f4").reshape(2, self.dim)
        self.assertTrue(np.array_equal(got, self.x[[7, 0]]))

    def test_malformed_requests(self):
        inv, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
        q = self.rng.standard_normal((2, self.dim)).astype(np.float32)
        mine = self.client.mine
        self.assert_status(mine, mine_request("py", q[:, :5], 3), inv,
                           "queries.cols = 5 does not match the collection's dim = 32")
        bad = q.copy()
        bad[1, 3] = np.nan
        self.assert_status(mine, mine_request("py", bad, 3), inv, "queries[1][3] = nan")
        bad[1, 3] = np.inf
        self.assert_status(mine, mine_request("py", bad, 3), inv, "queries[1][3] = inf")
        self.assert_status(mine, mine_request("py", q, 0), inv, "params.k = 0")
        self.assert_status(mine, mine_request("py", q, 10001), inv, "params.k = 10001")
        req = mine_request("py", q, 3)
        req.queries.dtype = 7
        self.assert_status(mine, req, inv, "queries.dtype = 7")
        req = mine_request("py", q, 3)
        req.queries.data = req.queries.data[:-1]
        self.assert_status(mine, req, inv, "queries.data has 255 bytes")
        self.assert_status(mine, mine_request("nope", q, 3), nf, "collection 'nope' not found")
        req = pb.MineRequest(collection="py", queries=pb.Matrix(
            rows=0, cols=self.dim, dtype=pb.DTYPE_FLOAT32), params=pb.MineParams(k=3))
        self.assert_status(mine, req, inv, "queries.rows = 0")
        for tau in (0.0, -0.5):
            self.assert_status(mine, mine_request("py", q, 3, mode=pb.MINE_MODE_SAMPLE,
                                                  temperature=tau),
                               inv, "params.temperature = ")
        with self.assertRaises(grpc.RpcError) as cm:
            upsert(self.client, "py", np.array([1, 2, 1], dtype=np.uint64),
                   self.rng.standard_normal((3, self.dim)).astype(np.float32))
        self.assertEqual(cm.exception.code(), inv)
        self.assertIn("duplicate id 1", cm.exception.details())
        # Nothing was changed, and the server still serves.
        info = self.client.info(pb.GetIndexInfoRequest(collection="py"))
        self.assertEqual(info.info.num_targets, 10000)
        self.assertEqual(len(mine(mine_request("py", q, 3)).results), 2)

    def test_drift_landmarks_and_linear_map(self):
        # The "current model" moves every target by a linear map W: the
        # displacement is linear in the stale embedding, so the Nystrom fit
        # over 128 landmarks recovers it almost exactly.
        d, n = 16, 2000
        x = self.rng.standard_normal((n, d)).astype(np.float32)
        ids = np.arange(n, dtype=np.uint64) + 5
        self.client.create(pb.CreateCollectionRequest(config=pb.CollectionConfig(
            name="pydrift", dim=d, metric=pb.METRIC_INNER_PRODUCT,
            drift=pb.DriftParams(num_landmarks=128))))
        upsert(self.client, "pydrift", ids, x)
        w = (np.eye(d) + 0.1 * self.rng.standard_normal((d, d))).astype(np.float32)
        lm = self.client.landmarks(pb.GetLandmarksRequest(collection="pydrift"))
        self.assertEqual(len(lm.ids), 128)
        rows = np.array(lm.ids, dtype=np.int64) - 5
        resp = self.client.drift(pb.ApplyDriftRequest(
            collection="pydrift", model_step=7, landmark_epoch=lm.landmark_epoch,
            landmark_embeddings=matrix(x[rows] @ w.T)))
        self.assertLess(resp.heldout_residual, 0.1 * resp.stale_residual)
        got = self.client.get(pb.GetTargetsRequest(collection="pydrift",
                                                   ids=ids.tolist(), scored=True))
        scored = np.frombuffer(got.vectors.data, dtype="<f4").reshape(n, d)
        want = x @ w.T
        self.assertLess(np.linalg.norm(scored - want) / np.linalg.norm(want), 0.05)
        # The stored vectors are untouched.
        got = self.client.get(pb.GetTargetsRequest(collection="pydrift", ids=[5]))
        self.assertTrue(np.array_equal(
            np.frombuffer(got.vectors.data, dtype="<f4"), x[0]))
        # An exact linear map acts on what is served.
        a = (np.eye(d) + 0.1 * self.rng.standard_normal((d, d))).astype(np.float32)
        b = self.rng.standard_normal((1, d)).astype(np.float32)
        resp = self.client.drift(pb.ApplyDriftRequest(
            collection="pydrift", model_step=8,
            linear_map=pb.LinearMap(a=matrix(a), b=matrix(b))))
        self.assertTrue(resp.rebased)
        self.assertEqual(resp.landmark_epoch, lm.landmark_epoch + 1)
        got = self.client.get(pb.GetTargetsRequest(collection="pydrift",
                                                   ids=ids.tolist(), scored=True))
        mapped = np.frombuffer(got.vectors.data, dtype="<f4").reshape(n, d)
        np.testing.assert_allclose(mapped, scored.astype(np.float64) @ a.T + b,
                                   atol=1e-4)
        info = self.client.info(pb.GetIndexInfoRequest(collection="pydrift"))
        self.assertTrue(info.info.drift.active)
        self.assertEqual(info.info.drift.model_step, 8)
        self.assertEqual(info.info.drift.updates, 2)
        # A stale landmark set is refused, by name.
        self.assert_status(self.client.drift, pb.ApplyDriftRequest(
            collection="pydrift", model_step=9, landmark_epoch=lm.landmark_epoch,
            landmark_embeddings=matrix(x[rows])),
            grpc.StatusCode.FAILED_PRECONDITION, "call GetLandmarks again")

    def test_health_reports_serving(self):
        # HealthCheckRequest{service: ""} is empty; SERVING = 1 is field 1.
        self.assertEqual(self.client.health(b"", timeout=10), b"\x08\x01")


def main():
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
