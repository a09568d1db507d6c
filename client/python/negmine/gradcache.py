"""Gradient caching (GradCache) and a sampled-softmax loss for negmine's negatives.

GradCache (Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup") computes the exact gradient of a batch-wise
contrastive loss at a memory cost that does not grow with the batch:

1. encode the batch in chunks without a graph (``torch.no_grad``), saving each
   chunk's random state (CPU and CUDA);
2. compute the loss on the cached representations and its gradient with respect
   to them (the representations are small: ``[B, d]``);
3. re-encode each chunk with a graph, replaying its saved random state so that
   dropout draws the same masks, and backpropagate the cached gradient through it.

The parameter gradients are those of one full-batch forward and backward, up to
floating-point summation order. The encoders must not mix examples (no
BatchNorm in training mode, no cross-example attention): the chunked forward must
equal the full one.

The file holds the loss and the GradCache step that backpropagates it, and
depends only on torch, so that it can be used (and tested) without the rest of
the package; that is why it stays one module.

Usage with negmine's mined negatives (``MineResult``: ``ids`` -> the negatives'
target inputs, ``log_q`` -> ``negative_log_q``, padding ``-1`` -> ``negative_mask``)::

    import negmine, torch
    from negmine.gradcache import GradCache

    client = negmine.Client("localhost:50051")
    gc = GradCache(query_encoder, passage_encoder, chunk_size=64, partial="reweight")
    opt = torch.optim.AdamW([*query_encoder.parameters(), *passage_encoder.parameters()])
    for queries, positives, positive_ids in loader:      # B queries, their positives
        q_emb = gc.encode(queries, which="query")         # no graph, chunked
        r = client.mine(q_emb, k=16, mode="sample", temperature=0.05,
                        exclude=[[int(i)] for i in positive_ids])
        ids = r.ids.clamp(min=0).reshape(-1)              # padding -1: any id, masked
        negatives = [corpus[int(i)] for i in ids]         # B*k target-encoder inputs
        opt.zero_grad(set_to_none=True)
        loss = gc.step(queries, positives, negatives=negatives,
                       negative_log_q=r.log_q, negative_mask=r.ids >= 0)
        if gc.last_step.partial != "dropped":
            opt.step()

``r.log_q`` is NaN for top-k entries (``mode="mixed"``): those negatives get no
correction. The module depends only on torch.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "sampled_softmax_loss",
    "GradCache",
    "StepInfo",
    "Inputs",
]

#: What an encoder takes: a Tensor or a dict of Tensors (split along dim 0), or a
#: Python sequence (sliced, e.g. lists of token-id lists the encoder collates).
Inputs = Union[Tensor, Dict[str, Tensor], Sequence[Any]]

_CORRECTIONS = ("log_kq", "log_q")
_REDUCTIONS = ("mean", "sum", "none")
_PARTIAL = ("drop", "reweight", "keep")
_OUTER_AUTOCAST = ("error", "disable")


# ----------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------


def _loss_dtype(x: Tensor) -> Tensor:
    """Returns x in at least float32 (half and bfloat16 are upcast)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def sampled_softmax_loss(
    q: Tensor,
    t: Tensor,
    neg: Optional[Tensor] = None,
    neg_log_q: Optional[Union[Tensor, Any]] = None,
    temperature: float = 0.05,
    neg_mask: Optional[Union[Tensor, Any]] = None,
    reduction: str = "mean",
    correction: str = "log_kq",
    in_batch: bool = True,
    shared_negatives: bool = False,
) -> Tensor:
    """Softmax cross-entropy of each query's positive against in-batch and extra negatives.

    Query i's logits are, with s(a, b) = <a, b> / temperature:

    - its positive, s(q_i, t_i), the target of the cross-entropy;
    - the in-batch negatives s(q_i, t_j), j != i (when ``in_batch``);
    - its extra negatives s(q_i, neg_ij) - c_ij, where c_ij is the sampled-softmax
      correction for negatives drawn from a proposal q (negmine's ``mode="sample"``).

    The loss is ``logsumexp(logits_i) - s(q_i, t_i)``.

    The correction. With ``correction="log_kq"`` (the default),
    c_ij = log q_ij + log k_i, where k_i is the number of query i's sampled
    negatives (unmasked, finite log q). Then sum_j exp(s_ij - c_ij) =
    (1/k_i) sum_j exp(s_ij) / q_ij, an unbiased estimate (for draws with
    replacement) of the collection's partition function sum_y exp(s(q_i, y)),
    so the sampled part enters the softmax on the same scale as the exact
    in-batch terms; it is the expected-count correction log(k q) of Bengio and
    Senecal and of TensorFlow's ``sampled_softmax_loss``. With
    ``correction="log_q"``, c_ij = log q_ij: the sampled part then estimates
    k_i times the partition function, which overweights the negatives by k
    against the positive and the in-batch terms; it is offered for
    compatibility with trainers written that way. Draws without replacement make
    either estimate slightly biased.

    Entries of ``neg_log_q``:

    - finite: a sampled negative, corrected as above;
    - NaN: a top-k (hard) negative, no correction (negmine returns NaN log q for
      the top-k entries of ``mode="mixed"``); it does not count in k_i;
    - +inf: padding, excluded (as if masked).

    ``neg_log_q=None`` means all extra negatives are top-k: no correction.

    ``shared_negatives=True`` scores every query against all B*k extra negatives
    (DPR's hard negatives shared across the batch), masked by ``neg_mask``. It
    needs ``neg_log_q=None``: a sampled negative's log q is that of the query it
    was drawn for, so it cannot correct another query's logit.

    The positive should be excluded from the mined negatives (negmine's
    ``exclude``); a positive that is drawn again is treated as a negative.

    Args:
        q: [B, d] query representations.
        t: [B, d] target representations; row i is query i's positive and the
            other rows are its in-batch negatives.
        neg: [B, k, d] per-query extra negatives, or None.
        neg_log_q: [B, k] log-probability of each extra negative under the
            proposal it was drawn from (Tensor or array-like), or None.
        temperature: the softmax temperature tau > 0.
        neg_mask: [B, k] bool, True where the extra negative is real, False where
            it is padding (a query may get fewer than k; negmine pads ids with -1,
            so pass ``ids >= 0``). None: all are real.
        reduction: "mean" | "sum" | "none" over the B queries.
        correction: "log_kq" (default) or "log_q", see above.
        in_batch: use the other rows of ``t`` as negatives (default True).
        shared_negatives: every query also scores the other queries' extra
            negatives (top-k negatives only, see above).

    Returns:
        A scalar (mean, sum) or a [B] tensor (none), in q's dtype upcast to at
        least float32.

    Raises:
        ValueError: on inconsistent shapes or an unknown option.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if correction not in _CORRECTIONS:
        raise ValueError(f"correction must be one of {_CORRECTIONS}, got {correction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.dim() != 2 or t.dim() != 2 or q.shape != t.shape:
        raise ValueError(
            f"q and t must both be [B, d] with the same shape, got {tuple(q.shape)} and {tuple(t.shape)}"
        )
    q = _loss_dtype(q)
    t = _loss_dtype(t).to(q.dtype)
    b = q.shape[0]
    inv_tau = 1.0 / float(temperature)

    pos = (q * t).sum(-1) * inv_tau  # [B]
    if in_batch:
        parts = [q @ t.T * inv_tau]  # [B, B]; the diagonal is the positive
    else:
        parts = [pos.unsqueeze(1)]
    if neg is not None:
        if neg.dim() != 3 or neg.shape[0] != b or neg.shape[2] != q.shape[1]:
            raise ValueError(f"neg must be [B, k, d] = [{b}, k, {q.shape[1]}], got {tuple(neg.shape)}")
        k = neg.shape[1]
        neg = _loss_dtype(neg).to(q.dtype)
        s = torch.einsum("bd,bkd->bk", q, neg) * inv_tau  # [B, k]
        valid = torch.ones(b, k, dtype=torch.bool, device=q.device)
        if neg_mask is not None:
            m = torch.as_tensor(neg_mask, device=q.device)
            if m.shape != (b, k):
                raise ValueError(f"neg_mask must be [B, k] = [{b}, {k}], got {tuple(m.shape)}")
            valid = m.to(torch.bool)
        if shared_negatives:
            if neg_log_q is not None:
                raise ValueError("shared_negatives=True needs neg_log_q=None (log q is per query)")
            s = q @ neg.reshape(b * k, -1).T * inv_tau  # [B, B*k]
            valid = valid.reshape(1, b * k).expand(b, b * k)
        if neg_log_q is not None:
            lq = torch.as_tensor(neg_log_q, device=q.device).to(q.dtype)
            if lq.shape != (b, k):
                raise ValueError(f"neg_log_q must be [B, k] = [{b}, {k}], got {tuple(lq.shape)}")
            valid = valid & ~(lq == math.inf)
            sampled = valid & torch.isfinite(lq)
            corr = torch.where(sampled, lq, torch.zeros_like(lq))
            if correction == "log_kq":
                count = sampled.sum(1, keepdim=True).clamp(min=1).to(q.dtype)
                corr = corr + torch.where(sampled, torch.log(count), torch.zeros_like(lq))
            s = s - corr
        s = s.masked_fill(~valid, -math.inf)
        parts.append(s)
    logits = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    loss = torch.logsumexp(logits, dim=1) - pos
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ----------------------------------------------------------------------------
# Chunking helpers
# ----------------------------------------------------------------------------


def _num_rows(x: Inputs) -> int:
    """Number of examples in an input (dim 0 of a Tensor / dict, len of a sequence)."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("a Tensor input needs a batch dimension")
        return x.shape[0]
    if isinstance(x, dict):
        if not x:
            raise ValueError("a dict input must hold at least one Tensor")
        sizes = {k: v.shape[0] for k, v in x.items() if isinstance(v, Tensor)}
        if len(sizes) != len(x):
            raise TypeError("every value of a dict input must be a Tensor")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the dict input's Tensors differ in dim 0: {sizes}")
        return next(iter(sizes.values()))
    if isinstance(x, (str, bytes)):
        raise TypeError("a str is not a batch; pass a list of examples")
    if isinstance(x, collections.abc.Sequence) or (hasattr(x, "__len__") and hasattr(x, "__getitem__")):
        return len(x)  # a list, tuple, numpy array, or any sliceable sized batch
    raise TypeError(f"inputs must be a Tensor, a dict of Tensors or a sequence, got {type(x).__name__}")


