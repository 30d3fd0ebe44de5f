"""An ImageFolder tree (``root/<class>/.../<image>``) on a local folder or S3."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jobs.datasets.base import Batch, StoreSource, content_hash
from jobs.datasets.decode import IMAGE_EXTENSIONS, decode_or_reason
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

    def _load(self, index: int) -> tuple[int, np.ndarray | None, str]:
        key = self.keys[index]
        try:
            data = self.store.get_bytes(key)
        except MissingKeyError:
            return index, None, "file disappeared after listing"
        except StoreError:
            # Bucket, credentials or endpoint: not this image's fault, and every other read would
            # fail the same way, so the job must stop rather than skip the whole dataset.
            raise
        except OSError as exc:
            return index, None, f"{type(exc).__name__}: {exc}"
        image, reason = decode_or_reason(data, self.image_size, self.resize)
        return index, image, reason

    def read(self, indices: Sequence[int]) -> Batch:
        wanted = self._check(indices)
        if self.remote and len(wanted) > 1:
            # One GET per image: overlap the round trips (boto3 clients are thread-safe).
            with ThreadPoolExecutor(max_workers=min(16, len(wanted))) as pool:
                loaded = list(pool.map(self._load, wanted))
        else:
            loaded = [self._load(i) for i in wanted]
        rows, skipped = [], []
        for i, image, reason in loaded:
            if image is None:
                log.warning("skipping unreadable image %s: %s", self.keys[i], reason)
                skipped.append((self.keys[i], reason))
            else:
                rows.append((i, image, int(self.labels[i])))
        return self._batch(rows, skipped)

    def fingerprint(self) -> str:
        entries = (f"{k}\t{s}" for k, s in zip(self.keys, self.sizes, strict=True))
        sizes = [str(self.image_size)] + ([f"resize={self.resize}"] if self.resize else [])
        return content_hash(["imagefolder", *sizes, *entries])
