"""What every image source is: a fixed, ordered list of labelled images read in batches.

Every source has a stable image order (procedural index; ImageFolder sorted relative paths;
Parquet files sorted, rows in file order; WebDataset shards sorted, samples in archive order) so
shards are deterministic ranges of it and an image id means the same image on every worker.
Reading is fetching (I/O, in order) then decoding (CPU, any thread): sources that store encoded
images implement :meth:`ImageSource.fetch` and get ``read`` (optionally decoding in a pool) for
free, which is what :mod:`jobs.datasets.prefetch` builds on. Sources are picklable (Ray workers receive them):
connections and open files are made lazily in each process.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from jobs.datasets.decode import decode_or_reason
from jobs.store import Store, open_store
from jobs.uris import parse_uri

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Images read for some indices; ``indices``/``labels`` list only the ones read OK, in order."""

    images: np.ndarray  # (B, H, W, 3) uint8 (a tensor on the device from the device decode path)
    labels: np.ndarray  # (B,) int64
    indices: np.ndarray  # (B,) int64
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image id, reason)


@dataclass
class Encoded:
    """One image as fetched from its files, before decoding: the bytes, or why there are none.

    Reading is split in two so the slow half can be spread: :meth:`ImageSource.fetch` does the
    I/O (in order, one caller), decoding the bytes is pure CPU and runs in any thread
    (:mod:`jobs.datasets.prefetch`), and both halves give exactly what ``read`` gives."""

    index: int
    label: int
    data: bytes | None = None
    reason: str = ""  # why the image is skipped (``data`` may still be there, e.g. without a label)


def shard_ranges(n: int, shard_size: int) -> ShardRanges:
    """Contiguous ranges of ``shard_size`` covering 0..n-1 (the last may be shorter).

    A lazy sequence, not a list: a dataset of 10^9 images in shards of 10 is 10^8 ranges, which
    the driver iterates but must never hold all at once."""
    if n < 0 or shard_size < 1:
        raise ValueError(f"need n >= 0 and shard_size >= 1, got {n}, {shard_size}")
    return ShardRanges(n, shard_size)


