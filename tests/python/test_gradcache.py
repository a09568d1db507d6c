"""Tests of negmine.gradcache: exactness against full-batch oracles.

Run: PYTHONPATH=client/python /usr/bin/python3 tests/python/test_gradcache.py
(the file also finds client/python relative to itself).

Oracles. The loss is checked against a direct loop over the logits in plain
Python floats. GradCache's gradient is checked against one forward of the whole
batch with a graph and one backward (float64, tolerance 1e-5 absolute). With
dropout on, the oracle encodes the same chunks in the same order from the same
seed, so that it draws the same dropout masks as an ordinary chunked forward,
keeps the whole graph and backpropagates the loss once; without dropout, it is a
single forward per input group.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import unittest
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

_PKG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "client", "python")
try:
    import negmine.gradcache as gcmod
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, _PKG)
    try:
        import negmine.gradcache as gcmod
    except Exception:  # the rest of the package does not import here: load the module alone
        import importlib.util

        for _name in [m for m in sys.modules if m == "negmine" or m.startswith("negmine.")]:
            del sys.modules[_name]
        _spec = importlib.util.spec_from_file_location("negmine_gradcache", os.path.join(_PKG, "negmine", "gradcache.py"))
        gcmod = importlib.util.module_from_spec(_spec)
        sys.modules["negmine_gradcache"] = gcmod
        _spec.loader.exec_module(gcmod)

GradCache = gcmod.GradCache
sampled_softmax_loss = gcmod.sampled_softmax_loss

torch.set_num_threads(1)
ATOL = 1e-5


class MLP(nn.Module):
    """A small encoder with dropout: [n, din] -> [n, d]."""

    def __init__(self, din: int = 6, h: int = 16, d: int = 5, p: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(din, h), nn.Tanh(), nn.Dropout(p), nn.Linear(h, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DictMLP(nn.Module):
    """An encoder of dict inputs {"x": [n, din], "w": [n, 1]}."""

    def __init__(self, din: int = 6, d: int = 5) -> None:
        super().__init__()
        self.inner = MLP(din, 12, d, 0.2)

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner(batch["x"]) * batch["w"]


class BagEncoder(nn.Module):
    """Sparse-gradient encoder of token-id lists, collated inside forward."""

    def __init__(self, vocab: int = 30, h: int = 8, d: int = 5) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, h, mode="mean", sparse=True)
        self.drop = nn.Dropout(0.25)
        self.out = nn.Linear(h, d)

    def forward(self, docs: Sequence[List[int]]) -> torch.Tensor:
        flat = torch.tensor([t for doc in docs for t in doc], dtype=torch.long)
        offsets = torch.tensor([0] + [len(doc) for doc in docs[:-1]], dtype=torch.long).cumsum(0)
        return self.out(self.drop(self.bag(flat, offsets)))


def _rows(x: Any) -> int:
    return len(x) if not isinstance(x, dict) else next(iter(x.values())).shape[0]


def _slice(x: Any, a: int, b: int) -> Any:
    return {k: v[a:b] for k, v in x.items()} if isinstance(x, dict) else x[a:b]


def oracle(
    qenc: nn.Module,
    tenc: nn.Module,
    queries: Any,
    targets: Any,
    negatives: Any = None,
    log_q: Any = None,
    mask: Any = None,
    chunk: Optional[int] = None,
    weight: float = 1.0,
    **kw: Any,
) -> float:
    """One forward with a graph over the whole batch and one backward.

    chunk=None encodes each input group in one call; an int encodes it in chunks
    of that size, in GradCache's order (queries, targets, negatives), with the
    graph kept, so that the dropout masks are those of the chunked forward.
    """

    def enc(m: nn.Module, x: Any) -> torch.Tensor:
        n = _rows(x)
        step = chunk or n
        return torch.cat([m(_slice(x, a, min(a + step, n))) for a in range(0, n, step)])

    q = enc(qenc, queries)
    t = enc(tenc, targets)
    if negatives is not None:
        b = q.shape[0]
        neg = enc(tenc, negatives).reshape(b, _rows(negatives) // b, -1)
        loss = sampled_softmax_loss(q, t, neg=neg, neg_log_q=log_q, neg_mask=mask, **kw)
    else:
        loss = sampled_softmax_loss(q, t, **kw)
    (loss * weight).backward()
    return float(loss)


def grads(*mods: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameter gradients (dense copies), keyed by module index and name."""
    out = {}
    for i, m in enumerate(mods):
        for name, p in m.named_parameters():
            if p.grad is not None:
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                out[f"{i}.{name}"] = g.detach().clone()
    return out


