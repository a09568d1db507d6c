#!/usr/bin/env python3
"""Tests of the negmine Python package (negmine.Client, Prefetcher,
DriftUpdater) against the real server binary, started by the tests on free
loopback ports with temporary data dirs.

Oracles: numpy brute force in float64 (top-k ids exactly, scores within
1e-5 on O(1) scores), the stored vectors bit-exactly, and an in-process
fake server that counts the attempts the channel's retry policy makes.

Run (ctest runs it with the build's venv):
  build/venv/bin/python tests/python/test_client.py --server-bin build/server/negmine-server
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import unittest
from concurrent import futures
from typing import List, Optional

import grpc
import numpy as np

import negmine
from negmine.v1 import negmine_pb2 as pb

try:
    import torch
except ImportError:  # the client works without torch; its tests skip
    torch = None

ARGS: Optional[argparse.Namespace] = None

# The server's message limit in these tests: small, so that a 10 MB upsert
# must be split into several stream messages.
MAX_MESSAGE_BYTES = 4 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_server(port: int = 0, extra: Optional[List[str]] = None) -> negmine.LocalServer:
    """A server of these tests (2 workers, the small message limit), not started."""
    return negmine.LocalServer(ARGS.server_bin, ["--worker_threads=2",
                                                 f"--max_message_bytes={MAX_MESSAGE_BYTES}"]
                               + list(extra or []), port=port)


SERVER: Optional[negmine.LocalServer] = None
ADDRESS = ""


def setUpModule() -> None:
    global SERVER, ADDRESS
    SERVER = new_server().start()
    ADDRESS = f"127.0.0.1:{SERVER.wait_port()}"


def tearDownModule() -> None:
    if SERVER is not None:
        SERVER.stop()


def brute_force(q: np.ndarray, x: np.ndarray, cosine: bool) -> np.ndarray:
    q = q.astype(np.float64)
    x = x.astype(np.float64)
    if cosine:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return q @ x.T


def top_k(scores: np.ndarray, k: int, excluded: Optional[List[set]] = None):
    """Rows of (indices, scores) of the k best, excluded rows skipped, ties by index."""
    s = scores.copy()
    if excluded:
        for i, ex in enumerate(excluded):
            s[i, list(ex)] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


class ClientTest(unittest.TestCase):
    """Collections, upsert, mine, errors, drift and batches on one server."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.c = negmine.Client(ADDRESS, timeout=60)
        cls.c.wait_ready(timeout=30)
        cls.rng = np.random.default_rng(20261201)
        # A cosine tree and an inner-product exact index, d = 32, ids that
        # are not 0..n-1.
        cls.dim, cls.n = 32, 4000
        cls.x = cls.rng.standard_normal((cls.n, cls.dim)).astype(np.float32)
        # Scaled so that inner products are O(1) (scores within 1e-5).
        cls.xip = (0.2 * cls.rng.standard_normal((cls.n, cls.dim))).astype(np.float32)
        cls.ids = np.arange(cls.n, dtype=np.int64) * 7 + 3
        cls.c.create_collection("cos", dim=cls.dim, metric="cosine", index="tree",
                                leaf_size=32)
        cls.c.create_collection("ip", dim=cls.dim, metric="ip", index="exact")
        cls.c.upsert("cos", cls.ids, cls.x)
        cls.c.upsert("ip", cls.ids, cls.xip)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.c.close()

    def queries(self, n: int, scale: float = 1.0) -> np.ndarray:
        return (scale * self.rng.standard_normal((n, self.dim))).astype(np.float32)

    def assert_error(self, cls: type, code: grpc.StatusCode, text: str, fn, *args, **kwargs):
        with self.assertRaises(cls) as cm:
            fn(*args, **kwargs)
        self.assertIsInstance(cm.exception, negmine.NegmineError)
        self.assertEqual(cm.exception.code, code, cm.exception.details)
        self.assertIn(text, cm.exception.details)
        return cm.exception

    # ------------------------------------------------------- collections

    def test_collections_create_list_info_drop(self) -> None:
        info = self.c.create_collection("tmp.coll", dim=8, metric="ip", index="exact",
                                        num_landmarks=70)
        self.assertEqual((info.name, info.dim, info.metric, info.index),
                         ("tmp.coll", 8, "ip", "exact"))
        again = self.c.create_collection("tmp.coll", dim=8, metric="ip", exist_ok=True)
        self.assertEqual(again.dim, 8)
        self.assert_error(negmine.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS,
                          "it has dim = 8", self.c.create_collection, "tmp.coll", dim=9,
                          metric="ip", exist_ok=True)
        self.assert_error(negmine.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS,
                          "collection 'tmp.coll' already exists", self.c.create_collection,
                          "tmp.coll", dim=8)
        names = {ci.name: ci for ci in self.c.list_collections()}
        self.assertIn("tmp.coll", names)
        self.assertEqual(names["cos"].num_targets, self.n)
        info = self.c.info("cos")
        self.assertEqual((info.num_targets, info.metric, info.index), (self.n, "cosine", "tree"))
        self.assertEqual(info.limits.max_message_bytes, MAX_MESSAGE_BYTES)
        self.assertIsNotNone(info.tree)
        self.assertIn("depth", info.tree)
        self.c.drop_collection("tmp.coll")
        self.assertNotIn("tmp.coll", {ci.name for ci in self.c.list_collections()})
        self.assert_error(negmine.NotFound, grpc.StatusCode.NOT_FOUND,
                          "collection 'tmp.coll' not found", self.c.drop_collection, "tmp.coll")

    # ------------------------------------------------------------ mining

    def check_top_k(self, collection: str, x: np.ndarray, cosine: bool, scale: float) -> None:
        q = self.queries(25, scale)
        scores = brute_force(q, x, cosine)
        order, _ = top_k(scores, 3)
        exclude = [self.ids[o].tolist() for o in order]  # each query's 3 best
        r = self.c.mine(q, 10, collection=collection, exclude=exclude)
        want_rows, want_scores = top_k(scores, 10, [set(o) for o in order])
        self.assertEqual(r.ids.shape, (25, 10))
        self.assertEqual(r.ids.dtype, np.int64)
        np.testing.assert_array_equal(r.ids, self.ids[want_rows])
        np.testing.assert_allclose(r.scores, want_scores, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(r.num_top, 10)
        np.testing.assert_array_equal(r.counts, 10)
        self.assertTrue(np.isnan(r.log_q).all(), "top-k results have no log q")
        self.assertGreater(r.index_version, 0)

    def test_top_k_equals_brute_force_with_exclusions_tree(self) -> None:
        self.check_top_k("cos", self.x, cosine=True, scale=1.0)

    def test_top_k_equals_brute_force_with_exclusions_exact(self) -> None:
        self.check_top_k("ip", self.xip, cosine=False, scale=0.5)

    def test_exclude_as_array_with_padding(self) -> None:
        q = self.queries(4)
        scores = brute_force(q, self.x, True)
        order, _ = top_k(scores, 2)
        ex = np.full((4, 3), -1, dtype=np.int64)
        ex[:, :2] = self.ids[order]
        r = self.c.mine(q, 5, collection="cos", exclude=ex)
        want, _ = top_k(scores, 5, [set(o) for o in order])
        np.testing.assert_array_equal(r.ids, self.ids[want])

    def test_sample_and_mixed_shapes_and_log_q(self) -> None:
        q = self.queries(6)
        scores = brute_force(q, self.x, True)
        best, _ = top_k(scores, 1)
        exclude = [[int(self.ids[b[0]])] for b in best]
        r = self.c.mine(q, 8, collection="cos", mode="sample", temperature=0.1, seed=7,
                        exclude=exclude)
        self.assertEqual(r.ids.shape, (6, 8))
        np.testing.assert_array_equal(r.num_top, 0)
        np.testing.assert_array_equal(r.counts, 8)
        self.assertTrue(np.isfinite(r.log_q).all())
        self.assertTrue((r.log_q <= 0).all(), "log q is a log-probability")
        for i in range(6):
            self.assertEqual(len(set(r.ids[i].tolist())), 8, "without replacement")
            self.assertNotIn(exclude[i][0], r.ids[i].tolist())
            # Each returned score is the brute-force score of its id.
            rows = (r.ids[i] - 3) // 7
            np.testing.assert_allclose(r.scores[i], scores[i, rows], atol=1e-5)
        # The same seed draws the same samples.
        again = self.c.mine(q, 8, collection="cos", mode="sample", temperature=0.1, seed=7,
                            exclude=exclude)
        np.testing.assert_array_equal(again.ids, r.ids)

        m = self.c.mine(q, 8, collection="cos", mode="mixed", num_hard=3, temperature=0.1,
                        seed=7, return_log_z=True)
        self.assertEqual(m.ids.shape, (6, 8))
        np.testing.assert_array_equal(m.num_top, 3)
        want, _ = top_k(scores, 3)
        np.testing.assert_array_equal(m.ids[:, :3], self.ids[want])
        self.assertTrue(np.isnan(m.log_q[:, :3]).all(), "top-k part: nan log q")
        self.assertTrue(np.isfinite(m.log_q[:, 3:]).all(), "sampled part: finite log q")
        for i in range(6):
            self.assertFalse(set(m.ids[i, 3:].tolist()) & set(m.ids[i, :3].tolist()))
        self.assertEqual(m.log_z_lo.shape, (6,))
        self.assertTrue((m.log_z_lo <= m.log_z_hi + 1e-9).all())

    def test_padding_when_a_query_is_short(self) -> None:
        n, d = 50, 8
        x = self.rng.standard_normal((n, d)).astype(np.float32)
        self.c.create_collection("small", dim=d, metric="ip", index="exact", exist_ok=True)
        self.c.upsert("small", np.arange(n), x)
        q = self.rng.standard_normal((2, d)).astype(np.float32)
        exclude = [list(range(45)), []]  # query 0: 5 eligible targets
        r = self.c.mine(q, 10, collection="small", exclude=exclude)
        np.testing.assert_array_equal(r.counts, [5, 10])
        self.assertTrue((r.ids[0, 5:] == -1).all())
        self.assertTrue(np.isnan(r.scores[0, 5:]).all())
        self.assertTrue((r.ids[0, :5] >= 45).all())
        self.assertTrue((r.ids[1] >= 0).all())
        if r.num_eligible is not None and r.num_eligible[1] != 0:
            np.testing.assert_array_equal(r.num_eligible, [5, 50])
        # rank_offset near N: only n - offset results remain.
        r = self.c.mine(q, 10, collection="small", rank_offset=46)
        np.testing.assert_array_equal(r.counts, [4, 4])
        self.assertTrue((r.ids[:, 4:] == -1).all())
        want, _ = top_k(brute_force(q, x, False), 50)
        np.testing.assert_array_equal(r.ids[:, :4], want[:, 46:50])
        # Sampling a short query: padded as well, log q finite where sampled.
        r = self.c.mine(q, 10, collection="small", mode="sample", temperature=1.0,
                        exclude=exclude, seed=3)
        np.testing.assert_array_equal(r.counts, [5, 10])
        self.assertTrue(np.isfinite(r.log_q[0, :5]).all())
        self.assertTrue(np.isnan(r.log_q[0, 5:]).all())
        self.assertTrue((r.ids[0, 5:] == -1).all())

    def test_half_precision_and_torch_queries(self) -> None:
        q32 = self.queries(10)
        k = 10
        ref = self.c.mine(q32, k, collection="cos")
        variants = [("float16", q32.astype(np.float16), q32.astype(np.float16).astype(np.float64))]
        if torch is not None:
            t32 = torch.from_numpy(q32)
            variants += [
                ("torch float32", t32, q32.astype(np.float64)),
                ("torch float16", t32.half(), t32.half().double().numpy()),
                ("torch bfloat16", t32.bfloat16(), t32.bfloat16().double().numpy()),
            ]
        exact32 = brute_force(q32, self.x, True)
        for name, q, q_rounded in variants:
            with self.subTest(name):
                r = self.c.mine(q, k, collection="cos")
                # Exactly the brute force of the query as sent (rounded).
                scores = brute_force(q_rounded, self.x, True)
                want, want_scores = top_k(scores, k)
                ids = r.ids.numpy() if torch is not None and torch.is_tensor(r.ids) else r.ids
                got_scores = r.scores.numpy() if torch is not None and torch.is_tensor(
                    r.scores) else r.scores
                np.testing.assert_array_equal(ids, self.ids[want])
                np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
                # Against float32: a float32 top-k id may be missing only if
                # its score is within the rounding's effect of the k-th.
                tol = 2 * np.abs(scores - exact32).max() + 1e-6
                for i in range(len(q32)):
                    missing = set(ref.ids[i].tolist()) - set(ids[i].tolist())
                    for y in missing:
                        row = (y - 3) // 7
                        self.assertLessEqual(ref.scores[i, -1] - exact32[i, row], tol)
                        self.assertGreaterEqual(exact32[i, row] + tol, np.sort(
                            exact32[i, (ids[i] - 3) // 7])[0])
                if name.startswith("torch"):
                    self.assertTrue(torch.is_tensor(r.ids))
                    self.assertEqual(r.ids.dtype, torch.int64)
                    self.assertEqual(r.scores.dtype, torch.float32)
                    self.assertEqual(r.ids.device, q.device)
                    self.assertEqual(r.num_top.device, q.device)

    @unittest.skipIf(torch is None or not torch.cuda.is_available(), "no CUDA device")
    def test_cuda_tensors_in_and_out(self) -> None:
        q = torch.from_numpy(self.queries(4)).cuda()
        r = self.c.mine(q, 5, collection="cos")
        self.assertEqual(r.ids.device, q.device)
        np.testing.assert_array_equal(r.ids.cpu().numpy(),
                                      self.c.mine(q.cpu().numpy(), 5, collection="cos").ids)

    # ------------------------------------------------------------ upsert

    def test_upsert_in_chunks_larger_than_one_message(self) -> None:
        n, d = 10000, 256  # 10 MB of float32: more than one 4 MiB message
        x = self.rng.standard_normal((n, d)).astype(np.float32)
        ids = np.arange(n) + 100
        self.c.create_collection("big", dim=d, metric="ip", index="exact", exist_ok=True)
        self.assert_error(negmine.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "",
                          self.c.upsert, "big", ids, x, chunk_rows=n)
        r = self.c.upsert("big", ids, x, model_step=4)
        self.assertEqual(r.upserted, n)
        self.assertEqual(self.c.info("big").num_targets, n)
        got, steps = self.c.get("big", ids[[0, 4999, n - 1]])
        np.testing.assert_array_equal(got, x[[0, 4999, n - 1]])
        np.testing.assert_array_equal(steps, 4)
        # 5000 queries of d = 256 are 5 MB, more than one 4 MiB request: the
        # client splits the batch.
        q = self.rng.standard_normal((5000, d)).astype(np.float32)
        res = self.c.mine(q, 3, collection="big")
        self.assertEqual(res.ids.shape, (5000, 3))
        want, _ = top_k(brute_force(q[-5:], x, False), 3)
        np.testing.assert_array_equal(res.ids[-5:], ids[want])
        self.c.drop_collection("big")

    @unittest.skipIf(torch is None, "torch is not installed")
    def test_upsert_torch_half_and_bfloat16(self) -> None:
        d = 8
        self.c.create_collection("half", dim=d, metric="ip", index="exact", exist_ok=True)
        t = torch.randn(300, d, generator=torch.Generator().manual_seed(3))
        self.c.upsert("half", torch.arange(300), t.half(), chunk_rows=64)
        self.c.upsert("half", torch.arange(300, 600), t.bfloat16())
        got, _ = self.c.get("half", np.arange(600))
        np.testing.assert_array_equal(got[:300], t.half().float().numpy())
        np.testing.assert_array_equal(got[300:], t.bfloat16().float().numpy())
        self.c.drop_collection("half")

    # ------------------------------------------------------------ errors

    def test_errors_carry_code_and_server_message(self) -> None:
        q = self.queries(2)
        inv = grpc.StatusCode.INVALID_ARGUMENT
        self.assert_error(negmine.NotFound, grpc.StatusCode.NOT_FOUND,
                          "collection 'nope' not found", self.c.mine, q, 3, collection="nope")
        self.assert_error(negmine.InvalidArgument, inv,
                          "queries.cols = 5 does not match the collection's dim = 32",
                          self.c.mine, q[:, :5], 3, collection="cos")
        bad = q.copy()
        bad[1, 3] = np.nan
        self.assert_error(negmine.InvalidArgument, inv, "queries[1][3] = nan",
                          self.c.mine, bad, 3, collection="cos")
        self.assert_error(negmine.InvalidArgument, inv, "params.k = 0",
                          self.c.mine, q, 0, collection="cos")
        self.assert_error(negmine.InvalidArgument, inv, "params.temperature",
                          self.c.mine, q, 3, collection="cos", mode="sample", temperature=-1.0)
        self.assert_error(negmine.InvalidArgument, inv, "vectors.cols = 4",
                          self.c.upsert, "cos", [1, 2], np.ones((2, 4), np.float32))
        self.assert_error(negmine.InvalidArgument, inv, "duplicate id 5",
                          self.c.upsert, "cos", [5, 6, 5], np.ones((3, self.dim), np.float32))
        self.assert_error(negmine.NotFound, grpc.StatusCode.NOT_FOUND, "unknown id 1",
                          self.c.delete, "cos", [1])
        self.assert_error(negmine.NotFound, grpc.StatusCode.NOT_FOUND, "unknown id 2",
                          self.c.get, "cos", [2])
        self.assert_error(negmine.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION,
                          "is ahead of the index", self.c.mine, q, 3, collection="cos",
                          min_index_version=10 ** 9)
        self.c.create_collection("empty", dim=4, exist_ok=True)
        self.assert_error(negmine.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION,
                          "holds no targets yet", self.c.mine, np.ones((1, 4)), 1,
                          collection="empty")
        # Client-side checks raise InvalidArgument too (also a ValueError).
        with self.assertRaises(ValueError):
            self.c.mine(q[0], 3, collection="cos")
        self.assert_error(negmine.InvalidArgument, inv, "mode = 'hard'",
                          self.c.mine, q, 3, collection="cos", mode="hard")
        self.assert_error(negmine.InvalidArgument, inv, "needs a temperature",
                          self.c.mine, q, 3, collection="cos", mode="sample")
        # Nothing changed, and the server still serves.
        self.assertEqual(self.c.info("cos").num_targets, self.n)

    # ------------------------------------------------------------- drift

    def test_drift_updater_applies_and_counts_encodings(self) -> None:
        d, n, m = 16, 2000, 64
        x = self.rng.standard_normal((n, d)).astype(np.float32)
        ids = np.arange(n, dtype=np.int64) + 5
        self.c.create_collection("drift", dim=d, metric="ip", index="tree", num_landmarks=m)
        self.c.upsert("drift", ids, x)
        w = (np.eye(d) + 0.1 * self.rng.standard_normal((d, d))).astype(np.float32)
        calls = []

        def encode(batch_ids: np.ndarray) -> np.ndarray:
            calls.append(len(batch_ids))
            return x[np.asarray(batch_ids) - 5] @ w.T  # "the model at this step"

        upd = negmine.DriftUpdater(self.c, "drift", encode, every=10, reencode_budget=100,
                                   target_ids=ids, seed=1)
        before = self.c.info("drift")
        self.assertIsNone(upd.maybe_update(3))
        self.assertEqual(upd.encodings_spent, 0)
        res = upd.maybe_update(10)
        self.assertIsInstance(res, negmine.DriftResult)
        self.assertGreater(res.index_version, before.index_version)
        self.assertLess(res.heldout_residual, 0.1 * res.stale_residual)
        lm = self.c.landmarks("drift")
        self.assertEqual(upd.landmark_encodings, len(lm.ids))
        self.assertEqual(len(lm.ids), m)
        self.assertEqual(upd.reencode_encodings, 100)
        self.assertEqual(upd.encodings_spent, m + 100)
        self.assertEqual(sum(calls), upd.encodings_spent)
        info = self.c.info("drift")
        self.assertTrue(info.drift["active"])
        self.assertEqual(int(info.drift["model_step"]), 10)
        # The re-encoded targets were upserted with their step, as encoded.
        order = ids[np.random.default_rng(1).permutation(n)]
        first = order[:100]
        got, steps = self.c.get("drift", first)
        np.testing.assert_array_equal(got, x[first - 5] @ w.T)
        np.testing.assert_array_equal(steps, 10)
        # Not due again until step 20; then the next 100 of the rolling order.
        self.assertIsNone(upd.maybe_update(15))
        res2 = upd.maybe_update(21)
        self.assertIsNotNone(res2)
        self.assertGreater(res2.index_version, res.index_version)
        self.assertEqual(upd.encodings_spent, 2 * (m + 100))
        self.assertEqual(upd.updates, 2)
        _, steps = self.c.get("drift", order[100:200])
        np.testing.assert_array_equal(steps, 21)
        # The corrected index serves the moved targets: top-k over x W^T.
        q = self.rng.standard_normal((5, d)).astype(np.float32)
        r = self.c.mine(q, 10, collection="drift")
        want, _ = top_k(brute_force(q, x @ w.T, False), 10)
        recall = np.mean([len(set(r.ids[i]) & set(ids[want[i]])) / 10 for i in range(5)])
        self.assertGreaterEqual(recall, 0.9)
        # A stale landmark set is refused by name; the updater refetches it.
        a = np.eye(d, dtype=np.float32)
        self.c.apply_linear_map(22, a, np.zeros(d, np.float32), collection="drift")
        self.assert_error(negmine.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION,
                          "call GetLandmarks again", self.c.apply_drift, 23,
                          encode(lm.ids), lm.epoch, "drift")
        self.assertIsNotNone(upd.maybe_update(31))
        self.assertEqual(upd.updates, 3)
        self.c.drop_collection("drift")

    # ----------------------------------------------------------- batches

    def test_assign_batches_covers_every_example_once(self) -> None:
        n, d, b = 300, 16, 32
        centers = self.rng.standard_normal((10, d))
        labels = self.rng.integers(0, 10, n)
        qx = (centers[labels] + 0.3 * self.rng.standard_normal((n, d))).astype(np.float32)
        px = (centers[labels] + 0.3 * self.rng.standard_normal((n, d))).astype(np.float32)
        for run_async in (None, True):
            with self.subTest(run_async=run_async):
                r = self.c.assign_batches(qx, px, b, seed=5, run_async=run_async,
                                          chunk_rows=100)
                got = np.sort(np.concatenate(r.batches))
                np.testing.assert_array_equal(got, np.arange(n))
                sizes = [len(x) for x in r.batches]
                self.assertEqual(sum(s != b for s in sizes), 1 if n % b else 0)
                self.assertEqual(r.num_examples, n)
                self.assertGreater(r.in_batch_similarity_after, r.in_batch_similarity_before)
                if run_async:
                    self.assertTrue(r.job_id)

    # -------------------------------------------------------- prefetcher

    def batches(self, count: int, rows: int = 16) -> List[np.ndarray]:
        return [self.queries(rows) for _ in range(count)]

    def test_prefetcher_in_order_equal_to_mine(self) -> None:
        data = self.batches(12)
        with negmine.Prefetcher(self.c, data, k=5, depth=3, collection="cos") as pf:
            got = list(pf)
        self.assertEqual(len(got), 12)
        for q, r in zip(data, got):
            np.testing.assert_array_equal(r.ids, self.c.mine(q, 5, collection="cos").ids)
        # Per-batch dicts override the defaults (exclusions, k).
        ex = [int(i) for i in got[0].ids[0]]
        items = [{"queries": data[0], "exclude": [ex] + [[]] * 15, "k": 3}]
        with negmine.Prefetcher(self.c, items, k=5, collection="cos") as pf:
            (r,) = list(pf)
        self.assertEqual(r.ids.shape, (16, 3))
        self.assertFalse(set(r.ids[0].tolist()) & set(ex))

    @unittest.skipIf(torch is None, "torch is not installed")
    def test_prefetcher_torch_batches(self) -> None:
        data = [torch.from_numpy(q) for q in self.batches(3)]
        with negmine.Prefetcher(self.c, data, k=4, collection="cos", mode="sample",
                                temperature=0.1, seed=1) as pf:
            got = list(pf)
        self.assertTrue(all(torch.is_tensor(r.ids) for r in got))
        self.assertTrue(all(torch.isfinite(r.log_q).all() for r in got))

    def test_prefetcher_bounded_depth_and_runs_ahead(self) -> None:
        pulled = []
        data = self.batches(10)

        def source():
            for i, q in enumerate(data):
                pulled.append(i)
                yield q

        depth = 2
        with negmine.Prefetcher(self.c, source(), k=5, depth=depth, collection="cos") as pf:
            for taken, _ in enumerate(pf, start=1):
                # Never more than depth batches pulled beyond the ones taken...
                self.assertLessEqual(len(pulled), taken + depth)
                # ... and it does run ahead: the next depth are requested
                # while this one "trains".
                want = min(len(data), taken + depth)
                deadline = time.monotonic() + 20
                while len(pulled) < want and time.monotonic() < deadline:
                    time.sleep(0.005)
                self.assertEqual(len(pulled), want)
                self.assertLessEqual(pf.outstanding, depth)
            self.assertLessEqual(pf.max_outstanding, depth)
            self.assertEqual(pf.max_outstanding, depth)

    def test_prefetcher_errors_surface_in_order(self) -> None:
        data = self.batches(6)
        data[3] = data[3][:, :5]  # the server refuses batch 3: wrong dim
        pf = negmine.Prefetcher(self.c, data, k=5, collection="cos")
        with pf:
            for i in range(3):
                np.testing.assert_array_equal(next(pf).ids,
                                              self.c.mine(data[i], 5, collection="cos").ids)
            with self.assertRaises(negmine.InvalidArgument) as cm:
                next(pf)
            self.assertIn("queries.cols = 5", cm.exception.details)
            # The stream goes on after a failed item.
            rest = list(pf)
            self.assertEqual(len(rest), 2)
            np.testing.assert_array_equal(rest[1].ids,
                                          self.c.mine(data[5], 5, collection="cos").ids)

        def failing():
            yield data[0]
            yield data[1]
            raise KeyError("the data loader broke")

        with negmine.Prefetcher(self.c, failing(), k=5, collection="cos") as pf:
            self.assertEqual(len(next(pf)), 16)
            self.assertEqual(len(next(pf)), 16)
            with self.assertRaises(KeyError):
                next(pf)
            with self.assertRaises(StopIteration):
                next(pf)

    def test_prefetcher_clean_shutdown(self) -> None:
        pulled = []

        def endless():
            while True:
                pulled.append(1)
                yield self.queries(8)

        # The consumer breaks early.
        with negmine.Prefetcher(self.c, endless(), k=3, depth=2, collection="cos") as pf:
            for i, _ in enumerate(pf):
                if i == 2:
                    break
        self.assertFalse(pf._reader.is_alive())
        self.assertLessEqual(len(pulled), 3 + 2)
        with self.assertRaises(StopIteration):
            next(pf)
        # The consumer raises.
        with self.assertRaises(RuntimeError):
            with negmine.Prefetcher(self.c, endless(), k=3, collection="cos") as pf:
                next(pf)
                raise RuntimeError("training step failed")
        self.assertFalse(pf._reader.is_alive())
        # The stream fails (its deadline passes while the consumer is slow):
        # buffered results first, then the error, then the end.
        with negmine.Prefetcher(self.c, endless(), k=3, depth=2, collection="cos",
                                timeout=2.0) as pf:
            got = 0
            with self.assertRaises(negmine.DeadlineExceeded):
                while True:
                    next(pf)
                    got += 1
                    time.sleep(0.3)
            with self.assertRaises(StopIteration):
                next(pf)
        self.assertGreaterEqual(got, 1)
        self.assertFalse(pf._reader.is_alive())


class ServerLifecycleTest(unittest.TestCase):
    """Calls made before the server is up, wait_ready, and tokens."""

    def test_call_started_before_the_server_is_up_succeeds(self) -> None:
        port = free_port()
        # 20k generated targets: the server answers UNAVAILABLE while it
        # loads them, after the port opens.
        server = new_server(port, ["--default_dim=16", "--generate_targets=20000"])
        # The default client, and one without the retry policy: the channel's
        # health gating alone keeps its call waiting through the recovery.
        clients = {"default": negmine.Client(f"127.0.0.1:{port}", timeout=30),
                   "no retry": negmine.Client(f"127.0.0.1:{port}", timeout=30, retry=False)}
        results = {name: {} for name in clients}

        def call(name: str) -> None:
            try:
                results[name]["info"] = clients[name].info("default")
            except Exception as e:  # reported below
                results[name]["error"] = e

        threads = [threading.Thread(target=call, args=(name,)) for name in clients]
        try:
            for t in threads:
                t.start()
            time.sleep(1.0)
            self.assertTrue(all(t.is_alive() for t in threads),
                            f"a call did not wait: {results}")
            server.start()
            for t in threads:
                t.join(timeout=40)
                self.assertFalse(t.is_alive())
            for name in clients:
                self.assertNotIn("error", results[name], name)
                self.assertEqual(results[name]["info"].num_targets, 20000, name)
        finally:
            for c in clients.values():
                c.close()
            server.stop()

    def test_wait_ready_and_tokens(self) -> None:
        port = free_port()
        tmp = tempfile.mkdtemp(prefix="negmine-token-")
        token_file = os.path.join(tmp, "token")
        with open(token_file, "w") as f:
            f.write("s3cret\n")
        server = new_server(port, [f"--auth_token_file={token_file}"])
        client = negmine.Client(f"127.0.0.1:{port}", token="s3cret", timeout=30)
        anonymous = negmine.Client(f"127.0.0.1:{port}", timeout=30)
        try:
            with self.assertRaises(negmine.DeadlineExceeded) as cm:
                client.wait_ready(timeout=0.5)
            self.assertIn("did not report SERVING", cm.exception.details)
            timer = threading.Timer(1.0, server.start)
            timer.start()
            client.wait_ready(timeout=40)
            timer.join()
            self.assertEqual(client.list_collections(), [])
            anonymous.wait_ready(timeout=10)  # health stays open
            with self.assertRaises(negmine.Unauthenticated) as cm:
                anonymous.list_collections()
            self.assertEqual(cm.exception.code, grpc.StatusCode.UNAUTHENTICATED)

            # The server dies under a Prefetcher: the buffered results, then
            # Unavailable, then the end; nothing hangs.
            rng = np.random.default_rng(9)
            client.create_collection("p", dim=8, metric="ip", index="exact")
            client.upsert("p", np.arange(100), rng.standard_normal((100, 8)))

            def endless():
                while True:
                    yield rng.standard_normal((4, 8)).astype(np.float32)

            with negmine.Prefetcher(client, endless(), k=3, depth=2, collection="p") as pf:
                self.assertEqual(next(pf).ids.shape, (4, 3))
                server.proc.kill()
                server.proc.wait()
                got = 0
                with self.assertRaises(negmine.Unavailable):
                    while True:
                        next(pf)
                        got += 1
                self.assertLessEqual(got, 2)
                with self.assertRaises(StopIteration):
                    next(pf)
            self.assertFalse(pf._reader.is_alive())
        finally:
            client.close()
            anonymous.close()
            server.stop()
            shutil.rmtree(tmp, ignore_errors=True)


class RetryPolicyTest(unittest.TestCase):
    """The channel's retry policy, against an in-process fake server that
    answers UNAVAILABLE a given number of times and counts the attempts."""

    def setUp(self) -> None:
        self.attempts = 0
        self.fail_first = 0
        self.lock = threading.Lock()

        def get_index_info(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self.lock:
                self.attempts += 1
                fail = self.attempts <= self.fail_first
            if fail:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting (fake)")
            return pb.GetIndexInfoResponse(
                info=pb.CollectionInfo(config=pb.CollectionConfig(name="default", dim=3),
                                       num_targets=7)).SerializeToString()

        def health_watch(request: bytes, context: grpc.ServicerContext):
            # SERVING, then the stream stays open until the call ends.
            yield b"\x08\x01"
            done = threading.Event()
            context.add_callback(done.set)
            done.wait()

        handler = grpc.method_handlers_generic_handler("negmine.v1.NegativeMiner", {
            "GetIndexInfo": grpc.unary_unary_rpc_method_handler(get_index_info)})
        health = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Watch": grpc.unary_stream_rpc_method_handler(health_watch)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler, health))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def tearDown(self) -> None:
        self.server.stop(None)

    def test_unavailable_is_retried_until_it_succeeds(self) -> None:
        self.fail_first = 3
        with negmine.Client(self.address, timeout=30) as c:
            self.assertEqual(c.info().num_targets, 7)
        self.assertEqual(self.attempts, 4)

    def test_retries_stop_at_the_policy_limit(self) -> None:
        self.fail_first = 100
        with negmine.Client(self.address, timeout=30) as c:
            with self.assertRaises(negmine.Unavailable) as cm:
                c.info()
        self.assertEqual(self.attempts, negmine.RETRY_POLICY["maxAttempts"])
        self.assertEqual(cm.exception.details, "the server is starting (fake)")

    def test_no_retry_when_disabled(self) -> None:
        self.fail_first = 1
        with negmine.Client(self.address, timeout=30, retry=False) as c:
            with self.assertRaises(negmine.Unavailable):
                c.info()
        self.assertEqual(self.attempts, 1)


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-bin", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
