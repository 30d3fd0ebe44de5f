"""What every image source is: a fixed, ordered list of labelled images read in batches.

Every source has a stable image order (procedural index; ImageFolder sorted relative paths;
Parquet files sorted, rows in file order) so shards are deterministic ranges of it and an image id
means the same image on every worker. Sources are picklable (Ray workers receive them):
connections and open files are made lazily in each process.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.store import Store, open_store
from jobs.uris import parse_uri


@dataclass
class Batch:
    """Images read for some indices; ``indices``/``labels`` list only the ones read OK, in order."""

    images: np.ndarray  # (B, H, W, 3) uint8
    labels: np.ndarray  # (B,) int64
    indices: np.ndarray  # (B,) int64
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image id, reason)


def shard_ranges(n: int, shard_size: int) -> list[range]:
    """Contiguous ranges of ``shard_size`` covering 0..n-1 (the last may be shorter)."""
    if n < 0 or shard_size < 1:
        raise ValueError(f"need n >= 0 and shard_size >= 1, got {n}, {shard_size}")
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


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

    @abstractmethod
    def read(self, indices: Sequence[int]) -> Batch:
        """The images at ``indices`` (in that order), skipping unreadable ones."""

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
