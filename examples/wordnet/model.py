"""A dual encoder small enough for two CPU cores.

One hashed n-gram table (``nn.EmbeddingBag``, mean pooling, sparse gradients)
is shared by two towers; each tower has its own linear projection to ``dim``
and L2-normalizes (cosine). A tower's input is a LongTensor of row numbers
into its corpus: the tower holds that corpus's features (CSR), so a batch is
a plain tensor that GradCache can cut into chunks.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Tower(nn.Module):
    """Encodes rows of one corpus: features -> shared bag -> projection -> unit norm."""

    def __init__(self, bag: nn.EmbeddingBag, proj: nn.Linear,
                 csr: Tuple[np.ndarray, np.ndarray]) -> None:
        super().__init__()
        self.bag = bag
        self.proj = proj
        indptr, indices = csr
        self.register_buffer("indptr", torch.as_tensor(indptr, dtype=torch.int64), persistent=False)
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.int64), persistent=False)

    @property
    def num_rows(self) -> int:
        """Rows in the corpus."""
        return int(self.indptr.numel() - 1)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings [len(rows), dim] of the given corpus rows."""
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        n = rows.numel()
        if n > 0 and int(rows[-1] - rows[0]) == n - 1 and bool((rows[1:] > rows[:-1]).all()):
            # A contiguous range (encoding the corpus): slice the CSR directly.
            a, b = int(self.indptr[rows[0]]), int(self.indptr[rows[-1] + 1])
            flat = self.indices[a:b]
            offsets = self.indptr[rows] - a
        else:
            starts = self.indptr[rows]
            lens = self.indptr[rows + 1] - starts
            offsets = torch.cumsum(lens, 0) - lens
            total = int(lens.sum())
            pos = (torch.arange(total) - torch.repeat_interleave(offsets, lens)
                   + torch.repeat_interleave(starts, lens))
            flat = self.indices[pos]
        if torch.is_grad_enabled() and self.bag.weight.requires_grad:
            # Gather each distinct feature row once (a sparse gradient with
            # one row per distinct feature), then pool from that sub-table.
            uniq, inverse = torch.unique(flat, return_inverse=True)
            sub = F.embedding(uniq, self.bag.weight, sparse=True)
            h = F.embedding_bag(inverse, sub, offsets, mode="mean")
        else:
            h = self.bag(flat, offsets)
        return F.normalize(self.proj(h), dim=-1)

    @torch.no_grad()
    def encode_all(self, rows: torch.Tensor | None = None, chunk: int = 16384) -> torch.Tensor:
        """Embeddings of ``rows`` (default: every row) without a graph."""
        if rows is None:
            rows = torch.arange(self.num_rows)
        rows = torch.as_tensor(rows, dtype=torch.int64)
        out = [self(rows[i:i + chunk]) for i in range(0, rows.numel(), chunk)]
        return torch.cat(out) if out else torch.zeros(0, self.proj.out_features)


class DualEncoder(nn.Module):
    """The query tower and the target tower, sharing one hashed n-gram table.

    Both projections start from the same random matrix, so the untrained model
    scores by (hashed) n-gram overlap; training makes the towers asymmetric.
    """

    def __init__(self, target_csr: Tuple[np.ndarray, np.ndarray],
                 query_csr: Tuple[np.ndarray, np.ndarray], buckets: int,
                 hidden: int = 128, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.bag = nn.EmbeddingBag(buckets, hidden, mode="mean", sparse=True)
        with torch.no_grad():
            self.bag.weight.copy_(torch.randn(buckets, hidden, generator=g))
        w = torch.randn(dim, hidden, generator=g) / hidden ** 0.5
        self.qproj = nn.Linear(hidden, dim, bias=False)
        self.tproj = nn.Linear(hidden, dim, bias=False)
        with torch.no_grad():
            self.qproj.weight.copy_(w)
            self.tproj.weight.copy_(w)
        self.query = Tower(self.bag, self.qproj, query_csr)
        self.target = Tower(self.bag, self.tproj, target_csr)

    def optimizers(self, lr: float) -> list:
        """Row-wise lazy Adam for the table (sparse gradients), Adam for the projections."""
        return [RowAdam(self.bag.weight, lr=lr),
                torch.optim.Adam([self.qproj.weight, self.tproj.weight], lr=lr)]


class RowAdam:
    """Adam on the rows of a table that received a sparse gradient ("lazy"
    Adam, as torch's SparseAdam, with less bookkeeping): rows without a
    gradient keep their moments; bias correction uses the global step."""

    def __init__(self, weight: nn.Parameter, lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.weight, self.lr, self.betas, self.eps = weight, lr, betas, eps
        self.m = torch.zeros_like(weight, requires_grad=False)
        self.v = torch.zeros_like(weight, requires_grad=False)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        """Applies the accumulated sparse gradient, if any."""
        g = self.weight.grad
        if g is None:
            return
        if not g.is_sparse:
            raise TypeError("RowAdam needs a sparse gradient")
        g = g.coalesce()
        idx, val = g.indices()[0], g.values()
        if idx.numel() == 0:
            return
        self.t += 1
        b1, b2 = self.betas
        m = self.m.index_select(0, idx).mul_(b1).add_(val, alpha=1 - b1)
        v = self.v.index_select(0, idx).mul_(b2).addcmul_(val, val, value=1 - b2)
        self.m.index_copy_(0, idx, m)
        self.v.index_copy_(0, idx, v)
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        upd = m.div_(bc1).div_(v.div_(bc2).sqrt_().add_(self.eps)).mul_(-self.lr)
        self.weight.index_add_(0, idx, upd)

    def zero_grad(self) -> None:
        """Drops the gradient."""
        self.weight.grad = None
