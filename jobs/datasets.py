"""Image sources for jobs: the procedural set, an ImageFolder tree and Parquet, local or on S3.

Every source has a stable image order (procedural index; ImageFolder sorted relative paths;
Parquet files sorted, rows in file order) so shards are deterministic ranges of it and an image id
means the same image on every worker. Reading decodes, resizes the short side and center-crops to
a square RGB uint8 image; an image that cannot be read is skipped, logged and reported in the
batch, never raised, so one bad file cannot kill a long job.

Sources are picklable (Ray workers receive them): connections and open files are made lazily in
each process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from jobs.spec import DatasetSpec
from jobs.store import MissingKeyError, Store, StoreError
from jobs.uris import parse_uri
from zfcore.data import CLASS_NAMES, ProceduralDataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class Batch:
    """Images read for some indices; ``indices``/``labels`` list only the ones read OK, in order."""

    images: np.ndarray  # (B, H, W, 3) uint8
    labels: np.ndarray  # (B,) int64
    indices: np.ndarray  # (B,) int64
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image id, reason)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 RGB: short side resized to ``size``, then the
    center square cropped. Raises on bytes that are not a complete image."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (size, size))  # lets JPEG decode at a reduced scale when much larger
        img.load()  # decode fully now, so truncated files fail here rather than later
        return fit_image(img, size)


def _decode_or_reason(data: bytes, size: int) -> tuple[np.ndarray | None, str]:
    try:
        return decode_image(data, size), ""
    except Exception as exc:
        # Decoders raise all sorts (OSError, SyntaxError, struct.error, DecompressionBombError...)
        # on bad bytes; whatever it is, it concerns this one image only.
        return None, f"{type(exc).__name__}: {exc}"


def fit_image(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side of ``img`` to ``size`` and crop the center square, as uint8 RGB."""
    img = img.convert("RGB")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError("empty image")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def shard_ranges(n: int, shard_size: int) -> list[range]:
    """Contiguous ranges of ``shard_size`` covering 0..n-1 (the last may be shorter)."""
    if n < 0 or shard_size < 1:
        raise ValueError(f"need n >= 0 and shard_size >= 1, got {n}, {shard_size}")
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def _hash(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\n")
    return h.hexdigest()


class ImageSource(ABC):
    """A fixed, ordered list of labelled images."""

    image_size: int

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


class ProceduralSource(ImageSource):
    """zfcore's procedural dataset; images are drawn at ``image_size`` (no resize)."""

    def __init__(self, num_images: int, image_size: int, seed: int = 0) -> None:
        self.data = ProceduralDataset(num_images, image_size, seed)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.data)

    def image_id(self, index: int) -> str:
        return self.data.image_id(index)

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    def object_box(self, index: int) -> tuple[int, int, int, int]:
        """The object's (top, left, height, width) in image ``index``."""
        return self.data[index].box

    def read(self, indices: Sequence[int]) -> Batch:
        rows = []
        for i in self._check(indices):
            sample = self.data[i]
            rows.append((i, sample.image, sample.label))
        return self._batch(rows, [])

    def fingerprint(self) -> str:
        d = self.data
        # The first image's pixels too: a change to the generator changes the dataset.
        return _hash(
            ["procedural", str(d.num_images), str(d.image_size), str(d.seed), d[0].image.tobytes().hex()]
        )


class _StoreSource(ImageSource):
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
            store = self.__dict__["_store"] = Store.from_uri(self.uri, self.endpoint_url)
        return store


class ImageFolderSource(_StoreSource):
    """``root/<class>/.../<image>``: classes are the sorted top-level folders, ids the sorted
    relative paths. Files outside a class folder and non-image extensions are ignored."""

    def __init__(
        self, uri: str, image_size: int, endpoint_url: str | None = None, limit: int | None = None
    ) -> None:
        super().__init__(uri, endpoint_url)
        self.image_size = image_size
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
        image, reason = _decode_or_reason(data, self.image_size)
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
        return _hash(["imagefolder", str(self.image_size), *entries])


@dataclass(frozen=True)
class _RowGroup:
    file: int
    group: int
    start: int  # global index of its first row
    rows: int


