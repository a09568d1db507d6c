#!/usr/bin/env python3
"""negmine.mine_hard_negatives and Client.mine's false-negative controls
against a real negmine-server, with a brute-force numpy oracle in float64.

Data: fixed seeds; random unit vectors, each query near its positive, so
that s_pos > 0. Oracle comparisons need a clear gap: the test asserts that
no target scores within GAP of a filter's threshold or of the k-th eligible
score (float32 on the server against float64 here), so an id set can only
differ through a real bug.

Run (ctest runs it with the build's venv):
  build/venv/bin/python tests/python_hard_negatives_test.py --server-bin build/server/negmine-server
"""
from __future__ import annotations

import argparse
import sys
import unittest
from typing import List, Optional

import numpy as np

import negmine

ARGS: Optional[argparse.Namespace] = None
GAP = 5e-6        # the smallest distance of any score from a decision boundary
SCORE_TOL = 1e-5  # float32 scores against float64 ones


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(seed: int, n: int = 400, q: int = 24, dim: int = 16, noise: float = 0.25):
    rng = np.random.default_rng(seed)
    corpus = unit(rng.standard_normal((n, dim)))
    pos = rng.choice(n, size=q, replace=False)
    queries = unit(corpus[pos] + noise * rng.standard_normal((q, dim)))
    return queries.astype(np.float32), corpus.astype(np.float32), pos


def oracle_eligible(queries, corpus, positives: List[List[int]], relative_margin=None,
                    max_score=None):
    """Per query: (eligible ids sorted by score desc then id, the scores of
    all targets, s_pos, the threshold used, the positives)."""
    s = unit(queries.astype(np.float64)) @ unit(corpus.astype(np.float64)).T
    out = []
    for i, pos in enumerate(positives):
        s_pos = min(s[i, p] for p in pos)
        keep = np.ones(len(corpus), bool)
        keep[pos] = False
        threshold = np.inf
        if relative_margin is not None:
            threshold = min(threshold, s_pos - abs(s_pos) * relative_margin)
        if max_score is not None:
            threshold = min(threshold, max_score)
        keep &= s[i] <= threshold
        ids = np.nonzero(keep)[0]
        order = sorted(ids.tolist(), key=lambda j: (-s[i, j], j))
        out.append((order, s[i], s_pos, threshold, pos))
    return out


