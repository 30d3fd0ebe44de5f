"""The API's view of one artifact store: cached atlas readers, diffs and dataset readers.

Committed runs never change, so what is learnt about one (its manifest, its table footer, a diff
of two of them) is kept in small LRU caches shared by the request threads. Listings are never
cached: a run committed a second ago shows up on the next request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pyarrow.fs as pafs

from jobs.results.diff import AtlasDiff, diff_atlases
from jobs.results.query import AtlasReader, model_arch
from jobs.store import MANIFEST, Store, check_key
from services.api.channels import LayerTile, layer_tiles

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A thread-safe LRU cache; values are built outside the lock (two threads may build the same
    value once each; both results are equal, one is kept)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, build: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()
        self.put(key, value)
        return value

    def __contains__(self, key: K) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class Catalog:
    def __init__(self, store: Store, cache_size: int = 32) -> None:
        self.store = store
        self.filesystem, self.base = store.arrow_filesystem()
        self.base = self.base.rstrip("/")
        self._readers: LRU[str, AtlasReader] = LRU(cache_size)
        self._diffs: LRU[tuple[str, str, tuple[str, ...]], AtlasDiff] = LRU(cache_size)
        self._sources: LRU[str, Any] = LRU(cache_size)
        self._committed: LRU[tuple[str, str], bool] = LRU(4096)
        # A layer's tiles: one scan answers every sort, filter and page of it.
        self._tiles: LRU[tuple[str, str], list[LayerTile]] = LRU(cache_size)

    def reader(self, run_id: str) -> AtlasReader:
        """The atlas run's reader (UnknownRunError / QueryError for a missing or bad run id)."""
        return self._readers.get(run_id, lambda: AtlasReader(self.store, run_id, filesystem=self.filesystem))

    def tiles(self, run_id: str, layer: str) -> list[LayerTile]:
        """Every channel of the atlas's layer as a tile, by channel (UnknownLayerError for a bad layer)."""
        return self._tiles.get((run_id, layer), lambda: layer_tiles(self.reader(run_id), layer))

    def diff(self, run_a: str, run_b: str, layers: list[str] | None = None) -> AtlasDiff:
        key = (run_a, run_b, tuple(layers or ()))
        return self._diffs.get(key, lambda: diff_atlases(self.reader(run_a), self.reader(run_b), layers))

    def source(self, run_id: str) -> Any:
        """The dataset the atlas was built from (``jobs.datasets.ImageSource``), opened lazily."""

        def build() -> Any:
            return _source_of(self.reader(run_id).manifest, self._endpoint())

        return self._sources.get(run_id, build)

    def _endpoint(self) -> str | None:
        return getattr(self.store, "endpoint_url", None)

    def is_committed(self, kind: str, run_id: str) -> bool:
        """Whether ``kind/run_id`` is a committed run (only a yes is remembered)."""
        key = (kind, run_id)
        if key in self._committed:
            return True
        committed = self.store.exists(f"{check_key(kind)}/{check_key(run_id)}/{MANIFEST}")
        if committed:
            self._committed.put(key, True)
        return committed

    def open_image(self, key: str) -> tuple[pafs.NativeFile, int]:
        """A stream over the object at ``key`` and its size; FileNotFoundError if there is none."""
        path = f"{self.base}/{check_key(key)}"
        info = self.filesystem.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(key)
        return self.filesystem.open_input_stream(path), int(info.size)


def _source_of(manifest: dict[str, Any], endpoint_url: str | None) -> Any:
    """The dataset a committed atlas read, from its manifest as it was written: only the fields
    today's DatasetSpec knows are used, so a spec change never stops the viewer opening an old run."""
    from jobs.datasets import open_dataset  # imports torch: only when a source is asked for
    from jobs.specs.base import DatasetSpec
    from zfcore import architectures
    from zfcore.network import Preprocess

    spec = manifest.get("spec") or {}
    raw = spec.get("dataset") or {}
    dataset = DatasetSpec.model_validate({k: v for k, v in raw.items() if k in DatasetSpec.model_fields})
    recorded = manifest.get("preprocess") or {}  # written by atlases since 0.2
    size = recorded.get("image_size") or manifest.get("image_size") or dataset.image_size
    if size is None:
        size = architectures.get(model_arch(manifest) or "").image_size
    preprocess = Preprocess(int(size), resize=recorded.get("resize"))
    return open_dataset(dataset, preprocess, spec.get("endpoint_url") or endpoint_url)
