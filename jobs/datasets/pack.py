"""Rewriting a dataset as WebDataset shards or Hugging Face-style Parquet, the formats that read
fastest (a sequential read per shard instead of a request per image), in one call.

The images' original encoded bytes are copied, never re-encoded, with their labels and ids, in the
source's stable order; an image whose bytes are corrupt is copied as it is, so the packed dataset
has the same images at the same indices and its reader skips the same ones (an image whose bytes
could not be fetched at all gets an empty member and is skipped too). The output is a function of
the source alone: the same input packs to the same bytes.

- ``webdataset``: ``shard-NNNNNN.tar`` of ``shard_size`` samples each; sample ``i`` is the members
  ``{i:09d}.<ext>`` (the image, with its original extension), ``{i:09d}.cls`` (the class number)
  and ``{i:09d}.json`` (``{"id": <original id>, "label": <class number>, "class": <name>}``); ids
  read back as the originals, e.g. ``cat/a.jpg`` for an ImageFolder. Each shard gets its index
  sidecar (``shard-NNNNNN.tar.zfatlas-index``) so opening the dataset reads no shard.
- ``parquet``: ``part-NNNNNN.parquet`` of ``shard_size`` rows each, in row groups of
  ``row_group_size``: ``image`` struct<bytes, path> (path: the original id), ``label`` int64 and
  ``image_id`` string, with Hugging Face's ``huggingface`` schema metadata (``Image``, a
  ``ClassLabel`` with the class names) so ``datasets`` loads it as its own, and ``zfatlas``
  metadata naming ``image_id`` as the id column.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.datasets.base import Encoded, ImageSource
from jobs.datasets.decode import IMAGE_EXTENSIONS
from jobs.datasets.webdataset import SIDECAR_SUFFIX, index_tar, sidecar_bytes
from jobs.store import Store, open_store

log = logging.getLogger(__name__)

PackFormat = Literal["webdataset", "parquet"]
FETCH_CHUNK = 256  # images fetched at a time (one batch of GETs on S3)
_MAGIC = [
    (b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
    (b"II*\x00", "tif"), (b"MM\x00*", "tif"),
]
PARQUET_SCHEMA = pa.schema([
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("label", pa.int64()),
    ("image_id", pa.string()),
])


@dataclass
class PackResult:
    """What a pack wrote: ``keys`` under ``out``, and the images it could not copy."""

    format: str
    out: str
    images: int = 0
    bytes: int = 0
    keys: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (image id, reason): no bytes
    seconds: float = 0.0


def extension(image_id: str, data: bytes) -> str:
    """The image member's extension: the original file's when it names an image type, else the
    type its bytes say, else ``jpg`` (readers go by the bytes, not the name)."""
    ext = image_id.rsplit("/", 1)[-1].rpartition(".")[2].lower()
    if f".{ext}" in IMAGE_EXTENSIONS:
        return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((e for magic, e in _MAGIC if data.startswith(magic)), "jpg")


def pack(
    source: ImageSource,
    out: str,
    format: PackFormat,
    *,
    shard_size: int = 1000,
    row_group_size: int = 100,
    endpoint_url: str | None = None,
    overwrite: bool = False,
) -> PackResult:
    """Write ``source`` to ``out`` (a folder or ``s3://`` prefix) as ``format`` (see the module).

    ``out`` must hold no shards already unless ``overwrite``, which deletes the ones there first (a
    stale shard left from a bigger dataset would otherwise be read as part of this one)."""
    if format not in ("webdataset", "parquet"):
        raise ValueError(f"unknown pack format {format!r}; use webdataset or parquet")
    if shard_size < 1 or row_group_size < 1:
        raise ValueError(f"need shard_size >= 1 and row_group_size >= 1, got {shard_size}, {row_group_size}")
    if type(source).fetch is ImageSource.fetch:
        raise ValueError(f"{type(source).__name__} has no encoded images to pack")
    started = time.perf_counter()
    store = open_store(out, endpoint_url)
    prefix = "shard-" if format == "webdataset" else "part-"
    existing = store.list_keys(prefix)
    if existing and not overwrite:
        raise ValueError(f"{out} already holds {len(existing)} packed files ({existing[0]}, ...); "
                         "remove them first, or overwrite them (--overwrite)")
    if existing:
        store.delete_prefix(prefix)
    result = PackResult(format, out)
    classes = source.class_names
    for shard, start in enumerate(range(0, len(source), shard_size)):
        indices = range(start, min(start + shard_size, len(source)))
        items = [item for c in range(indices.start, indices.stop, FETCH_CHUNK)
                 for item in source.fetch(list(range(c, min(c + FETCH_CHUNK, indices.stop))))]
        for item in items:
            if item.data is None:
                result.missing.append((source.image_id(item.index), item.reason))
                log.warning("packing %s without bytes: %s", source.image_id(item.index), item.reason)
        if format == "webdataset":
            keys = _write_tar(store, f"shard-{shard:06d}.tar", source, items, classes)
        else:
            name = f"part-{shard:06d}.parquet"
            keys = [_write_parquet(store, name, source, items, classes, row_group_size)]
        result.keys.extend(keys)
        result.images += len(items)
        result.bytes += sum(len(item.data or b"") for item in items)
        log.info("packed %d/%d images", result.images, len(source))
    result.seconds = time.perf_counter() - started
    return result


def _write_tar(
    store: Store, key: str, source: ImageSource, items: list[Encoded], classes: list[str]
) -> list[str]:
    fd, path = tempfile.mkstemp(suffix=".tar", prefix="zfatlas-pack-")
    os.close(fd)
    try:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for item in items:
                image_id = source.image_id(item.index)
                data = item.data or b""
                name = f"{item.index:09d}"
                meta = {"id": image_id}
                members = [(f"{name}.{extension(image_id, data)}", data)]
                if item.label >= 0:
                    members.append((f"{name}.cls", str(item.label).encode()))
                    meta["label"] = item.label
                    if item.label < len(classes):
                        meta["class"] = classes[item.label]
                members.append((f"{name}.json", json.dumps(meta, sort_keys=True).encode()))
                for member, payload in members:
                    _add(tar, member, payload)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            index = index_tar(f, size, seekable=True, name=key)
        index.class_names = dict(enumerate(classes))  # also the classes this shard has no image of
        store.put_file(key, path)
        store.put_bytes(key + SIDECAR_SUFFIX, sidecar_bytes(index))
        return [key, key + SIDECAR_SUFFIX]
    finally:
        os.unlink(path)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and time: the same images pack to the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_parquet(
    store: Store, key: str, source: ImageSource, items: list[Encoded], classes: list[str], row_group_size: int
) -> str:
    ids = [source.image_id(item.index) for item in items]
    table = pa.table(
        [
            pa.array([{"bytes": item.data, "path": i} for item, i in zip(items, ids, strict=True)],
                     PARQUET_SCHEMA.field("image").type),
            pa.array([item.label if item.label >= 0 else None for item in items], pa.int64()),
            pa.array(ids, pa.string()),
        ],
        schema=PARQUET_SCHEMA,
    )
    features = {
        "image": {"_type": "Image"},
        "label": {"names": list(classes), "_type": "ClassLabel"},
        "image_id": {"dtype": "string", "_type": "Value"},
    }
    table = table.replace_schema_metadata({
        b"huggingface": json.dumps({"info": {"features": features}}).encode(),
        b"zfatlas": json.dumps({"id_column": "image_id"}).encode(),
    })
    buf = io.BytesIO()
    # Image bytes are compressed already: compressing them again costs time and saves nothing.
    pq.write_table(table, buf, row_group_size=row_group_size, compression="none")
    store.put_bytes(key, buf.getvalue())
    return key
