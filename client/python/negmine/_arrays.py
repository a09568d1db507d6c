"""Conversions between numpy arrays / torch tensors and the wire's Matrix.

torch is never imported here: a tensor is recognized by its type's module,
so the package works without torch installed.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from negmine.errors import InvalidArgument
from negmine.v1 import negmine_pb2 as pb

_LE_F32 = np.dtype("<f4")
_LE_F16 = np.dtype("<f2")


def is_torch(x: Any) -> bool:
    """True when x is a torch.Tensor (without importing torch)."""
    mod = type(x).__module__
    return (mod == "torch" or mod.startswith("torch.")) and hasattr(x, "device")


def torch_module() -> Any:
    """The torch module, imported on first use."""
    if "torch" in sys.modules:
        return sys.modules["torch"]
    import torch  # noqa: F401  (optional dependency)
    return torch


def _torch_to_host(t: Any) -> Tuple[np.ndarray, int]:
    """A torch tensor as (numpy array of its bytes' dtype, wire dtype)."""
    torch = torch_module()
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.to("cpu").contiguous().view(torch.int16).numpy(), pb.DTYPE_BFLOAT16
    if t.dtype == torch.float16:
        return t.to("cpu").contiguous().numpy(), pb.DTYPE_FLOAT16
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.to("cpu").contiguous().numpy(), pb.DTYPE_FLOAT32


def _numpy_to_host(a: np.ndarray) -> Tuple[np.ndarray, int]:
    """A numpy array as (little-endian contiguous array, wire dtype)."""
    if a.dtype.name == "bfloat16" and a.dtype.itemsize == 2:  # e.g. ml_dtypes
        return np.ascontiguousarray(a).view("<i2"), pb.DTYPE_BFLOAT16
    if a.dtype == np.float16:
        return np.ascontiguousarray(a, dtype=_LE_F16), pb.DTYPE_FLOAT16
    if a.dtype.kind not in "fiub":
        raise InvalidArgument(InvalidArgument.code,
                              f"vectors of dtype {a.dtype} are not numbers")
    return np.ascontiguousarray(a, dtype=_LE_F32), pb.DTYPE_FLOAT32


def as_host_matrix(x: Any, what: str) -> Tuple[np.ndarray, int]:
    """x (numpy, torch on any device, or nested lists) as a 2-D host array and
    its wire dtype. float32 / float16 / bfloat16 travel as they are; other
    numeric dtypes are converted to float32."""
    if is_torch(x):
        host, dtype = _torch_to_host(x)
    else:
        host, dtype = _numpy_to_host(np.asarray(x))
    if host.ndim != 2:
        raise InvalidArgument(InvalidArgument.code,
                              f"{what} must be 2-D (rows x dim); got shape {tuple(host.shape)}")
    return host, dtype


def matrix(host: np.ndarray, dtype: int) -> "pb.Matrix":
    """A Matrix message from a host array made by as_host_matrix."""
    return pb.Matrix(rows=host.shape[0], cols=host.shape[1], dtype=dtype,
                     data=host.tobytes())


def to_matrix(x: Any, what: str) -> "pb.Matrix":
    """x as a Matrix message (see as_host_matrix)."""
    host, dtype = as_host_matrix(x, what)
    return matrix(host, dtype)


def num_rows_cols(x: Any, what: str) -> Tuple[int, int, int]:
    """(rows, cols, bytes per element on the wire) of a matrix-like x."""
    if is_torch(x):
        torch = torch_module()
        if x.dim() != 2:
            raise InvalidArgument(InvalidArgument.code,
                                  f"{what} must be 2-D (rows x dim); got shape {tuple(x.shape)}")
        size = 2 if x.dtype in (torch.float16, torch.bfloat16) else 4
        return int(x.shape[0]), int(x.shape[1]), size
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.ndim != 2:
        raise InvalidArgument(InvalidArgument.code,
                              f"{what} must be 2-D (rows x dim); got shape {tuple(a.shape)}")
    size = 2 if (a.dtype == np.float16 or a.dtype.name == "bfloat16") else 4
    return int(a.shape[0]), int(a.shape[1]), size


def as_ids(ids: Any, what: str = "ids") -> np.ndarray:
    """ids (numpy, torch, a sequence of ints) as a 1-D uint64 array."""
    if is_torch(ids):
        ids = ids.detach().to("cpu").numpy()
    a = np.asarray(ids)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise InvalidArgument(InvalidArgument.code,
                              f"{what} must be 1-D; got shape {tuple(a.shape)}")
    if a.size and a.dtype.kind not in "iu":
        raise InvalidArgument(InvalidArgument.code,
                              f"{what} must be integers; got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise InvalidArgument(InvalidArgument.code,
                              f"{what} must be >= 0; got {int(a.min())}")
    return a.astype(np.uint64, copy=False)


def exclude_lists(exclude: Any, rows: int,
                  what: str = "exclude") -> Optional[List[Sequence[int]]]:
    """exclude (or positives, named by `what`) as one list of ids per query:
    None, a sequence of `rows` iterables of ids (lists, arrays, tensors), a
    2-D integer array / tensor [rows, m], or a 1-D one [rows] (one id per
    query). Negative entries are padding, everywhere."""
    if exclude is None:
        return None
    if is_torch(exclude):
        exclude = exclude.detach().to("cpu").numpy()
    if isinstance(exclude, np.ndarray):
        if exclude.ndim == 1 and exclude.dtype != object:
            exclude = exclude.reshape(-1, 1)
        if exclude.ndim == 2:
            if len(exclude) != rows:
                raise InvalidArgument(
                    InvalidArgument.code,
                    f"{what} has {len(exclude)} rows; there are {rows} queries")
            return [row[row >= 0].astype(np.uint64).tolist() for row in exclude]
    lists = []
    for e in exclude:
        if is_torch(e):
            e = e.detach().to("cpu").numpy()
        a = np.asarray(list(e) if isinstance(e, Iterable) and not isinstance(e, np.ndarray)
                       else e, dtype=np.int64).reshape(-1)
        lists.append(a[a >= 0].astype(np.uint64).tolist())
    if len(lists) != rows:
        raise InvalidArgument(InvalidArgument.code,
                              f"{what} has {len(lists)} lists; there are {rows} queries")
    return lists


def from_matrix(m: "pb.Matrix") -> np.ndarray:
    """A Matrix message as a float32 array [rows, cols]."""
    if m.dtype == pb.DTYPE_FLOAT16:
        a = np.frombuffer(m.data, dtype=_LE_F16).astype(np.float32)
    elif m.dtype == pb.DTYPE_BFLOAT16:
        a = (np.frombuffer(m.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        a = np.frombuffer(m.data, dtype=_LE_F32)
    return a.reshape(m.rows, m.cols)
