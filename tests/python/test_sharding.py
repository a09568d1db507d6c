#!/usr/bin/env python3
"""Tests of negmine.ShardedClient against real negmine-server processes on
loopback, one per shard (plus one holding the union, the single-server
oracle).

Oracles and tolerances:
- top-k: the single server over the union (ids exactly, scores to 1e-6)
  and numpy brute force in float64;
- samples: chi-square goodness of fit against the global softmax computed in
  float64 by brute force (fixed seeds; fail below p = 1e-4), for the first
  and second draw without replacement and for draws with replacement;
  global log q against s / tau - log Z to the certified width;
- proposal samples: the draws' frequencies against their own global log q;
- a killed shard: UNAVAILABLE naming it, or with allow_partial the merged
  answer over the others and its coverage;
- resharding 2 -> 4 with a concurrent writer: every write lands on its new
  owner bit-exactly, nothing is left on the old one, nothing is lost.

Run (ctest runs it with the build's venv):
  build/venv/bin/python tests/python/test_sharding.py --server-bin build/server/negmine-server
"""
from __future__ import annotations

import argparse
import sys
import threading
import unittest
from typing import List, Optional

import numpy as np
from scipy import stats

import negmine

ARGS: Optional[argparse.Namespace] = None
P_MIN = 1e-4