def _slice(x: Inputs, start: int, stop: int) -> Inputs:
    """Rows [start, stop) of an input, of the same kind."""
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, dict):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def _tensors(x: Any) -> Iterator[Tensor]:
    """The Tensors inside an input (used to find the CUDA devices it touches)."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x[:1]:  # a batch is homogeneous; one look suffices
            yield from _tensors(v)


def _cuda_devices(module: nn.Module, x: Any) -> List[int]:
    """The CUDA devices whose random state a forward of module on x may draw from."""
    if not torch.cuda.is_available():
        return []
    devs = set()
    for p in module.parameters():
        if p.is_cuda:
            devs.add(p.get_device())
    for tensor in _tensors(x):
        if tensor.is_cuda:
            devs.add(tensor.get_device())
    return sorted(devs)


@dataclasses.dataclass
class _RandomState:
    """The CPU and CUDA generator states before a chunk's first forward."""

    cpu: Tensor
    cuda_devices: List[int]
    cuda: List[Tensor]

    @classmethod
    def capture(cls, devices: List[int]) -> "_RandomState":
        return cls(
            cpu=torch.get_rng_state(),
            cuda_devices=list(devices),
            cuda=[torch.cuda.get_rng_state(d) for d in devices],
        )

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Runs the block from the saved states; the callers' states are restored after."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu)
            for d, s in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(s, d)
            yield


