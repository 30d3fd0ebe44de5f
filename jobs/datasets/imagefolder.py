"""An ImageFolder tree (``root/<class>/.../<image>``) on a local folder or S3."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from jobs.datasets.base import Batch, Encoded, StoreSource, content_hash, decode_items
from jobs.datasets.decode import IMAGE_EXTENSIONS
from jobs.store import MissingKeyError, StoreError

log = logging.getLogger(__name__)


class ImageFolderSource(StoreSource):
    """``root/<class>/.../<image>``: classes are the sorted top-level folders, ids the sorted
    relative paths. Files outside a class folder and non-image extensions are ignored."""

    def __init__(
        self,
        uri: str,
        image_size: int,
        endpoint_url: str | None = None,
        limit: int | None = None,
        resize: int | None = None,
    ) -> None:
        super().__init__(uri, endpoint_url)
        self.image_size, self.resize = image_size, resize
        objects = [
            o
            for o in self.store.list_objects("")
            if "/" in o.key and o.key.lower().endswith(IMAGE_EXTENSIONS) and not o.key.startswith(".")
        ]
        self._classes = sorted({o.key.split("/", 1)[0] for o in objects})
        if not objects:
            raise ValueError(f"no images in class folders under {uri} (expected {uri}/<class>/<image>)")
        objects = objects[:limit] if limit else objects
        self.keys = [o.key for o in objects]
        self.sizes = [o.size for o in objects]
        index = {name: i for i, name in enumerate(self._classes)}
        self.labels = np.array([index[k.split("/", 1)[0]] for k in self.keys], np.int64)
        log.info("imagefolder %s: %d images, %d classes", uri, len(self.keys), len(self._classes))

    def __len__(self) -> int:
        return len(self.keys)

    def image_id(self, index: int) -> str:
        return self.keys[index]

    def ids(self) -> list[str]:
        return list(self.keys)

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    def _fetch_one(self, index: int) -> Encoded:
        key, label = self.keys[index], int(self.labels[index])
        try:
            return Encoded(index, label, self.store.get_bytes(key))
        except MissingKeyError:
            return Encoded(index, label, reason="file disappeared after listing")
        except StoreError:
            # Bucket, credentials or endpoint: not this image's fault, and every other read would
            # fail the same way, so the job must stop rather than skip the whole dataset.
            raise
        except OSError as exc:
            return Encoded(index, label, reason=f"{type(exc).__name__}: {exc}")

    def _io_pool(self, count: int) -> ThreadPoolExecutor | None:
        # One GET per image on S3: overlap the round trips (boto3 clients are thread-safe).
        return ThreadPoolExecutor(max_workers=min(16, count)) if self.remote and count > 1 else None

    def fetch(self, indices: list[int]) -> list[Encoded]:
        io_pool = self._io_pool(len(indices))
        if io_pool is None:
            return [self._fetch_one(i) for i in indices]
        with io_pool:
            return list(io_pool.map(self._fetch_one, indices))

    def read(self, indices: Sequence[int], pool: Executor | None = None) -> Batch:
        wanted = self._check(indices)
        io_pool = self._io_pool(len(wanted)) if pool is None else None
        if io_pool is None:
            items = self.fetch(wanted)
            return self.assemble(items, decode_items(self, items, pool))
        # Without a decode pool, an S3 read decodes each image in the thread that fetched it.
        with io_pool:
            loaded = list(io_pool.map(lambda i: self._decoded(self._fetch_one(i)), wanted))
        return self.assemble([item for item, _ in loaded], [out for _, out in loaded])

    def _decoded(self, item: Encoded) -> tuple[Encoded, tuple[np.ndarray | None, str]]:
        return item, self.decode(item)

    def fingerprint(self) -> str:
        entries = (f"{k}\t{s}" for k, s in zip(self.keys, self.sizes, strict=True))
        sizes = [str(self.image_size)] + ([f"resize={self.resize}"] if self.resize else [])
        return content_hash(["imagefolder", *sizes, *entries])