class ParquetSource(_StoreSource):
    """A Parquet file, or a folder of them (sorted, recursively), with an encoded-image column
    (binary, or a struct with a ``bytes`` field as written by Hugging Face datasets) and a label
    column (integers, or strings mapped to their sorted order).

    Only the label and id columns are read up front; image bytes are read one row group at a time
    when a batch needs them, and the last few row groups are cached since shards read in order.
    """

    _CACHE_GROUPS = 2

    def __init__(
        self,
        uri: str,
        image_size: int,
        *,
        image_column: str = "image",
        label_column: str = "label",
        id_column: str | None = None,
        endpoint_url: str | None = None,
        limit: int | None = None,
    ) -> None:
        loc = parse_uri(uri)
        single = loc.path.lower().endswith((".parquet", ".parq", ".pq"))
        # A single file: the store is its folder, so the id's file part is just its name.
        root = str(loc.parent_and_name()[0]) if single else uri
        super().__init__(root, endpoint_url)
        self.image_size = image_size
        self.image_column, self.label_column, self.id_column = image_column, label_column, id_column
        name = loc.parent_and_name()[1] if single else ""
        listed = [
            o
            for o in self.store.list_objects(name)
            if (o.key == name if single else o.key.lower().endswith(".parquet"))
        ]
        if not listed:
            raise ValueError(f"no such Parquet file: {uri}" if single else f"no .parquet files under {uri}")
        self.files = [o.key for o in listed]
        self.file_sizes = [o.size for o in listed]
        self.groups: list[_RowGroup] = []
        labels, ids = [], []
        total = 0
        for fi, name in enumerate(self.files):
            pf = self._open(fi)
            names = pf.schema_arrow.names
            for col in (image_column, label_column, id_column):
                if col is not None and col not in names:
                    raise ValueError(f"{name}: no column {col!r}; columns are {names}")
            for g in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                self.groups.append(_RowGroup(fi, g, total, rows))
                total += rows
            cols = [label_column] + ([id_column] if id_column else [])
            table = pf.read(columns=cols)
            labels.append(table.column(label_column))
            if id_column:
                ids.extend(str(v) for v in table.column(id_column).to_pylist())
            else:
                ids.extend(f"{name}:{r}" for r in range(pf.metadata.num_rows))
        n = min(total, limit) if limit else total
        self._ids = ids[:n]
        if id_column and len(set(self._ids)) != len(self._ids):
            raise ValueError(f"id column {id_column!r} has duplicate values")
        self.labels, self._classes = _encode_labels(
            pa.chunked_array([c for lab in labels for c in lab.chunks]), n
        )
        self._starts = np.array([g.start for g in self.groups], np.int64)
        log.info("parquet %s: %d images in %d files, %d classes", uri, n, len(self.files), len(self._classes))

    def _open(self, file_index: int) -> pq.ParquetFile:
        opened = self.__dict__.setdefault("_cache", {"files": {}, "groups": OrderedDict()})
        pf = opened["files"].get(file_index)
        if pf is None:
            fs, base = self.store.arrow_filesystem()
            pf = pq.ParquetFile(fs.open_input_file(f"{base}/{self.files[file_index]}"))
            opened["files"][file_index] = pf
        return pf

    def _group_images(self, g: int) -> pa.Array:
        cache: OrderedDict[int, pa.Array] = self.__dict__.setdefault(
            "_cache", {"files": {}, "groups": OrderedDict()}
        )["groups"]
        if g in cache:
            cache.move_to_end(g)
            return cache[g]
        group = self.groups[g]
        column = self._open(group.file).read_row_group(group.group, columns=[self.image_column]).column(0)
        column = column.combine_chunks()
        if pa.types.is_struct(column.type):
            column = column.field("bytes")
        cache[g] = column
        while len(cache) > self._CACHE_GROUPS:
            cache.popitem(last=False)
        return column

    def __len__(self) -> int:
        return len(self._ids)

    def image_id(self, index: int) -> str:
        return self._ids[index]

    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    def read(self, indices: Sequence[int]) -> Batch:
        wanted = self._check(indices)
        rows, skipped = [], []
        for i in wanted:
            reason = ""
            label = int(self.labels[i])
            if label < 0:
                reason = f"missing label in column {self.label_column!r}"
            else:
                g = int(np.searchsorted(self._starts, i, side="right") - 1)
                data = self._group_images(g)[i - self.groups[g].start].as_py()
                if data is None:
                    reason = f"null in column {self.image_column!r}"
                else:
                    image, reason = _decode_or_reason(data, self.image_size)
                    if image is not None:
                        rows.append((i, image, label))
                        continue
            log.warning("skipping unreadable image %s: %s", self._ids[i], reason)
            skipped.append((self._ids[i], reason))
        return self._batch(rows, skipped)

    def fingerprint(self) -> str:
        meta = json.dumps([self.files, self.file_sizes, [g.rows for g in self.groups]])
        columns = f"{self.image_column}|{self.label_column}|{self.id_column}"
        return _hash(["parquet", str(self.image_size), str(len(self)), columns, meta, *self._ids])


def _encode_labels(column: pa.ChunkedArray, n: int) -> tuple[np.ndarray, list[str]]:
    """int64 labels (-1 for null) and class names: integers as they are (names "0".."max"),
    anything else by the sorted order of its distinct string values."""
    column = column.slice(0, n)
    if pa.types.is_integer(column.type):
        labels = pc.fill_null(column, -1).to_numpy().astype(np.int64)
        labels[labels < 0] = -1  # negative class numbers are as unusable as missing ones
        top = int(labels.max()) if len(labels) else -1
        return labels, [str(i) for i in range(top + 1)]
    strings = [None if v is None else str(v) for v in column.to_pylist()]
    classes = sorted({s for s in strings if s is not None})
    index = {name: i for i, name in enumerate(classes)}
    return np.array([-1 if s is None else index[s] for s in strings], np.int64), classes


def open_dataset(spec: DatasetSpec, image_size: int, endpoint_url: str | None = None) -> ImageSource:
    """The image source a dataset spec describes, producing ``image_size`` square images."""
    if spec.format == "procedural":
        n = min(spec.num_images, spec.limit) if spec.limit else spec.num_images
        return ProceduralSource(n, image_size, spec.seed)
    if spec.uri is None:
        raise ValueError(f"format {spec.format!r} needs a uri")
    if spec.format == "imagefolder":
        return ImageFolderSource(spec.uri, image_size, endpoint_url, spec.limit)
    return ParquetSource(
        spec.uri,
        image_size,
        image_column=spec.image_column,
        label_column=spec.label_column,
        id_column=spec.id_column,
        endpoint_url=endpoint_url,
        limit=spec.limit,
    )