def zero(*mods: nn.Module) -> None:
    for m in mods:
        for p in m.parameters():
            p.grad = None


def batch(b: int, k: int, din: int = 6, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Random queries, targets, B*k negatives, log q (some NaN = top-k) and a mask."""
    g = torch.Generator().manual_seed(seed)
    qx = torch.randn(b, din, generator=g, dtype=dtype)
    tx = qx + 0.5 * torch.randn(b, din, generator=g, dtype=dtype)
    nx = torch.randn(b * k, din, generator=g, dtype=dtype)
    log_q = torch.log(torch.rand(b, k, generator=g, dtype=dtype) * 0.05 + 1e-3)
    log_q[:, 0] = float("nan")  # one top-k entry per query (mode="mixed")
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[1, -2:] = False  # query 1 got fewer results
    return qx, tx, nx, log_q, mask


class Harness:
    """Runs GradCache and the oracle from the same seed and compares them."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.test = test

    def compare(
        self,
        qenc: nn.Module,
        tenc: Optional[nn.Module],
        chunk: int,
        queries: Any,
        targets: Any,
        negatives: Any = None,
        log_q: Any = None,
        mask: Any = None,
        single_forward: bool = False,
        gc_kwargs: Optional[Dict[str, Any]] = None,
        seed: int = 123,
        **kw: Any,
    ) -> Dict[str, Any]:
        t_enc = tenc if tenc is not None else qenc
        mods = (qenc,) if tenc is None else (qenc, tenc)
        zero(*mods)
        torch.manual_seed(seed)
        loss_ref = oracle(qenc, t_enc, queries, targets, negatives, log_q, mask,
                          chunk=None if single_forward else chunk, **kw)
        rng_after_ref = torch.rand(3)
        g_ref = grads(*mods)

        zero(*mods)
        torch.manual_seed(seed)
        gc = GradCache(qenc, tenc, chunk_size=chunk, **(gc_kwargs or {}))
        loss = gc.step(queries, targets, negatives=negatives, negative_log_q=log_q, negative_mask=mask, **kw)
        rng_after = torch.rand(3)
        g = grads(*mods)

        self.test.assertEqual(sorted(g), sorted(g_ref))
        self.test.assertTrue(g_ref, "no gradients at all")
        for name in g_ref:
            diff = (g[name] - g_ref[name]).abs().max().item()
            self.test.assertLess(diff, ATOL, f"{name}: max |grad diff| {diff}")
            self.test.assertGreater(g_ref[name].abs().max().item(), 0.0, f"{name}: zero gradient")
        self.test.assertAlmostEqual(loss, loss_ref, delta=ATOL)
        # The generators end where one ordinary forward leaves them.
        self.test.assertTrue(torch.equal(rng_after, rng_after_ref))
        return {"gc": gc, "loss": loss, "grads": g, "grads_ref": g_ref}


# ----------------------------------------------------------------------------


def loop_loss(q, t, neg, log_q, mask, tau, correction, in_batch, reduction, shared=False):
    """The sampled softmax with log q, one query and one logit at a time, in Python floats."""
    q, t = q.tolist(), t.tolist()
    b = len(q)
    dot = lambda a, c: sum(x * y for x, y in zip(a, c))
    losses = []
    for i in range(b):
        pos = dot(q[i], t[i]) / tau
        logits = [pos]
        if in_batch:
            logits += [dot(q[i], t[j]) / tau for j in range(b) if j != i]
        if neg is not None:
            k = len(neg[i])
            real = [j for j in range(k) if (mask is None or mask[i][j])
                    and not (log_q is not None and log_q[i][j] == math.inf)]
            sampled = [j for j in real if log_q is not None and math.isfinite(log_q[i][j])]
            for j in real:
                s = dot(q[i], neg[i][j].tolist()) / tau
                if j in sampled:
                    s -= log_q[i][j]
                    if correction == "log_kq":
                        s -= math.log(len(sampled))
                logits.append(s)
            if shared:  # the other queries' real negatives, uncorrected
                for o in range(b):
                    for j in range(k):
                        if o != i and (mask is None or mask[o][j]):
                            logits.append(dot(q[i], neg[o][j].tolist()) / tau)
        z = sum(math.exp(x) for x in logits)
        losses.append(math.log(z) - pos)
    if reduction == "mean":
        return sum(losses) / b
    if reduction == "sum":
        return sum(losses)
    return losses


class LossTest(unittest.TestCase):
    """sampled_softmax_loss against a direct loop."""

    def setUp(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.q = torch.randn(3, 4, generator=g, dtype=torch.float64)
        self.t = torch.randn(3, 4, generator=g, dtype=torch.float64)
        self.neg = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
        lq = np.log(np.random.default_rng(1).uniform(0.01, 0.2, size=(3, 5)))
        lq[:, :2] = np.nan  # two top-k entries
        lq[2, 4] = np.inf  # padding via +inf
        self.log_q = lq
        self.mask = np.ones((3, 5), dtype=bool)
        self.mask[0, 3:] = False  # padding via the mask

    def test_matches_loop(self) -> None:
        for correction in ("log_kq", "log_q"):
            for in_batch in (True, False):
                for reduction in ("mean", "sum", "none"):
                    got = sampled_softmax_loss(self.q, self.t, self.neg, torch.as_tensor(self.log_q), 0.3,
                                               neg_mask=torch.as_tensor(self.mask), reduction=reduction,
                                               correction=correction, in_batch=in_batch)
                    want = loop_loss(self.q, self.t, self.neg, self.log_q.tolist(), self.mask.tolist(), 0.3,
                                     correction, in_batch, reduction)
                    np.testing.assert_allclose(got.detach().numpy(), np.asarray(want), rtol=1e-12, atol=1e-12,
                                               err_msg=f"{correction} in_batch={in_batch} {reduction}")

    def test_numpy_inputs_and_no_correction(self) -> None:
        # neg_log_q=None: top-k negatives, no correction; numpy log q / mask accepted.
        got = sampled_softmax_loss(self.q, self.t, self.neg, None, 0.3, reduction="none")
        want = loop_loss(self.q, self.t, self.neg, None, None, 0.3, "log_kq", True, "none")
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
        got = sampled_softmax_loss(self.q, self.t, self.neg, self.log_q, 0.3, neg_mask=self.mask)
        want = loop_loss(self.q, self.t, self.neg, self.log_q.tolist(), self.mask.tolist(), 0.3, "log_kq", True,
                         "mean")
        self.assertAlmostEqual(float(got), want, places=12)
        # In-batch only.
        got = sampled_softmax_loss(self.q, self.t, temperature=0.3, reduction="sum")
        want = loop_loss(self.q, self.t, None, None, None, 0.3, "log_kq", True, "sum")
        self.assertAlmostEqual(float(got), want, places=12)

    def test_shared_negatives(self) -> None:
        got = sampled_softmax_loss(self.q, self.t, self.neg, None, 0.3, neg_mask=self.mask, reduction="none",
                                   shared_negatives=True)
        want = loop_loss(self.q, self.t, self.neg, None, self.mask.tolist(), 0.3, "log_kq", True, "none",
                         shared=True)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
        with self.assertRaises(ValueError):
            sampled_softmax_loss(self.q, self.t, self.neg, self.log_q, shared_negatives=True)

    def test_gradient_finite_with_padding(self) -> None:
        q = self.q.clone().requires_grad_()
        neg = self.neg.clone().requires_grad_()
        sampled_softmax_loss(q, self.t, neg, self.log_q, 0.3, neg_mask=self.mask).backward()
        self.assertTrue(torch.isfinite(q.grad).all())
        self.assertTrue(torch.isfinite(neg.grad).all())
        self.assertEqual(neg.grad[0, 3:].abs().max().item(), 0.0)  # padding gets no gradient
        self.assertEqual(neg.grad[2, 4].abs().max().item(), 0.0)

    def test_log_kq_is_unbiased_for_the_partition_function(self) -> None:
        # exp(loss_i + pos_i) = exp(pos_i) + sum_j exp(s_j - c_j) with in_batch=False,
        # so its mean over independent draws estimates exp(pos) + Z of the collection.
        rng = np.random.default_rng(3)
        n, d, k, trials, tau = 40, 4, 8, 4000, 0.5
        coll = rng.normal(size=(n, d))
        query = rng.normal(size=d)
        s = coll @ query / tau
        z = np.exp(s).sum()
        proposal = np.exp(0.7 * s + rng.normal(scale=0.3, size=n))
        proposal /= proposal.sum()
        draws = rng.choice(n, size=(trials, k), p=proposal)  # with replacement
        qb = torch.as_tensor(np.tile(query, (trials, 1)))
        pos = torch.zeros(trials, d, dtype=torch.float64)  # positive logit 0
        neg = torch.as_tensor(coll[draws])
        lq = torch.as_tensor(np.log(proposal[draws]))
        for correction, scale in (("log_kq", 1.0), ("log_q", float(k))):
            loss = sampled_softmax_loss(qb, pos, neg, lq, tau, reduction="none", correction=correction,
                                        in_batch=False)
            zhat = torch.exp(loss).numpy() - 1.0
            se = zhat.std() / math.sqrt(trials)
            self.assertLess(abs(zhat.mean() - scale * z), 4 * se * scale + 1e-12,
                            f"{correction}: mean {zhat.mean()} vs {scale} * Z = {scale * z} (se {se})")

    def test_errors(self) -> None:
        with self.assertRaises(ValueError):
            sampled_softmax_loss(self.q, self.t[:2])
        with self.assertRaises(ValueError):
            sampled_softmax_loss(self.q, self.t, self.neg, self.log_q[:, :3])
        with self.assertRaises(ValueError):
            sampled_softmax_loss(self.q, self.t, correction="log_z")
        with self.assertRaises(ValueError):
            sampled_softmax_loss(self.q, self.t, temperature=0.0)


class GradCacheExactnessTest(unittest.TestCase):
    """GradCache's gradient equals the full-batch gradient."""

    def setUp(self) -> None:
        torch.manual_seed(0)
        self.h = Harness(self)

    def test_shared_encoder_dropout(self) -> None:
        enc = MLP().double().train()
        qx, tx, nx, lq, mask = batch(10, 3)
        for chunk in (5, 4, 3, 1, 64):  # divides 10 / does not / one chunk
            with self.subTest(chunk=chunk):
                self.h.compare(enc, None, chunk, qx, tx, temperature=0.1)
                self.h.compare(enc, None, chunk, qx, tx, nx, lq, mask, temperature=0.1)

    def test_separate_encoders_dropout(self) -> None:
        qenc, tenc = MLP().double().train(), MLP().double().train()
        qx, tx, nx, lq, mask = batch(9, 4, seed=1)
        for chunk in (3, 4):
            with self.subTest(chunk=chunk):
                self.h.compare(qenc, tenc, chunk, qx, tx, temperature=0.05)
                self.h.compare(qenc, tenc, chunk, qx, tx, nx, lq, mask, temperature=0.05)
                # Top-k negatives only, no correction.
                self.h.compare(qenc, tenc, chunk, qx, tx, nx, None, None, temperature=0.05)

    def test_dict_inputs_separate_encoder(self) -> None:
        qenc, tenc = MLP().double().train(), DictMLP().double().train()
        qx, tx, nx, lq, mask = batch(7, 2, seed=2)
        g = torch.Generator().manual_seed(5)
        tdict = {"x": tx, "w": torch.rand(7, 1, generator=g, dtype=torch.float64) + 0.5}
        ndict = {"x": nx, "w": torch.rand(14, 1, generator=g, dtype=torch.float64) + 0.5}
        self.h.compare(qenc, tenc, 3, qx, tdict, ndict, lq, mask, temperature=0.1)

    def test_shared_negatives_and_frozen_target_encoder(self) -> None:
        qenc, tenc = MLP().double().train(), MLP().double().train()
        qx, tx, nx, _, mask = batch(8, 2, seed=13)
        self.h.compare(qenc, tenc, 3, qx, tx, nx, None, mask, temperature=0.1, shared_negatives=True)
        tenc.requires_grad_(False)
        out = self.h.compare(qenc, tenc, 3, qx, tx, nx, None, mask, temperature=0.1)
        self.assertTrue(all(name.startswith("0.") for name in out["grads"]))

    def test_single_forward_oracle_without_dropout(self) -> None:
        enc = MLP().double().eval()
        qx, tx, nx, lq, mask = batch(10, 3, seed=4)
        for chunk in (4, 10):
            self.h.compare(enc, None, chunk, qx, tx, nx, lq, mask, single_forward=True, temperature=0.1)

    def test_dropout_is_replayed(self) -> None:
        # The dropout test is not vacuous: dropout changes the output, and a
        # GradCache that does not replay the random state misses the gradient.
        enc = MLP(p=0.5).double().train()
        qx, tx, nx, lq, mask = batch(8, 2, seed=6)
        self.assertFalse(torch.allclose(enc(qx), enc(qx)))
        orig = gcmod._RandomState.replay
        gcmod._RandomState.replay = lambda self: contextlib.nullcontext()
        try:
            with self.assertRaises(AssertionError):
                self.h.compare(enc, None, 3, qx, tx, nx, lq, mask, temperature=0.1)
        finally:
            gcmod._RandomState.replay = orig
        self.h.compare(enc, None, 3, qx, tx, nx, lq, mask, temperature=0.1)

    def test_sparse_embedding_bag(self) -> None:
        torch.manual_seed(1)
        rng = np.random.default_rng(2)
        doc = lambda: rng.integers(0, 30, size=rng.integers(1, 6)).tolist()
        for shared in (True, False):
            with self.subTest(shared=shared):
                qenc = BagEncoder().double().train()
                tenc = None if shared else BagEncoder().double().train()
                queries = [doc() for _ in range(9)]
                targets = [doc() for _ in range(9)]
                negatives = [doc() for _ in range(18)]
                lq = np.log(rng.uniform(0.01, 0.1, size=(9, 2)))
                out = self.h.compare(qenc, tenc, 4, queries, targets, negatives, lq, None, temperature=0.1)
                self.assertTrue(qenc.bag.weight.grad.is_sparse)
                self.assertIn("0.bag.weight", out["grads"])

    def test_accumulates_into_existing_grad(self) -> None:
        enc = MLP().double().train()
        qx, tx, nx, lq, mask = batch(6, 2, seed=8)
        zero(enc)
        torch.manual_seed(9)
        oracle(enc, enc, qx, tx, nx, lq, mask, chunk=4)
        once = grads(enc)
        zero(enc)
        gc = GradCache(enc, chunk_size=4)
        for _ in range(2):
            torch.manual_seed(9)
            gc.step(qx, tx, nx, lq, mask)
        for name, g in grads(enc).items():
            self.assertLess((g - 2 * once[name]).abs().max().item(), ATOL)

    def test_loss_kwargs_and_custom_loss(self) -> None:
        enc = MLP().double().train()
        qx, tx, _, _, _ = batch(6, 1, seed=10)

        def loss_fn(q: torch.Tensor, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return scale * ((q - t) ** 2).sum()

        zero(enc)
        torch.manual_seed(1)
        q = torch.cat([enc(qx[:4]), enc(qx[4:])])
        t = torch.cat([enc(tx[:4]), enc(tx[4:])])
        ref = loss_fn(q, t, scale=3.0)
        ref.backward()
        g_ref = grads(enc)
        zero(enc)
        torch.manual_seed(1)
        val = GradCache(enc, chunk_size=4, loss_fn=loss_fn).step(qx, tx, scale=3.0)
        self.assertAlmostEqual(val, float(ref), delta=ATOL)
        for name, g in grads(enc).items():
            self.assertLess((g - g_ref[name]).abs().max().item(), ATOL)

    def test_encode(self) -> None:
        enc = MLP().double().eval()
        qx, tx, _, _, _ = batch(7, 1, seed=14)
        class FromNumpy(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = MLP().double().eval()

            def forward(self, x: np.ndarray) -> torch.Tensor:
                assert isinstance(x, np.ndarray) and len(x) <= 3
                return self.inner(torch.as_tensor(x))

        gc = GradCache(enc, FromNumpy(), chunk_size=3)
        np.testing.assert_allclose(gc.encode(qx).numpy(), enc(qx).detach().numpy(), rtol=1e-12, atol=1e-12)
        got = gc.encode(tx.numpy(), which="target")  # a numpy batch is sliced like a sequence
        self.assertEqual(tuple(got.shape), (7, 5))
        self.assertFalse(got.requires_grad)
        with self.assertRaises(ValueError):
            gc.encode(qx, which="passage")

    def test_input_errors(self) -> None:
        enc = MLP().double()
        gc = GradCache(enc, chunk_size=4)
        qx, tx, nx, lq, mask = batch(6, 2)
        with self.assertRaises(ValueError):
            gc.step(qx, tx[:5])
        with self.assertRaises(ValueError):
            gc.step(qx, tx, nx[:11])
        with self.assertRaises(ValueError):
            gc.step(qx, tx, None, lq)
        with self.assertRaises(TypeError):
            gc.step("abc", "def")
        with self.assertRaises(ValueError):
            GradCache(enc, chunk_size=0)
        with self.assertRaises(ValueError):
            GradCache(enc, partial="pad")


class PrecisionTest(unittest.TestCase):
    """GradCache's own autocast and scaler, and an outer autocast."""

    def test_outer_autocast(self) -> None:
        torch.manual_seed(0)
        enc = MLP().float().train()
        qx, tx, nx, lq, mask = batch(8, 2, dtype=torch.float32)
        zero(enc)
        torch.manual_seed(5)
        oracle(enc, enc, qx, tx, nx, lq, mask, chunk=3, temperature=0.1)
        g_ref = grads(enc)
        # Under an outer bf16 autocast the oracle itself is visibly different,
        # so matching g_ref below shows the outer autocast was really off.
        zero(enc)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            oracle(enc, enc, qx, tx, nx, lq, mask, chunk=3, temperature=0.1)
        g_bf16 = grads(enc)
        self.assertGreater(max((g_bf16[n] - g_ref[n]).abs().max().item() for n in g_ref), 1e-3)

        zero(enc)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with self.assertRaisesRegex(RuntimeError, "autocast"):
                GradCache(enc, chunk_size=3).step(qx, tx, nx, lq, mask, temperature=0.1)
        self.assertEqual(grads(enc), {})  # nothing ran

        zero(enc)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            GradCache(enc, chunk_size=3, outer_autocast="disable").step(qx, tx, nx, lq, mask, temperature=0.1)
            self.assertTrue(torch.is_autocast_cpu_enabled())  # restored after the step
        g = grads(enc)
        for n in g_ref:
            scale = max(1.0, g_ref[n].abs().max().item())
            self.assertLess((g[n] - g_ref[n]).abs().max().item(), 1e-5 * scale, n)

    def test_own_autocast_and_scaler(self) -> None:
        torch.manual_seed(0)
        enc = MLP().float().train()
        qx, tx, nx, lq, mask = batch(8, 2, dtype=torch.float32)
        zero(enc)
        torch.manual_seed(5)
        q, t, neg = [], [], []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for a in range(0, 8, 3):
                q.append(enc(qx[a:a + 3]))
            for a in range(0, 8, 3):
                t.append(enc(tx[a:a + 3]))
            for a in range(0, 16, 3):
                neg.append(enc(nx[a:a + 3]))
        self.assertEqual(q[0].dtype, torch.bfloat16)
        loss_ref = sampled_softmax_loss(torch.cat(q), torch.cat(t), torch.cat(neg).reshape(8, 2, -1), lq,
                                        temperature=0.1, neg_mask=mask)
        loss_ref.backward()
        g_ref = grads(enc)

        class Scaler:
            """A GradScaler stand-in with a fixed scale (CPU has no GradScaler)."""

            def scale(self, x: torch.Tensor) -> torch.Tensor:
                return x * 256.0

        zero(enc)
        torch.manual_seed(5)
        gc = GradCache(enc, chunk_size=3, autocast_dtype=torch.bfloat16, scaler=Scaler())
        loss = gc.step(qx, tx, nx, lq, mask, temperature=0.1)
        self.assertAlmostEqual(loss, float(loss_ref), delta=1e-5)
        g = grads(enc)
        for n in g_ref:
            scale = max(1.0, g_ref[n].abs().max().item())
            self.assertLess((g[n] / 256.0 - g_ref[n]).abs().max().item(), 1e-2 * scale, n)


class PartialBatchTest(unittest.TestCase):
    """The partial-batch policies."""

    def setUp(self) -> None:
        torch.manual_seed(0)
        self.enc = MLP().double().train()
        self.qx, self.tx, self.nx, self.lq, self.mask = batch(5, 2, seed=3)

    def run_policy(self, policy: str, batch_size: Optional[int] = 8):
        zero(self.enc)
        torch.manual_seed(2)
        gc = GradCache(self.enc, chunk_size=2, partial=policy, batch_size=batch_size)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            loss = gc.step(self.qx, self.tx, self.nx, self.lq, self.mask)
            torch.manual_seed(2)
            gc.step(self.qx, self.tx, self.nx, self.lq, self.mask)  # a second partial batch: no warning
        return gc, loss, grads(self.enc), [str(x.message) for x in w]

    def reference(self, weight: float) -> Dict[str, torch.Tensor]:
        zero(self.enc)
        for _ in range(2):
            torch.manual_seed(2)
            oracle(self.enc, self.enc, self.qx, self.tx, self.nx, self.lq, self.mask, chunk=2, weight=weight)
        return grads(self.enc)

    def assert_grads(self, g: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> None:
        self.assertEqual(sorted(g), sorted(ref))
        for n in ref:
            self.assertLess((g[n] - ref[n]).abs().max().item(), ATOL, n)

    def test_keep(self) -> None:
        gc, loss, g, msgs = self.run_policy("keep")
        self.assertEqual(gc.last_step.partial, "kept")
        self.assertEqual(gc.last_step.weight, 1.0)
        self.assertEqual(len(msgs), 1)
        self.assertIn("kept", msgs[0])
        self.assert_grads(g, self.reference(1.0))

    def test_reweight(self) -> None:
        gc, loss, g, msgs = self.run_policy("reweight")
        self.assertEqual(gc.last_step.partial, "reweighted")
        self.assertAlmostEqual(gc.last_step.weight, 5 / 8)
        self.assertEqual(len(msgs), 1)
        self.assertIn("reweighted", msgs[0])
        self.assert_grads(g, self.reference(5 / 8))
        # The returned loss is the batch's own (unweighted) loss.
        zero(self.enc)
        torch.manual_seed(2)
        self.assertAlmostEqual(loss, oracle(self.enc, self.enc, self.qx, self.tx, self.nx, self.lq, self.mask,
                                            chunk=2), delta=ATOL)

    def test_drop(self) -> None:
        torch.manual_seed(2)
        before = torch.rand(2)
        gc, loss, g, msgs = self.run_policy("drop")
        after = torch.rand(2)
        self.assertTrue(math.isnan(loss))
        self.assertEqual(gc.last_step.partial, "dropped")
        self.assertEqual(gc.last_step.num_chunks, 0)
        self.assertEqual(g, {})
        self.assertTrue(torch.equal(before, after))  # nothing was encoded
        self.assertEqual(len(msgs), 1)
        self.assertIn("dropped", msgs[0])

    def test_inferred_nominal_size(self) -> None:
        qx, tx, _, _, _ = batch(8, 1, seed=4)
        gc = GradCache(self.enc, chunk_size=3, partial="reweight")
        gc.step(qx, tx)
        self.assertIsNone(gc.last_step.partial)
        self.assertEqual(gc.last_step.nominal_batch_size, 8)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            gc.step(qx[:5], tx[:5])
        self.assertEqual(gc.last_step.partial, "reweighted")
        self.assertAlmostEqual(gc.last_step.weight, 5 / 8)
        with self.assertRaises(ValueError):
            GradCache(self.enc, chunk_size=3, batch_size=4).step(qx, tx)


class CountingDDP(nn.parallel.DistributedDataParallel):
    """DDP that records, per forward with grad, whether it will all-reduce."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sync_flags: List[bool] = []
        self.no_sync_entered = 0
        self.reduce_at: List[int] = []  # forwards seen when each bucket was all-reduced

        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(state, bucket):  # unannotated: DDP checks the annotations' types
            self.reduce_at.append(len(self.sync_flags))
            return default_hooks.allreduce_hook(state, bucket)

        self.register_comm_hook(None, hook)  # state None: the default process group

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            self.sync_flags.append(bool(self.require_backward_grad_sync))
        return super().forward(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):  # type: ignore[override]
        self.no_sync_entered += 1
        with super().no_sync():
            yield


class DDPTest(unittest.TestCase):
    """no_sync under a one-process gloo DistributedDataParallel."""

    @classmethod
    def setUpClass(cls) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_gloo_available():
            raise unittest.SkipTest("torch.distributed with gloo is not available")
        cls.tmp = tempfile.NamedTemporaryFile(delete=False)
        cls.tmp.close()
        os.unlink(cls.tmp.name)
        dist.init_process_group("gloo", init_method="file://" + cls.tmp.name, rank=0, world_size=1)

    @classmethod
    def tearDownClass(cls) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()
        if os.path.exists(cls.tmp.name):
            os.unlink(cls.tmp.name)

    def check(self, ddp: CountingDDP, forwards: int) -> None:
        self.assertEqual(ddp.sync_flags, [False] * (forwards - 1) + [True])
        self.assertEqual(ddp.no_sync_entered, forwards - 1)
        self.assertTrue(ddp.reduce_at)
        self.assertEqual(set(ddp.reduce_at), {forwards})  # all-reduced in the last backward only

    def test_shared_encoder(self) -> None:
        torch.manual_seed(0)
        inner = MLP().double().train()
        qx, tx, nx, lq, mask = batch(10, 2, seed=11)
        zero(inner)
        torch.manual_seed(4)
        oracle(inner, inner, qx, tx, nx, lq, mask, chunk=4)
        g_ref = grads(inner)
        ddp = CountingDDP(inner)
        zero(inner)
        torch.manual_seed(4)
        GradCache(ddp, chunk_size=4).step(qx, tx, nx, lq, mask)
        self.check(ddp, 3 + 3 + 5)
        g = grads(inner)
        for n in g_ref:
            self.assertLess((g[n] - g_ref[n]).abs().max().item(), ATOL, n)

    def test_separate_encoders(self) -> None:
        torch.manual_seed(1)
        qin, tin = MLP().double().train(), MLP().double().train()
        qx, tx, nx, lq, mask = batch(10, 2, seed=12)
        zero(qin, tin)
        torch.manual_seed(4)
        oracle(qin, tin, qx, tx, nx, lq, mask, chunk=4)
        g_ref = grads(qin, tin)
        qd, td = CountingDDP(qin), CountingDDP(tin)
        zero(qin, tin)
        torch.manual_seed(4)
        GradCache(qd, td, chunk_size=4).step(qx, tx, nx, lq, mask)
        self.check(qd, 3)
        self.check(td, 3 + 5)
        g = grads(qin, tin)
        for n in g_ref:
            self.assertLess((g[n] - g_ref[n]).abs().max().item(), ATOL, n)


if __name__ == "__main__":
    unittest.main()
