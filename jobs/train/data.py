"""What each training worker reads: a fixed split of the dataset, its own shard, and batches.

The split (validation, training, probe images) is a function of the dataset size and the seed, and
worker ``rank`` of ``world`` always owns the same equal-size slice of the training images, so every
worker knows its share without talking to the others, and a resumed run reads exactly what an
uninterrupted one would have. Each epoch's order within a shard is a function of (seed, epoch,
rank) for the same reason.

A shard small enough is decoded once and kept in memory as uint8; a larger one is read batch by
batch through :class:`jobs.datasets.ImageSource`, the next batch read in a thread while the current
one trains. Unreadable images are skipped (and counted), never fatal.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from jobs.datasets import ImageSource

log = logging.getLogger(__name__)

CACHE_BYTES = 1 << 30  # a worker keeps its shard in memory (uint8) up to this size
READ_CHUNK = 256  # images per read when filling the cache


@dataclass(frozen=True)
class Split:
    """Dataset indices, each sorted: held-out validation images, training images, and the fixed
    probe set (the first ``probe_images`` of the stable order) for feature snapshots."""

    train: np.ndarray
    val: np.ndarray
    probe: np.ndarray


def split_indices(n: int, val_fraction: float, probe_images: int, seed: int) -> Split:
    """A seeded random ``val_fraction`` of ``n`` images held out (at least one when the fraction
    is positive, and at least one image left to train on)."""
    if n < 2 and val_fraction > 0:
        raise ValueError(f"{n} image(s) cannot be split into training and validation")
    n_val = 0 if val_fraction <= 0 else min(n - 1, max(1, int(n * val_fraction)))
    order = np.random.default_rng([seed, 0x5A11]).permutation(n)
    return Split(
        train=np.sort(order[n_val:]),
        val=np.sort(order[:n_val]),
        probe=np.arange(min(probe_images, n), dtype=np.int64),
    )


def shard(indices: np.ndarray, rank: int, world: int, *, equal: bool) -> np.ndarray:
    """Worker ``rank``'s slice of ``indices`` (every ``world``-th item). With ``equal``, all
    shards have the same length (the remainder is left out), so every worker runs the same number
    of steps, as data-parallel training requires."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    mine = indices[rank::world]
    return mine[: len(indices) // world] if equal else mine


def epoch_order(n: int, seed: int, epoch: int, rank: int) -> np.ndarray:
    """Positions 0..n-1 in the order worker ``rank`` visits its shard in ``epoch``."""
    return np.random.default_rng([seed, epoch, rank]).permutation(n)


@dataclass
class ShardReader:
    """Reads one worker's images (``indices`` of ``source``) as uint8 batches."""

    source: ImageSource
    indices: np.ndarray
    cache_bytes: int = CACHE_BYTES
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        side = self.source.image_size
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._row: np.ndarray | None = None  # position in indices -> cache row, -1: unreadable
        if len(self.indices) * side * side * 3 <= self.cache_bytes:
            self._fill_cache()

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def cached(self) -> bool:
        return self._images is not None

    def _fill_cache(self) -> None:
        side = self.source.image_size
        images, labels = [np.zeros((0, side, side, 3), np.uint8)], [np.zeros(0, np.int64)]
        row = np.full(len(self.indices), -1, np.int64)
        filled = 0
        for start in range(0, len(self.indices), READ_CHUNK):
            batch = self.source.read(self.indices[start : start + READ_CHUNK])
            self.skipped.extend(batch.skipped)
            where = {int(i): filled + n for n, i in enumerate(batch.indices)}
            for pos in range(start, min(start + READ_CHUNK, len(self.indices))):
                row[pos] = where.get(int(self.indices[pos]), -1)
            filled += len(batch.indices)
            images.append(batch.images)
            labels.append(batch.labels)
        if not (row >= 0).any() and len(self.indices):
            raise RuntimeError(f"none of this worker's {len(self.indices)} images could be read")
        self._images, self._labels, self._row = np.concatenate(images), np.concatenate(labels), row

    def _read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._row is not None:
            rows = self._row[positions]
            rows = rows[rows >= 0]
            return self._images[rows], self._labels[rows]
        batch = self.source.read(self.indices[positions])
        self.skipped.extend(batch.skipped)
        return batch.images, batch.labels

    def steps(self, batch_size: int) -> int:
        return math.ceil(len(self.indices) / batch_size)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images (B, H, W, 3) uint8, labels (B,)) for consecutive ``batch_size`` runs of
        ``order`` (positions into ``indices``): exactly :meth:`steps` batches, the last possibly
        shorter. A batch whose images are all unreadable is replaced by the next readable images
        of the order, so the number of batches never changes."""
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if self.cached:
            for n, chunk in enumerate(chunks):
                yield self._nonempty(chunk, order, n * batch_size)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            pending = pool.submit(self._nonempty, chunks[0], order, 0) if chunks else None
            for n in range(len(chunks)):
                current = pending.result()
                if n + 1 < len(chunks):
                    pending = pool.submit(self._nonempty, chunks[n + 1], order, (n + 1) * batch_size)
                yield current

    def _nonempty(self, chunk: np.ndarray, order: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self._read(chunk)
        offset = start + len(chunk)
        while not len(labels):
            if offset >= start + len(order):
                raise RuntimeError(f"none of this worker's {len(self.indices)} images could be read")
            more = order[np.arange(offset, offset + len(chunk)) % len(order)]
            images, labels = self._read(more)
            offset += len(chunk)
        return images, labels