@dataclasses.dataclass
class _Chunk:
    """One chunk of one input group, encoded by one encoder."""

    encoder: nn.Module
    inputs: Inputs
    rows: slice  # rows of the group's representations
    group: int  # 0 queries, 1 targets, 2 negatives
    rng: Optional[_RandomState] = None


@dataclasses.dataclass
class StepInfo:
    """What the last ``GradCache.step`` did.

    Attributes:
        loss: the batch's loss as returned by the loss function (before the
            partial-batch weight and the scaler), NaN when dropped.
        batch_size: B, the number of queries in the batch.
        nominal_batch_size: the full batch size partial batches are judged against.
        num_chunks: forwards per pass (queries, targets and negatives together);
            0 when dropped.
        partial: None for a full batch; "dropped", "reweighted" or "kept" for a
            batch smaller than the nominal size, by the ``partial`` policy.
        weight: the factor the loss (and so the gradient) was multiplied by:
            1.0, B / nominal for "reweight", 0.0 for "drop".
    """

    loss: float
    batch_size: int
    nominal_batch_size: int
    num_chunks: int
    partial: Optional[str]
    weight: float


def _is_ddp(module: nn.Module) -> bool:
    """True for a DistributedDataParallel-wrapped module."""
    return isinstance(module, nn.parallel.DistributedDataParallel)