class HardNegativesTest(unittest.TestCase):
    server: negmine.LocalServer
    client: negmine.Client

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = negmine.LocalServer(ARGS.server_bin, ["--worker_threads=1"]).start()
        cls.server.wait_port()
        cls.client = negmine.Client(cls.server.address)
        cls.client.wait_ready()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()
        cls.server.stop()

    def assert_gaps(self, oracle, k: int, offset: int = 0) -> None:
        """The precondition of exact id comparisons: no score near a
        threshold, nor near the boundary between rank offset + k - 1 and
        offset + k (and offset - 1 / offset)."""
        for order, s, _, threshold, pos in oracle:
            if np.isfinite(threshold):
                others = np.delete(s, pos)  # a positive is excluded whatever its score
                self.assertGreater(np.min(np.abs(others - threshold)), GAP,
                                   "seed: a score at the margin")
            for b in (offset, offset + k):
                if 0 < b < len(order):
                    self.assertGreater(s[order[b - 1]] - s[order[b]], GAP, "seed: a tie at rank")

    def test_top_with_relative_margin_matches_oracle(self) -> None:
        queries, corpus, pos = make_data(seed=11)
        m, k = 0.1, 5
        positives = [[int(p)] for p in pos]
        oracle = oracle_eligible(queries, corpus, positives, relative_margin=m)
        self.assert_gaps(oracle, k)
        rows = negmine.mine_hard_negatives(
            query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
            server=self.client, relative_margin=m, num_negatives=k, sampling_strategy="top",
            output_format="n-tuple", output_scores=True)
        self.assertEqual(len(rows), len(queries))
        for i, row in enumerate(rows):
            order, s, s_pos, _, _ = oracle[i]
            self.assertGreater(s_pos, 0)
            got = [row[f"negative_{j}"] for j in range(1, k + 1)]
            self.assertEqual(got, order[:k], f"query {i}")
            self.assertEqual(row["anchor"], i)
            self.assertEqual(row["positive"], int(pos[i]))
            self.assertAlmostEqual(row["scores"][0], s_pos, delta=SCORE_TOL)
            for j, neg in enumerate(got):
                self.assertLessEqual(row["scores"][1 + j], (1 - m) * s_pos + SCORE_TOL)
                self.assertAlmostEqual(row["scores"][1 + j], s[neg], delta=SCORE_TOL)

    def test_range_min_skips_the_best_eligible(self) -> None:
        queries, corpus, pos = make_data(seed=12)
        m, k, offset = 0.05, 4, 3
        positives = [[int(p)] for p in pos]
        oracle = oracle_eligible(queries, corpus, positives, relative_margin=m)
        self.assert_gaps(oracle, k, offset)
        rows = negmine.mine_hard_negatives(
            query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
            server=self.client, relative_margin=m, range_min=offset, num_negatives=k,
            output_format="n-tuple")
        for i, row in enumerate(rows):
            self.assertEqual([row[f"negative_{j}"] for j in range(1, k + 1)],
                             oracle[i][0][offset:offset + k], f"query {i}")

    def test_output_shapes(self) -> None:
        queries, corpus, pos = make_data(seed=13)
        k = 3
        common = dict(query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
                      server=self.client, num_negatives=k, relative_margin=0.0)
        triplets = negmine.mine_hard_negatives(output_format="triplet", **common)
        ntuples = negmine.mine_hard_negatives(output_format="n-tuple", **common)
        self.assertEqual(len(triplets), len(queries) * k)
        self.assertEqual(len(ntuples), len(queries))
        self.assertTrue(all(set(r) == {"anchor", "positive", "negative"} for r in triplets))
        want = {"anchor", "positive"} | {f"negative_{j}" for j in range(1, k + 1)}
        self.assertTrue(all(set(r) == want for r in ntuples))
        # The same negatives, one row each in the triplets.
        for i, r in enumerate(ntuples):
            mine = [t["negative"] for t in triplets if t["anchor"] == i]
            self.assertEqual(mine, [r[f"negative_{j}"] for j in range(1, k + 1)])
        scored = negmine.mine_hard_negatives(output_format="triplet", output_scores=True,
                                             **common)
        self.assertTrue(all(len(r["scores"]) == 2 for r in scored))
        pairs = negmine.mine_hard_negatives(output_format="labeled-pair", **common)
        self.assertEqual(len(pairs), len(queries) * (1 + k))
        self.assertEqual(sum(r["label"] for r in pairs), len(queries))
        lists = negmine.mine_hard_negatives(output_format="labeled-list", output_scores=True,
                                            **common)
        self.assertEqual(len(lists), len(queries))
        self.assertTrue(all(len(r["positive"]) == len(r["scores"]) == 1 + k for r in lists))
        self.assertTrue(all(r["positive"][0] == int(pos[r["anchor"]]) for r in lists))

    def test_ntuple_leaves_out_short_queries(self) -> None:
        queries, corpus, pos = make_data(seed=14)
        positives = [[int(p)] for p in pos]
        # max_score below most scores: some queries keep fewer than k.
        k, cap = 6, -0.55
        oracle = oracle_eligible(queries, corpus, positives, max_score=cap)
        self.assert_gaps(oracle, k)
        enough = [i for i, o in enumerate(oracle) if len(o[0]) >= k]
        self.assertTrue(0 < len(enough) < len(queries), "seed: no short query")
        rows = negmine.mine_hard_negatives(
            query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
            server=self.client, max_score=cap, num_negatives=k, output_format="n-tuple")
        self.assertEqual([r["anchor"] for r in rows], enough)
        triplets = negmine.mine_hard_negatives(
            query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
            server=self.client, max_score=cap, num_negatives=k, output_format="triplet")
        self.assertEqual(len(triplets), sum(min(k, len(o[0])) for o in oracle))

    def test_random_draws_from_the_window(self) -> None:
        queries, corpus, pos = make_data(seed=15)
        m, k, lo, hi = 0.05, 4, 2, 20
        positives = [[int(p)] for p in pos]
        oracle = oracle_eligible(queries, corpus, positives, relative_margin=m)
        self.assert_gaps(oracle, hi - lo, lo)
        args = dict(query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
                    server=self.client, relative_margin=m, range_min=lo, range_max=hi,
                    num_negatives=k, sampling_strategy="random", output_format="n-tuple",
                    output_scores=True, seed=7)
        rows = negmine.mine_hard_negatives(**args)
        again = negmine.mine_hard_negatives(**args)
        self.assertEqual(rows, again, "the same seed draws the same negatives")
        seen = set()
        for i, row in enumerate(rows):
            got = [row[f"negative_{j}"] for j in range(1, k + 1)]
            self.assertEqual(len(set(got)), k)
            self.assertTrue(set(got) <= set(oracle[i][0][lo:hi]), f"query {i}")
            self.assertEqual(row["scores"][1:], sorted(row["scores"][1:], reverse=True))
            seen.update(oracle[i][0][lo:hi].index(g) for g in got)
        # Uniform over 18 ranks, 24 x 4 draws: ranks past the top k do come up.
        self.assertGreater(max(seen), k)

    def test_sampling_strategies_respect_the_filters(self) -> None:
        queries, corpus, pos = make_data(seed=21)
        m, k, pool = 0.1, 4, 30
        positives = [[int(p)] for p in pos]
        oracle = oracle_eligible(queries, corpus, positives, relative_margin=m)
        self.assert_gaps(oracle, pool)
        common = dict(query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
                      server=self.client, relative_margin=m, num_negatives=k,
                      output_format="n-tuple", output_scores=True, seed=3)
        softmax = negmine.mine_hard_negatives(sampling_strategy="softmax", temperature=0.05,
                                              **common)
        simans = negmine.mine_hard_negatives(sampling_strategy="simans", range_max=pool,
                                             **common)
        for name, rows, allowed in (("softmax", softmax, None), ("simans", simans, pool)):
            self.assertEqual(len(rows), len(queries), name)
            for row in rows:
                order, s, _, threshold, _ = oracle[row["anchor"]]
                got = [row[f"negative_{j}"] for j in range(1, k + 1)]
                self.assertEqual(len(set(got)), k, name)
                self.assertTrue(set(got) <= set(order[:allowed]), (name, got))
                for j, neg in enumerate(got):
                    self.assertLessEqual(s[neg], threshold, name)
                    self.assertAlmostEqual(row["scores"][1 + j], s[neg], delta=SCORE_TOL)

    def test_texts_and_an_encoder(self) -> None:
        queries, corpus, pos = make_data(seed=16, n=60, q=8)
        table = {f"doc {j}": corpus[j] for j in range(len(corpus))}
        table.update({f"question {i}": queries[i] for i in range(len(queries))})
        calls = []

        def encoder(texts):
            calls.append(len(texts))
            return np.stack([table[t] for t in texts])

        k = 3
        rows = negmine.mine_hard_negatives(
            queries=[f"question {i}" for i in range(len(queries))],
            positives=[f"doc {p}" for p in pos],
            corpus=[f"doc {j}" for j in range(len(corpus))], encoder=encoder,
            server=self.client, num_negatives=k, output_format="n-tuple", batch_size=16)
        self.assertTrue(max(calls) <= 16)
        by_ids = negmine.mine_hard_negatives(
            query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
            server=self.client, num_negatives=k, output_format="n-tuple")
        self.assertEqual(len(rows), len(by_ids))
        for t, r in zip(rows, by_ids):
            self.assertEqual(t["anchor"], f"question {r['anchor']}")
            self.assertEqual(t["positive"], f"doc {r['positive']}")
            for j in range(1, k + 1):
                self.assertEqual(t[f"negative_{j}"], f"doc {r[f'negative_{j}']}")

    def test_client_mine_reports_positive_scores_and_counts(self) -> None:
        queries, corpus, pos = make_data(seed=17)
        m, k = 0.1, 5
        positives = [[int(p)] for p in pos]
        oracle = oracle_eligible(queries, corpus, positives, relative_margin=m)
        self.assert_gaps(oracle, k)
        self.client.create_collection("counts", dim=corpus.shape[1], metric="cosine")
        self.client.upsert("counts", ids=np.arange(len(corpus)), vectors=corpus)
        r = self.client.mine(queries, k, collection="counts", positives=positives,
                             relative_margin=m)
        for i, (order, s, s_pos, threshold, _) in enumerate(oracle):
            self.assertAlmostEqual(float(r.positive_scores[i, 0]), s_pos, delta=SCORE_TOL)
            self.assertEqual(r.ids[i].tolist(), order[:k])
            self.assertEqual(r.removed.positives[i], 1)
            above = int(np.sum(s > threshold)) - int(s[positives[i][0]] > threshold)
            self.assertEqual(r.removed.relative_margin[i], above)
            self.assertEqual(r.num_eligible[i], len(order))
            total = sum(r.removed.row(i)[n] for n in ("excluded", "positives", "max_score",
                                                       "min_score", "absolute_margin",
                                                       "relative_margin"))
            self.assertEqual(total + r.num_eligible[i], len(corpus))
            self.assertEqual(r.shortfall[i], "")
        # Fewer eligible targets than k: a shortfall, and its reason.
        short = self.client.mine(queries[:2], 5, collection="counts", positives=positives[:2],
                                 max_score=-0.9)
        for i in range(2):
            n = int(np.sum(oracle[i][1] <= -0.9))
            self.assertEqual(short.counts[i], n)
            self.assertLess(n, 5, "seed: not short")
            self.assertNotEqual(short.shortfall[i], "")
        with self.assertRaises(negmine.NotFound):
            self.client.mine(queries[:1], 3, collection="counts",
                             positives=[[len(corpus) + 5]])

    def test_local_server(self) -> None:
        queries, corpus, pos = make_data(seed=18, n=50, q=4)
        rows = negmine.mine_hard_negatives(
            query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
            server_bin=ARGS.server_bin, num_negatives=2)
        self.assertEqual(len(rows), 8)

    def test_bad_arguments(self) -> None:
        queries, corpus, pos = make_data(seed=19, n=50, q=4)
        common = dict(query_embeddings=queries, corpus_embeddings=corpus, positive_ids=pos,
                      server=self.client)
        with self.assertRaisesRegex(ValueError, "temperature"):
            negmine.mine_hard_negatives(sampling_strategy="softmax", **common)
        with self.assertRaisesRegex(ValueError, "range_max"):
            negmine.mine_hard_negatives(sampling_strategy="softmax", temperature=0.1,
                                        range_max=10, **common)
        with self.assertRaisesRegex(ValueError, "cannot mine 5"):
            negmine.mine_hard_negatives(num_negatives=5, range_min=8, range_max=10, **common)
        with self.assertRaisesRegex(ValueError, "output_format"):
            negmine.mine_hard_negatives(output_format="quadruplet", **common)


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-bin", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
