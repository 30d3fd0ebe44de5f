"""Reading a shard's batches ahead of the model, decoding each batch in a pool of threads.

A scan alternates reading (I/O, then decoding JPEGs: CPU) and computing on the batch; done in
turn in one thread, the cores sit idle for one while the other runs, and a GPU waits for a single
decoding core. :class:`Prefetcher` reads batch i+1 while the caller computes on batch i (a
bounded lookahead: ``lookahead`` batches in flight, one by default, so memory stays a couple of
batches) and decodes each batch's images in ``threads`` threads (PIL releases the GIL while it
decodes and resizes, so N threads use N cores).

Determinism: the batches are exactly ``source.read(indices)`` of each index list, in order (same
images in the same order, same pixels, same skips with the same reasons): reading is still done
by one thread in order, and decoding one image does not depend on which thread does it.

With ``decode_device`` (the worker's CUDA device), JPEGs are decoded there instead, in one
batched call per batch (:mod:`jobs.datasets.device_decode`); the pixels then differ slightly from
the CPU path's (another decoder and resampler), so it is a choice, never a fallback.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from jobs.datasets.base import Batch, ImageSource

log = logging.getLogger(__name__)


class Prefetcher:
    """Batches of ``source`` read ahead and decoded in ``threads`` threads (see the module)."""

    def __init__(
        self,
        source: ImageSource,
        threads: int,
        *,
        lookahead: int = 1,
        decode_device: torch.device | str | None = None,
    ) -> None:
        if threads < 1 or lookahead < 1:
            raise ValueError(f"need threads >= 1 and lookahead >= 1, got {threads}, {lookahead}")
        self.source, self.threads, self.lookahead = source, int(threads), int(lookahead)
        stores_bytes = type(source).fetch is not ImageSource.fetch
        on_device = decode_device is not None and stores_bytes
        self.decode_device = torch.device(decode_device) if on_device else None
        self._pool: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the threads (a later :meth:`batches` starts them again)."""
        for pool in (self._reader, self._pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._reader = None

    def _pools(self) -> tuple[ThreadPoolExecutor | None, ThreadPoolExecutor]:
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="zfatlas-read")
            if self.threads > 1:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zfatlas-decode")
        return self._pool, self._reader

    def read(self, indices: Sequence[int]) -> Batch:
        """One batch, read now in this thread (decoded in the pool)."""
        pool, _ = self._pools()
        if self.decode_device is not None:
            from jobs.datasets.device_decode import read_on_device

            return read_on_device(self.source, indices, self.decode_device, pool)
        return self.source.read(indices, pool=pool)

    def batches(self, index_batches: Iterable[Sequence[int]]) -> Iterator[Batch]:
        """``source.read(b)`` for each ``b`` of ``index_batches``, in order, each read while the
        caller works on the one before."""
        _, reader = self._pools()
        todo = iter(index_batches)
        pending: deque[Future[Batch]] = deque()

        def submit() -> bool:
            for indices in todo:
                pending.append(reader.submit(self.read, indices))
                return True
            return False

        try:
            submit()
            while pending:
                batch = pending.popleft().result()
                while len(pending) < self.lookahead:  # keep `lookahead` batches reading
                    if not submit():
                        break
                yield batch
        finally:
            # Abandoned early (an error in the caller): nothing may still be reading the source
            # when control goes back to it.
            for future in pending:
                future.cancel()
            for future in pending:
                if not future.cancelled():
                    future.exception()


def prefetch(
    source: ImageSource, index_batches: Iterable[Sequence[int]], threads: int, *, lookahead: int = 1
) -> Iterator[Batch]:
    """:meth:`Prefetcher.batches` with threads that live as long as the iteration."""
    with Prefetcher(source, threads, lookahead=lookahead) as prefetcher:
        yield from prefetcher.batches(index_batches)