def _has_no_sync(module: nn.Module) -> bool:
    """True for a wrapper with a gradient-sync switch (DDP, FSDP)."""
    return callable(getattr(module, "no_sync", None))


def _outer_autocast_active() -> bool:
    """True inside an enabled torch.autocast region (CUDA or CPU)."""
    return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


@contextlib.contextmanager
def _autocast_disabled() -> Iterator[None]:
    """Disables any outer autocast (CPU and CUDA) for the block."""
    with contextlib.ExitStack() as stack:
        if torch.is_autocast_cpu_enabled():
            stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
        if torch.is_autocast_enabled():
            stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
        yield


# ----------------------------------------------------------------------------
# GradCache
# ----------------------------------------------------------------------------


class GradCache:
    """Exact large-batch contrastive gradients at chunk-sized memory.

    ``step`` accumulates into the encoders' ``.grad`` the gradient of
    ``loss_fn`` over the whole batch (queries, their positives as in-batch
    targets, and optional per-query extra negatives); the caller zeroes the
    gradients before and runs ``optimizer.step()`` after, as with a plain
    ``loss.backward()``.

    Behaviour that trainers depend on:

    - Random state: each chunk's CPU and CUDA generator states are saved before
      its graph-free forward and replayed for its re-forward, so dropout draws
      the same masks in both passes. After ``step`` the global generators are
      where the first pass left them (as after one ordinary forward). Python's
      and numpy's generators are not replayed: encoders must draw randomness
      from torch.
    - DistributedDataParallel (or any wrapper with ``no_sync``, e.g. FSDP): every
      re-forward but each wrapped encoder's last runs under ``no_sync()``, so the
      gradients are all-reduced once per step. A DDP encoder's graph-free forward
      calls the wrapped module directly (no buffer broadcast). All ranks must
      step batches that split into the same number of chunks, with the same
      partial-batch outcome, or the collectives will not match.
    - Mixed precision: ``autocast_dtype`` makes the encoders' forwards run under
      GradCache's own ``torch.autocast`` on the encoders' device type; the loss is
      computed in float32 outside autocast. With a ``scaler``
      (``torch.cuda.amp.GradScaler``), the representations' gradient is that of
      ``scaler.scale(loss)``; the caller runs ``scaler.step(opt)`` and
      ``scaler.update()``. An enclosing autocast is not nested into: with
      ``outer_autocast="error"`` (default) ``step`` raises RuntimeError inside
      one, with ``"disable"`` it turns the outer autocast off for the step (and
      applies only its own ``autocast_dtype``).
    - Shared or separate encoders: ``target_encoder=None`` encodes targets and
      negatives with the query encoder. An encoder with no trainable parameter
      (frozen) is encoded once, without a re-forward.
    - Sparse gradients (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``)
      accumulate across chunks as sparse tensors.
    - Partial batches: a batch with fewer queries than ``batch_size`` (the
      nominal size; None: the largest batch stepped so far) is handled by
      ``partial``: "reweight" (default) multiplies its loss by B / batch_size,
      so each of its examples weighs in the gradient as an example of a full
      mean-reduced batch (for a sum-reduced loss, use "keep"); "drop" encodes
      nothing, leaves ``.grad`` unchanged and returns NaN (skip
      ``optimizer.step()``); "keep" treats it as a full batch.
      ``last_step.partial`` says which happened, and the first partial batch
      warns once per instance. Chunks smaller than ``chunk_size`` (a chunk size
      that does not divide the batch) are exact and need no policy.

    Thread safety: none; one step at a time.
    """

    def __init__(
        self,
        query_encoder: nn.Module,
        target_encoder: Optional[nn.Module] = None,
        chunk_size: int = 32,
        loss_fn: Callable[..., Tensor] = sampled_softmax_loss,
        autocast_dtype: Optional[torch.dtype] = None,
        scaler: Optional[Any] = None,
        partial: str = "reweight",
        batch_size: Optional[int] = None,
        outer_autocast: str = "error",
        get_rep: Optional[Callable[[Any], Tensor]] = None,
    ) -> None:
        """Configures gradient caching.

        Args:
            query_encoder: maps a chunk of query inputs to [n, d] representations.
            target_encoder: maps target inputs to [n, d]; None shares the query
                encoder.
            chunk_size: examples per forward (>= 1); it bounds the activation
                memory, not the batch.
            loss_fn: called as ``loss_fn(q, t, neg=neg, neg_log_q=..., neg_mask=...,
                **loss_kwargs)`` with q [B, d], t [B, d], neg [B, k, d] (the neg*
                keywords only when negatives are given); must return a scalar.
            autocast_dtype: None (no autocast) or e.g. torch.float16 /
                torch.bfloat16 for the encoders' forwards.
            scaler: a GradScaler (anything with ``scale(loss)``) or None.
            partial: "reweight" | "drop" | "keep", the policy for batches smaller
                than ``batch_size``.
            batch_size: the nominal batch size, or None to use the largest batch
                stepped so far.
            outer_autocast: "error" | "disable", what to do when ``step`` is
                called inside an enabled autocast region.
            get_rep: maps an encoder's output to its [n, d] Tensor (e.g.
                ``lambda out: out.pooler_output``); None: the output is the Tensor.

        Raises:
            ValueError: on a bad option.
        """
        if not isinstance(query_encoder, nn.Module):
            raise TypeError("query_encoder must be a torch.nn.Module")
        if target_encoder is not None and not isinstance(target_encoder, nn.Module):
            raise TypeError("target_encoder must be a torch.nn.Module or None")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if partial not in _PARTIAL:
            raise ValueError(f"partial must be one of {_PARTIAL}, got {partial!r}")
        if outer_autocast not in _OUTER_AUTOCAST:
            raise ValueError(f"outer_autocast must be one of {_OUTER_AUTOCAST}, got {outer_autocast!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise ValueError(f"autocast_dtype must be a torch.dtype or None, got {autocast_dtype!r}")
        self.query_encoder = query_encoder
        self.target_encoder = target_encoder if target_encoder is not None else query_encoder
        self.chunk_size = chunk_size
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self.partial = partial
        self.batch_size = batch_size
        self.outer_autocast = outer_autocast
        self.get_rep = get_rep
        #: The last step's outcome (None before the first step).
        self.last_step: Optional[StepInfo] = None
        self._nominal_seen = 0
        self._warned_partial = False

    # -- public --------------------------------------------------------------

    def encode(self, inputs: Inputs, which: str = "query") -> Tensor:
        """Encodes inputs in chunks without a graph (e.g. queries to mine with).

        Runs under GradCache's own autocast and consumes the random generators as
        an ordinary forward would (call it outside the step, in eval mode for
        deterministic embeddings).

        Args:
            inputs: a Tensor, a dict of Tensors or a sequence of examples.
            which: "query" or "target", the encoder to use.

        Returns:
            [n, d] representations, detached.
        """
        if which not in ("query", "target"):
            raise ValueError(f"which must be 'query' or 'target', got {which!r}")
        enc = self.query_encoder if which == "query" else self.target_encoder
        n = _num_rows(inputs)
        outs = []
        with self._outer_guard(), torch.no_grad():
            for start in range(0, n, self.chunk_size):
                stop = min(start + self.chunk_size, n)
                outs.append(self._forward(self._unwrap(enc), _slice(inputs, start, stop), stop - start))
        if not outs:
            raise ValueError("cannot encode an empty batch")
        return torch.cat(outs)

    def step(
        self,
        queries: Inputs,
        targets: Inputs,
        negatives: Optional[Inputs] = None,
        negative_log_q: Optional[Union[Tensor, Any]] = None,
        negative_mask: Optional[Union[Tensor, Any]] = None,
        **loss_kwargs: Any,
    ) -> float:
        """Accumulates one batch's exact gradient into the encoders' ``.grad``.

        Args:
            queries: B query inputs (Tensor / dict of Tensors split along dim 0,
                or a sequence, sliced).
            targets: B target inputs; row i is query i's positive.
            negatives: B*k target inputs, query-major (query i's negatives are
                rows i*k .. i*k+k-1), or None; encoded by the target encoder and
                reshaped to [B, k, d].
            negative_log_q: [B, k] proposal log-probabilities (Tensor or array;
                NaN: top-k entry, no correction), or None (all top-k).
            negative_mask: [B, k] bool, True for real negatives, False for padding
                (``MineResult.ids >= 0``), or None.
            **loss_kwargs: passed to ``loss_fn`` (e.g. temperature=0.02).

        Returns:
            The batch's loss (unweighted, unscaled); NaN when the batch was dropped.

        Raises:
            ValueError: on inconsistent batch sizes or shapes.
            RuntimeError: inside an enabled autocast with outer_autocast="error".
        """
        b = _num_rows(queries)
        if b == 0:
            raise ValueError("cannot step an empty batch")
        if _num_rows(targets) != b:
            raise ValueError(f"targets has {_num_rows(targets)} rows, queries has {b}")
        k = 0
        if negatives is not None:
            n_neg = _num_rows(negatives)
            if negative_log_q is not None:
                k = int(torch.as_tensor(negative_log_q).shape[-1])
            elif negative_mask is not None:
                k = int(torch.as_tensor(negative_mask).shape[-1])
            elif n_neg % b == 0:
                k = n_neg // b
            if k == 0 or n_neg != b * k:
                raise ValueError(f"negatives must hold B*k = {b}*k rows, got {n_neg} (k from log_q/mask: {k})")
        elif negative_log_q is not None or negative_mask is not None:
            raise ValueError("negative_log_q / negative_mask given without negatives")

        weight, partial, nominal = self._partial_weight(b)
        if partial == "dropped":
            self.last_step = StepInfo(math.nan, b, nominal, 0, partial, 0.0)
            return math.nan

        with self._outer_guard():
            chunks = self._plan(queries, targets, negatives, b, k)
            reps = self._first_pass(chunks)
            loss_value, grads = self._rep_gradients(reps, b, k, negative_log_q, negative_mask, weight, loss_kwargs)
            self._second_pass(chunks, grads)
        self.last_step = StepInfo(loss_value, b, nominal, len(chunks), partial, weight)
        return loss_value

    __call__ = step

    # -- internals -------------------------------------------------------------

    def _partial_weight(self, b: int) -> Tuple[float, Optional[str], int]:
        """The loss weight and partial-batch outcome for a batch of b queries."""
        if self.batch_size is not None:
            if b > self.batch_size:
                raise ValueError(f"batch of {b} queries exceeds batch_size={self.batch_size}")
            nominal = self.batch_size
        else:
            self._nominal_seen = max(self._nominal_seen, b)
            nominal = self._nominal_seen
        if b == nominal:
            return 1.0, None, nominal
        outcome = {"drop": "dropped", "reweight": "reweighted", "keep": "kept"}[self.partial]
        weight = {"drop": 0.0, "reweight": b / nominal, "keep": 1.0}[self.partial]
        if not self._warned_partial:
            self._warned_partial = True
            warnings.warn(
                f"GradCache: a partial batch of {b} < {nominal} queries was {outcome} "
                f"(partial={self.partial!r}); further partial batches are handled the same way "
                f"without a warning, see GradCache.last_step.partial",
                stacklevel=3,
            )
        return weight, outcome, nominal

    @contextlib.contextmanager
    def _outer_guard(self) -> Iterator[None]:
        """Applies the outer_autocast policy."""
        if not _outer_autocast_active():
            yield
            return
        if self.outer_autocast == "error":
            raise RuntimeError(
                "GradCache.step was called inside an enabled torch.autocast region. GradCache runs "
                "its own autocast (autocast_dtype=...) around the encoders and computes the loss in "
                "float32; nesting it in an outer autocast would run the loss in low precision. Call "
                "step outside autocast, or pass outer_autocast='disable' to turn the outer one off "
                "for the step."
            )
        with _autocast_disabled():
            yield

    def _autocast(self, encoder: nn.Module) -> contextlib.AbstractContextManager:
        """GradCache's own autocast for an encoder's forward (or nothing)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = "cpu"
        for p in encoder.parameters():
            device_type = p.device.type
            break
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    @staticmethod
    def _unwrap(encoder: nn.Module) -> nn.Module:
        """The module a DDP wrapper holds (for graph-free forwards), else the encoder."""
        return encoder.module if _is_ddp(encoder) else encoder

    def _forward(self, encoder: nn.Module, inputs: Inputs, n: int) -> Tensor:
        """One chunk's forward, checked to give [n, d]."""
        with self._autocast(encoder):
            out = encoder(inputs)
        rep = self.get_rep(out) if self.get_rep is not None else out
        if not isinstance(rep, Tensor):
            raise TypeError(
                f"the encoder returned {type(rep).__name__}, not a Tensor; pass get_rep= to extract it"
            )
        if rep.dim() != 2 or rep.shape[0] != n:
            raise ValueError(f"the encoder must return [n, d] = [{n}, d], got {tuple(rep.shape)}")
        return rep

    def _plan(self, queries: Inputs, targets: Inputs, negatives: Optional[Inputs], b: int, k: int) -> List[_Chunk]:
        """The chunks of all groups, in forward order: queries, targets, negatives."""
        chunks: List[_Chunk] = []
        groups: List[Tuple[int, nn.Module, Inputs, int]] = [
            (0, self.query_encoder, queries, b),
            (1, self.target_encoder, targets, b),
        ]
        if negatives is not None:
            groups.append((2, self.target_encoder, negatives, b * k))
        for group, enc, inputs, n in groups:
            for start in range(0, n, self.chunk_size):
                stop = min(start + self.chunk_size, n)
                chunks.append(_Chunk(enc, _slice(inputs, start, stop), slice(start, stop), group))
        return chunks

    def _first_pass(self, chunks: List[_Chunk]) -> List[Tensor]:
        """Graph-free forwards; saves each chunk's random state. Returns per-group reps."""
        per_group: Dict[int, List[Tensor]] = {0: [], 1: [], 2: []}
        with torch.no_grad():
            for c in chunks:
                c.rng = _RandomState.capture(_cuda_devices(c.encoder, c.inputs))
                n = c.rows.stop - c.rows.start
                per_group[c.group].append(self._forward(self._unwrap(c.encoder), c.inputs, n))
        reps = [torch.cat(per_group[g]) for g in (0, 1, 2) if per_group[g]]
        d = {r.shape[1] for r in reps}
        if len(d) != 1:
            raise ValueError(f"query and target representations differ in width: {sorted(d)}")
        return reps

    def _rep_gradients(
        self,
        reps: List[Tensor],
        b: int,
        k: int,
        negative_log_q: Any,
        negative_mask: Any,
        weight: float,
        loss_kwargs: Dict[str, Any],
    ) -> Tuple[float, List[Tensor]]:
        """The loss on the cached representations and its gradient w.r.t. them."""
        leaves = [r.detach().requires_grad_() for r in reps]
        with torch.enable_grad(), _autocast_disabled():
            q, t = leaves[0], leaves[1]
            if k:
                neg = leaves[2].reshape(b, k, -1)
                loss = self.loss_fn(q, t, neg=neg, neg_log_q=negative_log_q, neg_mask=negative_mask, **loss_kwargs)
            else:
                loss = self.loss_fn(q, t, **loss_kwargs)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn must return a scalar Tensor (use reduction='mean' or 'sum')")
            loss_value = float(loss.detach())
            objective = loss * weight if weight != 1.0 else loss
            if self.scaler is not None:
                objective = self.scaler.scale(objective)
            objective.backward()
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        return loss_value, grads

    def _second_pass(self, chunks: List[_Chunk], grads: List[Tensor]) -> None:
        """Re-forwards each chunk from its saved random state and backpropagates its cached gradient."""
        trainable = {id(c.encoder): any(p.requires_grad for p in c.encoder.parameters()) for c in chunks}
        chunks = [c for c in chunks if trainable[id(c.encoder)]]  # a frozen encoder needs no re-forward
        last: Dict[int, int] = {}
        for i, c in enumerate(chunks):
            last[id(c.encoder)] = i
        for i, c in enumerate(chunks):
            sync = contextlib.nullcontext()
            if _has_no_sync(c.encoder) and last[id(c.encoder)] != i:
                sync = c.encoder.no_sync()
            n = c.rows.stop - c.rows.start
            assert c.rng is not None
            with sync, c.rng.replay(), torch.enable_grad():
                rep = self._forward(c.encoder, c.inputs, n)
                if rep.requires_grad:  # False when the chunk reaches no trainable parameter
                    rep.backward(gradient=grads[c.group][c.rows].to(rep.dtype))