def start_servers(n: int) -> List[negmine.LocalServer]:
    servers = []
    try:
        for _ in range(n):
            servers.append(negmine.LocalServer(ARGS.server_bin, ["--worker_threads=1"]).start())
        for s in servers:
            s.wait_port()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def softmax_rows(s: np.ndarray, tau: float) -> np.ndarray:
    z = s / tau
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def chi_square_p(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Goodness of fit of counts to probs; cells with expected < min_expected
    are pooled into one."""
    n = counts.sum()
    expected = n * probs
    big = expected >= min_expected
    obs = list(counts[big]) + [counts[~big].sum()]
    exp = list(expected[big]) + [expected[~big].sum()]
    if exp[-1] < min_expected:  # fold the pooled tail into the smallest cell
        i = int(np.argmin(exp[:-1]))
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    obs, exp = np.asarray(obs, float), np.asarray(exp, float)
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(stats.chi2.sf(stat, len(obs) - 1))


class ShardedFixture(unittest.TestCase):
    """Four shards and one union server; data: N targets, dim 16."""

    N, DIM, SHARDS = 400, 16, 4

    @classmethod
    def setUpClass(cls) -> None:
        cls.servers = start_servers(cls.SHARDS + 1)
        cls.union = negmine.Client(cls.servers[-1].address)
        cls.sharded = negmine.ShardedClient([s.address for s in cls.servers[:-1]])
        rng = np.random.default_rng(7)
        centers = rng.normal(size=(8, cls.DIM))
        x = centers[rng.integers(0, 8, cls.N)] + 0.7 * rng.normal(size=(cls.N, cls.DIM))
        cls.x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        cls.ids = rng.permutation(10**6)[:cls.N].astype(np.int64) + 17
        cls.q = rng.normal(size=(6, cls.DIM)).astype(np.float32)
        cls.q /= np.linalg.norm(cls.q, axis=1, keepdims=True)
        # Sampling queries near targets: the softmax mass is then far from
        # even across shards, so that a merge that ignores Z_s fails.
        near = cls.x[[0, 1, 2]] + 0.3 * rng.normal(size=(3, cls.DIM))
        cls.qs = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)
        for name, index in (("tree", "tree"), ("exact", "exact")):
            cls.union.create_collection(name, cls.DIM, metric="ip", index=index,
                                        leaf_size=8, branching=4)
            cls.sharded.create_collection(name, cls.DIM, metric="ip", index=index,
                                          leaf_size=8, branching=4)
            cls.union.upsert(name, cls.ids, cls.x)
            cls.sharded.upsert(name, cls.ids, cls.x)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.sharded.close()
        cls.union.close()
        for s in cls.servers:
            s.stop()

    def scores(self, q: np.ndarray) -> np.ndarray:
        return q.astype(np.float64) @ self.x.astype(np.float64).T


class RingTest(unittest.TestCase):
    def test_balance_and_growth_moves_only_to_new_shards(self) -> None:
        ids = np.arange(200000, dtype=np.int64) * 7919
        r4, r8 = negmine.HashRing(4), negmine.HashRing(8)
        o4, o8 = r4.owner(ids), r8.owner(ids)
        share = np.bincount(o4, minlength=4) / len(ids)
        self.assertLess(np.abs(share - 0.25).max(), 0.06, share)
        moved = o4 != o8
        # An id that moves goes to a new shard, never to another old one.
        self.assertTrue(np.all(o8[moved] >= 4))
        self.assertTrue(np.all(o8[~moved] == o4[~moved]))
        self.assertLess(abs(moved.mean() - 0.5), 0.06)


class MergeTest(ShardedFixture):
    def test_routing_puts_each_id_on_its_owner(self) -> None:
        owner = self.sharded.ring.owner(self.ids)
        infos = self.sharded.info("tree")
        for s, info in enumerate(infos):
            self.assertEqual(info.num_targets, int((owner == s).sum()))
            mine = self.ids[owner == s]
            vec, _ = self.sharded.shards[s].get("tree", mine)
            np.testing.assert_array_equal(vec, self.x[owner == s])

    def test_top_k_equals_single_server_over_the_union(self) -> None:
        excl = [[int(self.ids[i])] for i in range(len(self.q))]
        for coll in ("tree", "exact"):
            for k, offset in ((10, 0), (37, 3), (130, 0)):
                a = self.sharded.mine(self.q, k, collection=coll, exclude=excl,
                                      rank_offset=offset)
                b = self.union.mine(self.q, k, collection=coll, exclude=excl,
                                    rank_offset=offset)
                np.testing.assert_array_equal(a.ids, b.ids)
                np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
                np.testing.assert_array_equal(a.num_eligible, b.num_eligible)
                self.assertEqual(a.coverage, 1.0)
        # And against brute force.
        s = self.scores(self.q)
        best = np.argsort(-s, axis=1, kind="stable")[:, :10]
        r = self.sharded.mine(self.q, 10, collection="exact")
        np.testing.assert_array_equal(r.ids, self.ids[best])

    def _rows(self, i: int, n: int) -> np.ndarray:
        return np.repeat(self.qs[i:i + 1], n, axis=0)

    def test_exact_samples_with_replacement_follow_the_global_softmax(self) -> None:
        tau = 0.1
        for coll in ("tree", "exact"):
            for qi in (0, 1):
                counts = np.zeros(self.N)
                for seed in range(1, 9):
                    r = self.sharded.mine(self._rows(qi, 100), 20, collection=coll,
                                          mode="sample", sampler="exact", temperature=tau,
                                          with_replacement=True, seed=seed,
                                          return_log_z=True)
                    pos = {int(v): j for j, v in enumerate(self.ids)}
                    for v in r.ids.ravel():
                        counts[pos[int(v)]] += 1
                s = self.scores(self.qs[qi:qi + 1])
                p = softmax_rows(s, tau)[0]
                self.assertGreater(chi_square_p(counts, p), P_MIN, (coll, qi))
                log_z = np.log(np.exp(s[0] / tau).sum())
                self.assertLessEqual(r.log_z_lo[0], log_z + 1e-6)
                self.assertGreaterEqual(r.log_z_hi[0], log_z - 1e-6)
                j = pos[int(r.ids[0, 0])]
                self.assertAlmostEqual(float(r.log_q[0, 0]), s[0, j] / tau - log_z,
                                       delta=0.02)

    def test_exact_samples_without_replacement_follow_plackett_luce(self) -> None:
        tau = 0.1
        # A coarse first interval (0.5 nats) makes the merge ask for tighter
        # ones; the law must not change.
        for coll, width in (("tree", 0.0), ("exact", 0.0), ("tree", 0.5)):
            qi = 1
            s = self.scores(self.qs[qi:qi + 1])
            p = softmax_rows(s, tau)[0]
            # Second draw: P(y2 = j) = sum_i p_i p_j / (1 - p_i), i != j.
            p2 = p * ((p / (1 - p)).sum() - p / (1 - p))
            first, second = np.zeros(self.N), np.zeros(self.N)
            pos = {int(v): j for j, v in enumerate(self.ids)}
            for seed in range(1, 11):
                r = self.sharded.mine(self._rows(qi, 200), 6, collection=coll, mode="sample",
                                      sampler="exact", temperature=tau, seed=seed,
                                      log_z_width=width)
                for row in r.ids:
                    self.assertEqual(len(set(row.tolist())), 6)
                    first[pos[int(row[0])]] += 1
                    second[pos[int(row[1])]] += 1
                self.assertEqual(r.unresolved, 0)
            self.assertGreater(chi_square_p(first, p), P_MIN, coll)
            self.assertGreater(chi_square_p(second, p2), P_MIN, coll)

    def test_proposal_samples_carry_their_global_log_q(self) -> None:
        tau = 0.1
        qi = 2
        counts: dict = {}
        log_q: dict = {}
        total = 0
        for seed in range(1, 9):
            r = self.sharded.mine(self._rows(qi, 100), 20, collection="tree", mode="sample",
                                  temperature=tau, with_replacement=True, seed=seed)
            for v, lq in zip(r.ids.ravel(), r.log_q.ravel()):
                counts[int(v)] = counts.get(int(v), 0) + 1
                log_q.setdefault(int(v), float(lq))
                self.assertAlmostEqual(log_q[int(v)], float(lq), delta=1e-5)
                total += 1
        keys = sorted(counts)
        q = np.exp([log_q[v] for v in keys])
        self.assertLessEqual(q.sum(), 1.0 + 1e-4)
        obs = np.array([counts[v] for v in keys] + [0.0])
        probs = np.append(q, max(0.0, 1.0 - q.sum()))
        self.assertGreater(chi_square_p(obs, probs / probs.sum()), P_MIN)
        # Without replacement: distinct, and log q from the same proposal.
        r = self.sharded.mine(self._rows(qi, 20), 12, collection="tree", mode="sample",
                              temperature=tau, seed=5)
        for row, lrow in zip(r.ids, r.log_q):
            self.assertEqual(len(set(row.tolist())), 12)
            for v, lq in zip(row, lrow):
                if int(v) in log_q:
                    self.assertAlmostEqual(log_q[int(v)], float(lq), delta=1e-5)

    def test_mixed_and_rank_offset_take_the_global_top_out_of_the_samples(self) -> None:
        tau = 0.25
        r = self.sharded.mine(self.q, 12, collection="exact", mode="mixed", num_hard=4,
                              rank_offset=2, temperature=tau, sampler="exact", seed=3)
        top = self.union.mine(self.q, 6, collection="exact")
        np.testing.assert_array_equal(r.ids[:, :4], top.ids[:, 2:6])
        np.testing.assert_array_equal(r.num_top, np.full(len(self.q), 4))
        s = self.scores(self.q)
        pos = {int(v): j for j, v in enumerate(self.ids)}
        for i in range(len(self.q)):
            skipped = set(top.ids[i].tolist())
            sampled = r.ids[i, 4:].tolist()
            self.assertFalse(skipped & set(sampled))
            rest = np.array([j for j in range(self.N) if int(self.ids[j]) not in skipped])
            log_z = np.log(np.exp(s[i, rest] / tau).sum())
            for v, lq in zip(sampled, r.log_q[i, 4:]):
                self.assertAlmostEqual(float(lq), s[i, pos[v]] / tau - log_z, delta=0.02)

    def test_read_your_writes_carries_a_version_per_shard(self) -> None:
        other = negmine.ShardedClient(self.sharded.addresses)
        try:
            new_id = np.array([5], dtype=np.int64)
            vec = self.q[:1].copy()
            self.sharded.upsert("exact", new_id, vec)
            r = other.mine(vec, 1, collection="exact",
                           min_versions=self.sharded.versions("exact"))
            self.assertEqual(int(r.ids[0, 0]), 5)
            owner = int(self.sharded.ring.owner(new_id)[0])
            ahead = self.sharded.versions("exact")
            ahead[owner] += 1000
            with self.assertRaises(negmine.FailedPrecondition) as cm:
                other.mine(vec, 1, collection="exact", min_versions=ahead)
            self.assertIn(f"shard {owner}", str(cm.exception))
        finally:
            self.sharded.delete("exact", [5])
            other.close()

    def test_drift_broadcast_reaches_every_shard_with_one_step(self) -> None:
        self.sharded.create_collection("drift", self.DIM, metric="ip", num_landmarks=8)
        self.sharded.upsert("drift", self.ids, self.x)
        lm = self.sharded.landmarks("drift")
        self.assertEqual(len(lm.per_shard), self.SHARDS)
        vec, _ = self.sharded.get("drift", lm.ids)
        results = self.sharded.apply_drift(3, vec * 1.01, lm, collection="drift")
        self.assertEqual(len(results), self.SHARDS)
        for s, info in enumerate(self.sharded.info("drift")):
            self.assertEqual(int(info.drift["model_step"]), 3)
            self.assertGreaterEqual(info.index_version, results[s].index_version)
        r = self.sharded.mine(self.q, 5, collection="drift")
        for s in range(self.SHARDS):
            self.assertGreaterEqual(r.shard_versions[s], results[s].index_version)


class FailureTest(unittest.TestCase):
    def test_a_killed_shard(self) -> None:
        servers = start_servers(3)
        try:
            c = negmine.ShardedClient([s.address for s in servers], timeout=20)
            c.create_collection("c", 8, metric="ip", index="exact")
            rng = np.random.default_rng(1)
            ids = np.arange(300, dtype=np.int64)
            x = rng.normal(size=(300, 8)).astype(np.float32)
            c.upsert("c", ids, x)
            q = rng.normal(size=(3, 8)).astype(np.float32)
            self.assertEqual(c.mine(q, 5, collection="c").coverage, 1.0)
            servers[1].proc.kill()
            servers[1].proc.wait()
            with self.assertRaises(negmine.Unavailable) as cm:
                c.mine(q, 5, collection="c")
            self.assertIn(f"shard 1 ({servers[1].address})", str(cm.exception))
            r = c.mine(q, 5, collection="c", allow_partial=True)
            owner = c.ring.owner(ids)
            alive = owner != 1
            self.assertAlmostEqual(r.coverage, alive.sum() / len(ids), places=6)
            self.assertEqual(r.missing_shards, [1])
            self.assertEqual(r.shard_versions[1], -1)
            s = q.astype(np.float64) @ x[alive].astype(np.float64).T
            np.testing.assert_array_equal(r.ids, ids[alive][np.argsort(-s, axis=1)[:, :5]])
            rs = c.mine(q, 8, collection="c", allow_partial=True, mode="sample",
                        sampler="exact", temperature=0.5, seed=2)
            self.assertTrue(np.all(owner[rs.ids] != 1))
            c.close()
        finally:
            for s in servers:
                s.stop()


class ReshardTest(unittest.TestCase):
    def test_two_to_four_with_a_concurrent_writer_loses_nothing(self) -> None:
        servers = start_servers(4)
        try:
            c = negmine.ShardedClient([s.address for s in servers[:2]])
            c.create_collection("r", 8, metric="ip", index="tree", leaf_size=8)
            rng = np.random.default_rng(3)
            truth = {}
            ids = np.arange(1000, dtype=np.int64) * 3
            x = rng.normal(size=(1000, 8)).astype(np.float32)
            c.upsert("r", ids, x)
            truth.update({int(i): x[j] for j, i in enumerate(ids)})
            deleted = set()
            stop = threading.Event()
            errors: List[BaseException] = []
            overlapped: List[bool] = []

            def writer() -> None:
                wrng = np.random.default_rng(4)
                n = 0
                while not c.resharding:  # `ids` lists every id as of the call
                    if stop.wait(0.001):
                        break
                try:
                    while not stop.is_set() or n < 20:
                        new = np.array([10**6 + n], dtype=np.int64)
                        old = np.array([int(ids[wrng.integers(0, 1000)])])
                        v = wrng.normal(size=(2, 8)).astype(np.float32)
                        overlapped.append(c.resharding)
                        c.upsert("r", np.concatenate([new, old]), v)
                        truth[int(new[0])] = v[0]
                        truth[int(old[0])] = v[1]
                        deleted.discard(int(old[0]))
                        if n % 3 == 0:
                            d = int(ids[wrng.integers(0, 1000)])
                            c.delete("r", [d], allow_missing=True)
                            truth.pop(d, None)
                            deleted.add(d)
                        n += 1
                except BaseException as e:  # reported by the main thread
                    errors.append(e)

            t = threading.Thread(target=writer)
            t.start()
            report = c.reshard([s.address for s in servers[2:]], ids, collection="r",
                               chunk=64)
            stop.set()
            t.join()
            self.assertEqual(errors, [])
            self.assertGreater(sum(overlapped), 5)  # writes raced the copy
            self.assertEqual(report["shards"], 4)
            self.assertGreater(report["moving"], 300)
            live = np.array(sorted(truth), dtype=np.int64)
            owner = c.ring.owner(live)
            for s in range(4):
                self.assertEqual(c.shards[s].info("r").num_targets, int((owner == s).sum()))
            vec, _ = c.get("r", live)
            np.testing.assert_array_equal(vec, np.stack([truth[int(i)] for i in live]))
            for d in deleted:
                with self.assertRaises(negmine.NotFound):
                    c.shards[int(c.ring.owner([d])[0])].get("r", [d])
            q = rng.normal(size=(4, 8)).astype(np.float32)
            s = q.astype(np.float64) @ vec.astype(np.float64).T
            r = c.mine(q, 10, collection="r")
            np.testing.assert_array_equal(r.ids, live[np.argsort(-s, axis=1)[:, :10]])
            c.close()
        finally:
            for s in servers:
                s.stop()


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-bin", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
