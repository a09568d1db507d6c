"""negmine.Prefetcher: mines the negatives of the next batches while the
current one trains, over one MineStream.

    with negmine.Prefetcher(client, batches, k=64, mode="sample", temperature=0.05,
                            collection="docs") as pf:
        for batch, negatives in zip(batches_again, pf):
            loss = train_step(batch, negatives)   # the next batch is being mined

`batches` yields, per training batch, its queries (numpy or torch) or a dict
of Client.mine keyword arguments for that batch (it must hold "queries"; e.g.
{"queries": q, "exclude": positive_ids}); its entries override the
Prefetcher's own. The iterable is consumed lazily from a background thread:
at most `depth` batches are sent and not yet taken by the consumer, so a
data loader behind it runs at most `depth` batches ahead.

Results come in order. A batch the server refuses raises its NegmineError
at its position, and the stream goes on (the next `next()` gives the next
batch's result); a failure of the stream itself (the server went away)
raises once, and ends the iteration. An exception raised by the `batches`
iterable is raised to the consumer after the results of the batches before
it. Closing (close(), leaving the `with`, or the consumer breaking out of
its loop and closing) cancels the stream and returns without waiting for
in-flight work.

Thread safety: one consumer thread.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, Iterator, Optional, Tuple, Union

import grpc

from negmine import _arrays
from negmine.client import (DEFAULT_COLLECTION, MINE_OPTION_NAMES, Client,
                            build_mine_request, parse_mine_responses, to_torch)
from negmine.errors import Internal, error_from_item_status, error_from_rpc
from negmine.types import MineResult

__all__ = ["Prefetcher"]


@dataclass
class _Sent:
    """What the reader needs to turn the answer of one request into a result."""

    request_id: str
    k: int
    return_log_z: bool
    device: Any  # the queries' torch device, or None for numpy


class Prefetcher:
    """A background MineStream over `batches`, `depth` batches ahead.

    Args:
        client: the Client whose channel carries the stream.
        batches: an iterable of queries ([Q, dim] numpy / torch) or of dicts
            of Client.mine keyword arguments holding "queries".
        k: results per query (a batch's dict may override it).
        depth: the most batches sent to the server and not yet taken by the
            consumer (in flight or buffered), >= 1. 1 already mines batch
            i + 1 while batch i trains; 2 also absorbs jitter.
        collection: the collection (a batch's dict may override it).
        timeout: the deadline of the whole stream in seconds (None: none).
        **mine_kwargs: Client.mine's keyword options (mode, temperature,
            exclude, num_hard, rank_offset, seed, ...) for every batch.
    """

    def __init__(self, client: Client, batches: Iterable[Union[Any, Dict[str, Any]]],
                 k: int, depth: int = 2, *, collection: str = DEFAULT_COLLECTION,
                 timeout: Optional[float] = None, **mine_kwargs: Any) -> None:
        if depth < 1:
            raise ValueError(f"depth = {depth}; must be >= 1")
        allowed = set(MINE_OPTION_NAMES) | {"exclude", "positives", "min_index_version"}
        unknown = set(mine_kwargs) - allowed
        if unknown:
            raise TypeError(f"unknown mine options: {sorted(unknown)}")
        self.depth = depth
        self._defaults: Dict[str, Any] = dict(mine_kwargs, k=k, collection=collection)
        self._batches = batches
        self._cv = threading.Condition()
        self._free = depth          # guarded by _cv
        self._closed = False        # guarded by _cv
        self._finished = False      # the reader saw the end; guarded by _cv
        self._sent: Deque[_Sent] = collections.deque()       # guarded by _cv
        self._ready: Deque[Any] = collections.deque()        # guarded by _cv
        self._feed_error: Optional[BaseException] = None     # guarded by _cv
        self._terminal: Optional[BaseException] = None       # guarded by _cv
        self._num_sent = 0          # guarded by _cv
        self._num_taken = 0         # guarded by _cv
        self._max_outstanding = 0   # guarded by _cv
        self._call = client.stub.MineStream(self._requests(), timeout=timeout,
                                            metadata=client.metadata)
        self._reader = threading.Thread(target=self._read, name="negmine-prefetch",
                                        daemon=True)
        self._reader.start()

    # ---------------------------------------------------------- the feeder

    def _item_request(self, item: Any, index: int) -> Tuple[Any, _Sent]:
        args = dict(self._defaults)
        if isinstance(item, dict):
            if "queries" not in item:
                raise KeyError(f"batch {index}: a dict batch needs 'queries'")
            args.update(item)
        else:
            args["queries"] = item
        queries = args.pop("queries")
        k = int(args.pop("k"))
        request_id = str(index)
        req = build_mine_request(queries, k, request_id=request_id, **args)
        device = queries.device if _arrays.is_torch(queries) else None
        return req, _Sent(request_id, k, bool(args.get("return_log_z", False)), device)

    def _requests(self) -> Iterator[Any]:
        # Runs on gRPC's request thread: waits for a free slot, then pulls
        # the next batch, so the iterable never runs more than depth ahead.
        index = 0
        it = iter(self._batches)
        while True:
            with self._cv:
                while self._free == 0 and not self._closed and not self._finished:
                    self._cv.wait()
                if self._closed or self._finished:
                    return
                self._free -= 1
            try:
                item = next(it)
                req, sent = self._item_request(item, index)
            except StopIteration:
                return
            except BaseException as e:  # raised to the consumer, in order
                with self._cv:
                    self._feed_error = e
                    self._cv.notify_all()
                return
            with self._cv:
                if self._closed:
                    return
                self._sent.append(sent)
                self._num_sent += 1
                self._max_outstanding = max(self._max_outstanding,
                                            self._num_sent - self._num_taken)
            yield req
            index += 1

    # ---------------------------------------------------------- the reader

    def _read(self) -> None:
        try:
            for resp in self._call:
                with self._cv:
                    sent = self._sent.popleft() if self._sent else None
                if sent is None or resp.request_id != sent.request_id:
                    item: Any = Internal(
                        Internal.code, f"MineStream answered request '{resp.request_id}' "
                        f"where '{sent.request_id if sent else None}' was next")
                elif resp.status.code != 0:
                    item = error_from_item_status(resp.status.code, resp.status.message)
                else:
                    item = parse_mine_responses([resp], sent.k, sent.return_log_z)
                    if sent.device is not None:
                        item = to_torch(item, sent.device)
                with self._cv:
                    self._ready.append(item)
                    self._cv.notify_all()
        except grpc.RpcError as e:
            with self._cv:
                if not self._closed:
                    self._terminal = error_from_rpc(e)
        except BaseException as e:  # a bug in the conversion: surface it
            with self._cv:
                self._terminal = e
        finally:
            with self._cv:
                self._finished = True
                self._cv.notify_all()

    # -------------------------------------------------------- the consumer

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> MineResult:
        """The next batch's result, in order (blocks until it is mined).

        Raises:
            NegmineError: the server refused this batch, or the stream failed.
            StopIteration: every batch was answered, or the prefetcher is closed.
        """
        with self._cv:
            while not self._ready and not self._finished and not self._closed:
                self._cv.wait()
            if self._closed:
                raise StopIteration
            if self._ready:
                item = self._ready.popleft()
                self._num_taken += 1
                self._free += 1
                self._cv.notify_all()
            else:
                error = self._terminal or self._feed_error
                self._terminal = self._feed_error = None
                self._closed_by_end()
                if error is not None:
                    raise error
                raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def _closed_by_end(self) -> None:
        # Called with _cv held, once the reader finished.
        self._closed = True
        self._cv.notify_all()

    @property
    def outstanding(self) -> int:
        """Batches sent and not yet taken by the consumer (<= depth)."""
        with self._cv:
            return self._num_sent - self._num_taken

    @property
    def max_outstanding(self) -> int:
        """The most batches that were ever sent and not yet taken (<= depth)."""
        with self._cv:
            return self._max_outstanding

    @property
    def sent(self) -> int:
        """Batches sent so far."""
        with self._cv:
            return self._num_sent

    def close(self) -> None:
        """Cancels the stream and stops the background threads; idempotent.
        Results not yet taken are dropped."""
        with self._cv:
            already = self._closed and self._finished
            self._closed = True
            self._ready.clear()
            self._cv.notify_all()
        if not already:
            self._call.cancel()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=10)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