class ShardRanges(Sequence[range]):
    """``range(0, n)`` cut into consecutive ranges of ``size``: O(1) memory, len() and indexing
    work, and it compares equal to any sequence of the same ranges."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return -(-self.n // self.size)

    @overload
    def __getitem__(self, i: int) -> range: ...

    @overload
    def __getitem__(self, i: slice) -> list[range]: ...

    def __getitem__(self, i: int | slice) -> range | list[range]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        count = len(self)
        if i < 0:
            i += count
        if not 0 <= i < count:
            raise IndexError(f"shard {i} out of range for {count} shards")
        start = i * self.size
        return range(start, min(start + self.size, self.n))

    def __iter__(self) -> Iterator[range]:
        for start in range(0, self.n, self.size):
            yield range(start, min(start + self.size, self.n))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardRanges):
            return (self.n, self.size) == (other.n, other.size) or (len(self) == len(other) == 0)
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.n, self.size))

    def __repr__(self) -> str:
        return f"shard_ranges({self.n}, {self.size})"


def pack_units(units: Sequence[range], max_size: int) -> list[range]:
    """Work shards that follow a dataset's own units (tar files, row groups: consecutive ranges
    covering the dataset in order): consecutive whole units are joined while they fit in
    ``max_size``, and a unit larger than that is cut into equal pieces of at most ``max_size``.
    So a shard spans two units only when both fit in it whole, and never reads part of each."""
    if max_size < 1:
        raise ValueError(f"need max_size >= 1, got {max_size}")
    out: list[range] = []
    start = stop = None
    for unit in units:
        if not len(unit):
            continue
        if start is not None and stop == unit.start and unit.stop - start <= max_size:
            stop = unit.stop  # joins the open shard
            continue
        if start is not None:
            out.append(range(start, stop))
            start = stop = None
        if len(unit) <= max_size:
            start, stop = unit.start, unit.stop
            continue
        pieces = -(-len(unit) // max_size)
        bounds = [unit.start + len(unit) * p // pieces for p in range(pieces + 1)]
        out.extend(range(a, b) for a, b in zip(bounds, bounds[1:], strict=False))
    if start is not None:
        out.append(range(start, stop))
    return out


def content_hash(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\n")
    return h.hexdigest()


class ImageSource(ABC):
    """A fixed, ordered list of labelled images."""

    image_size: int
    resize: int | None = None  # short side before the center crop (None: image_size)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def image_id(self, index: int) -> str: ...

    @property
    @abstractmethod
    def class_names(self) -> list[str]: ...

    def read(self, indices: Sequence[int], pool: Executor | None = None) -> Batch:
        """The images at ``indices`` (in that order), skipping unreadable ones; with ``pool``,
        images are decoded in its threads (same result, in the same order)."""
        items = self.fetch(self._check(indices))
        return self.assemble(items, decode_items(self, items, pool))

    def fetch(self, indices: list[int]) -> list[Encoded]:
        """The encoded bytes of images ``indices`` (checked), in that order. Sources whose images
        are not stored encoded (the procedural set) override :meth:`read` instead."""
        raise NotImplementedError(f"{type(self).__name__} does not store encoded images")

    def decode(self, item: Encoded) -> tuple[np.ndarray | None, str]:
        """One fetched image decoded as this source reads it: (image, "") or (None, reason).
        Thread-safe: it touches nothing but the item."""
        if item.reason or item.data is None:
            return None, item.reason or "no image data"
        return decode_or_reason(item.data, self.image_size, self.resize)

    def assemble(self, items: list[Encoded], decoded: list[tuple[np.ndarray | None, str]]) -> Batch:
        """The batch of fetched and decoded images: the good ones in order, the others logged and
        listed in ``skipped`` with their reason."""
        rows, skipped = [], []
        for item, (image, reason) in zip(items, decoded, strict=True):
            if image is None:
                image_id = self.image_id(item.index)
                log.warning("skipping unreadable image %s: %s", image_id, reason)
                skipped.append((image_id, reason))
            else:
                rows.append((item.index, image, item.label))
        return self._batch(rows, skipped)

    def natural_shards(self, max_size: int) -> Sequence[range]:
        """Units of work of at most ``max_size`` images that follow the dataset's own files (a
        tar shard, a row group), so no unit reads part of two files when it need not; the
        default, for sources without such files, is :func:`shard_ranges`."""
        return shard_ranges(len(self), max_size)

    @abstractmethod
    def fingerprint(self) -> str:
        """A cheap hash identifying the dataset's content list (not every pixel)."""

    def ids(self) -> list[str]:
        return [self.image_id(i) for i in range(len(self))]

    def _check(self, indices: Sequence[int]) -> list[int]:
        out = [int(i) for i in indices]
        n = len(self)
        for i in out:
            if not 0 <= i < n:
                raise IndexError(f"image index {i} out of range for {n} images")
        return out

    def _batch(self, rows: list[tuple[int, np.ndarray, int]], skipped: list[tuple[str, str]]) -> Batch:
        size = self.image_size
        images = np.stack([r[1] for r in rows]) if rows else np.zeros((0, size, size, 3), np.uint8)
        return Batch(
            images=images,
            labels=np.array([r[2] for r in rows], np.int64),
            indices=np.array([r[0] for r in rows], np.int64),
            skipped=skipped,
        )


class StoreSource(ImageSource):
    """Shared by sources whose files live in a :class:`Store` (local folder or S3)."""

    def __init__(self, uri: str, endpoint_url: str | None) -> None:
        self.uri = uri
        self.endpoint_url = endpoint_url
        self.remote = parse_uri(uri).is_s3

    def __getstate__(self) -> dict[str, Any]:
        # Store clients and open files are per process; they are rebuilt on first use.
        return {k: v for k, v in self.__dict__.items() if k not in ("_store", "_cache")}

    @property
    def store(self) -> Store:
        store = self.__dict__.get("_store")
        if store is None:
            store = self.__dict__["_store"] = open_store(self.uri, self.endpoint_url)
        return store


def decode_items(
    source: ImageSource, items: list[Encoded], pool: Executor | None = None
) -> list[tuple[np.ndarray | None, str]]:
    """``source.decode`` of every item, in order; in ``pool``'s threads when given (PIL releases
    the GIL while it decodes and resizes, so N threads decode on N cores)."""
    if pool is None or len(items) < 2:
        return [source.decode(item) for item in items]
    return list(pool.map(source.decode, items))
