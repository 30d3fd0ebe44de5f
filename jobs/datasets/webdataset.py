"""WebDataset tar shards (``.tar`` files of samples: an image member plus a label member), on a
local folder or S3, read without a request per image.

A sample is the run of consecutive members sharing a key (the member path up to the first dot of
its file name, as the webdataset library groups them): ``n01/n01_10026.jpg`` and
``n01/n01_10026.cls`` are one sample with key ``n01/n01_10026``; members whose file name starts
with a dot (``._x.jpg`` from macOS) or has no extension are not part of any sample. Its image is
the first member whose extension (its last dotted part, any case) is an image type; its label is
the integer text of its ``.cls`` member, else the ``label_field`` of its ``.json`` member (a class
number or a class name: names are numbered in sorted order, as Parquet string labels are). Its id is the
``id_field`` of its ``.json`` (default: ``"id"`` when the sample has one, as the pack tool
writes) or else its key. Samples without an image member are not images and are ignored.

Order: shards sorted by key, samples in archive order. To know that order, the labels and ids,
every shard is indexed once when the source opens: from its index sidecar
(``<shard>.tar.zfatlas-index``, written by ``zfatlas dataset pack`` and ``zfatlas dataset index``;
one small GET) when it matches the shard, else by reading the shard front to back once (large
sequential reads). Batches then read each shard's byte ranges: a run of consecutive samples is one
ranged read, so a scan reads every shard once, sequentially.

A truncated shard is reported, not fatal: the samples before the cut are read as usual; the one
cut through (and, when a sidecar says how many followed, every later one) is skipped with the
reason, and so counted in the manifest. When the cut falls between samples and no sidecar says
what followed, one entry ``<shard>#truncated@<byte>`` stands for the lost rest and is skipped
with the reason.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.datasets.base import Encoded, StoreSource, content_hash, pack_units
from jobs.datasets.decode import IMAGE_EXTENSIONS
from jobs.datasets.tar import Member, TarWalker
from jobs.store import MissingKeyError, ObjectInfo, Store
from jobs.uris import parse_uri

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".zfatlas-index"
SIDECAR_VERSION = 1
_KEY = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]*)$")
_IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
_MAX_META = 1 << 20  # .cls / .json members larger than this are not labels
_GAP = 1 << 20  # wanted members closer than this are read in one ranged request
_MAX_SPAN = 64 << 20  # ... as long as that request stays under this
_OPEN_FILES = 4
_INDEX_THREADS = 8
_SIDECAR_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("offset", pa.int64()),
    ("size", pa.int64()),
    ("label_int", pa.int64()),
    ("label_str", pa.string()),
    ("problem", pa.string()),
])


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name as the webdataset library splits it, or None for a name
    with no extension or a hidden file name."""
    match = _KEY.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


@dataclass
class ShardIndex:
    """The samples of one tar shard, in archive order: where each image's bytes are, its raw label
    (int, class name or None), its id, and why it cannot be read (or "")."""

    size: int  # bytes of the tar this index describes
    ids: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[int | str | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    problem: str = ""  # the shard's own: truncated, bad header
    end: int = -1  # where the end-of-archive marker starts (-1: none)
    class_names: dict[int, str] = field(default_factory=dict)  # class number -> name, where known

    def add(self, image_id: str, member: Member, label: int | str | None, problem: str) -> None:
        self.ids.append(image_id)
        self.offsets.append(member.offset)
        self.sizes.append(member.size)
        self.labels.append(label)
        self.problems.append(problem)

    def to_table(self, label_field: str, id_field: str | None) -> pa.Table:
        """The sidecar: this index as a Parquet table, with what it was built for."""
        meta = {"version": SIDECAR_VERSION, "tar_size": self.size, "label_field": label_field,
                "id_field": id_field, "problem": self.problem, "end": self.end,
                "class_names": {str(k): v for k, v in sorted(self.class_names.items())}}
        ints = [v if isinstance(v, int) else None for v in self.labels]
        strs = [v if isinstance(v, str) else None for v in self.labels]
        table = pa.table([self.ids, self.offsets, self.sizes, ints, strs, self.problems],
                         schema=_SIDECAR_SCHEMA)
        return table.replace_schema_metadata({b"zfatlas": json.dumps(meta, sort_keys=True).encode()})

    @classmethod
    def from_table(cls, table: pa.Table) -> tuple[ShardIndex, dict[str, Any]]:
        meta = json.loads((table.schema.metadata or {})[b"zfatlas"])
        columns = table.to_pydict()
        labels = [i if i is not None else s for i, s in zip(columns["label_int"], columns["label_str"],
                                                              strict=True)]
        index = cls(int(meta["tar_size"]), columns["id"], columns["offset"], columns["size"], labels,
                    [p or "" for p in columns["problem"]], meta.get("problem") or "",
                    int(meta.get("end", -1)),
                    {int(k): str(v) for k, v in (meta.get("class_names") or {}).items()})
        return index, meta


def index_tar(
    stream: Any, total_size: int, label_field: str = "label", id_field: str | None = None,
    *, seekable: bool = False, name: str = "",
) -> ShardIndex:
    """Index one shard by reading it front to back once (only label and metadata members are read;
    image bytes are skipped). Class names come from the ``class`` field of the samples' ``.json``
    (as the pack tool writes them) where they agree."""
    walker = TarWalker(stream, total_size, seekable=seekable)
    index = ShardIndex(total_size)
    conflicts: set[int] = set()
    sample: dict[str, Any] | None = None

    def close(s: dict[str, Any] | None) -> None:
        if s is None or s["image"] is None:
            return  # not an image sample (or no sample yet)
        problems = [p for p in s["problems"] if p]
        image: Member = s["image"]
        if not image.complete:
            problems.insert(0, f"shard {name} is truncated: it ends at byte {total_size}, inside this image")
        label = s["cls"] if s["cls"] is not None else _json_value(s["json"], label_field)
        if id_field is not None:
            image_id = _json_value(s["json"], id_field)
            if image_id is None:
                raise ValueError(f"{name}: sample {s['key']!r} has no {id_field!r} in a .json member")
        else:
            image_id = _json_value(s["json"], "id")
        if label is not None and not isinstance(label, int | str):
            problems.append(f"label {label!r} is neither a class number nor a class name")
            label = None
        name_of = _json_value(s["json"], "class")
        if (isinstance(label, int) and isinstance(name_of, str)
                and index.class_names.setdefault(label, name_of) != name_of):
            conflicts.add(label)
        index.add(str(image_id) if image_id is not None else s["key"], image, label,
                  "; ".join(problems))

    for member in walker:
        split = split_key(member.name)
        if split is None:
            continue
        key, ext = split
        if sample is None or sample["key"] != key:
            close(sample)
            sample = {"key": key, "image": None, "cls": None, "json": None, "problems": []}
        last = ext.rsplit(".", 1)[-1]
        if last in _IMAGE_EXTS and sample["image"] is None:
            sample["image"] = member
        elif last in ("cls", "json"):
            if member.size > _MAX_META:
                sample["problems"].append(f".{ext} member of {member.size} bytes is not a label")
                continue
            data = walker.read_data(member)
            if not member.complete:
                sample["problems"].append(f"shard {name} is truncated inside its .{ext} member")
            elif last == "cls":
                try:
                    sample["cls"] = int(data.decode().strip())
                except (UnicodeDecodeError, ValueError):
                    sample["problems"].append(f"bad .{ext} label {data[:40]!r}")
            else:
                try:
                    sample["json"] = json.loads(data)
                except ValueError as exc:
                    sample["problems"].append(f"bad .{ext} member: {exc}")
    close(sample)
    index.problem, index.end = walker.problem, walker.end
    if conflicts:
        index.class_names = {}  # one class number with two names: trust neither
    cut_in_image = bool(index.problems) and "inside this image" in index.problems[-1]
    if walker.problem and not cut_in_image:
        # The images after the cut are unknown; one entry stands for them, so the loss is skipped
        # and counted with its reason like a bad image, not only logged.
        reason = f"shard {name}: {walker.problem}; the images after this point are lost"
        index.add(f"{name}#truncated@{walker.pos}", Member("", 0, 0, False), None, reason)
    return index


def _json_value(doc: Any, key: str) -> Any:
    if isinstance(doc, dict):
        value = doc.get(key)
        return None if isinstance(value, bool) else value
    return None


class WebDatasetSource(StoreSource):
    """WebDataset shards: one ``.tar`` file, a folder of them (sorted, recursively), or the
    shards in a folder whose names start with a prefix (``s3://bucket/imagenet/train-``)."""

    def __init__(
        self,
        uri: str,
        image_size: int,
        *,
        label_field: str = "label",
        id_field: str | None = None,
        endpoint_url: str | None = None,
        limit: int | None = None,
        resize: int | None = None,
    ) -> None:
        self.image_size, self.resize = image_size, resize
        self.label_field, self.id_field = label_field, id_field
        root, listed = _list_shards(uri, endpoint_url)
        super().__init__(root, endpoint_url)
        objects = {o.key: o for o in listed}
        tars = [o for o in listed if o.key.lower().endswith(".tar")]
        if not tars:
            packed = [o.key for o in listed if o.key.lower().endswith((".tar.gz", ".tgz", ".tar.zst"))]
            if packed:
                raise ValueError(f"{uri}: compressed shards ({packed[0]}) cannot be read by byte range; "
                                 "repack them uncompressed (zfatlas dataset pack)")
            raise ValueError(f"no .tar shards at {uri}")
        started = time.perf_counter()
        self.shards: list[str] = []
        self.shard_sizes: list[int] = []
        self._starts: list[int] = []
        ids: list[str] = []
        offsets: list[int] = []
        sizes: list[int] = []
        raw: list[int | str | None] = []
        self._problems: dict[int, str] = {}
        self.shard_problems: dict[str, str] = {}
        names: list[dict[int, str]] = []
        streamed = 0
        with ThreadPoolExecutor(max_workers=min(_INDEX_THREADS, len(tars))) as pool:
            for start in range(0, len(tars), _INDEX_THREADS):
                if limit and len(ids) >= limit:
                    break  # the first `limit` images are known: later shards are not needed
                chunk = tars[start : start + _INDEX_THREADS]
                sidecars = [objects.get(t.key + SIDECAR_SUFFIX) for t in chunk]
                for tar, (index, was_streamed) in zip(
                    chunk, pool.map(self._index_shard, chunk, sidecars), strict=True
                ):
                    streamed += was_streamed
                    self.shards.append(tar.key)
                    self.shard_sizes.append(tar.size)
                    self._starts.append(len(ids))
                    if index.problem:
                        self.shard_problems[tar.key] = index.problem
                        log.warning("webdataset shard %s: %s", tar.key, index.problem)
                    base = len(ids)
                    for k, problem in enumerate(index.problems):
                        if problem:
                            self._problems[base + k] = problem
                    ids.extend(index.ids)
                    offsets.extend(index.offsets)
                    sizes.extend(index.sizes)
                    raw.extend(index.labels)
                    names.append(index.class_names)
        n = min(len(ids), limit) if limit else len(ids)
        if n == 0:
            raise ValueError(f"no image samples in the .tar shards at {uri}")
        self._ids = ids[:n]
        self._shard_of = np.searchsorted(np.array(self._starts, np.int64), np.arange(n), side="right") - 1
        self.offsets = np.array(offsets[:n], np.int64)
        self.sizes = np.array(sizes[:n], np.int64)
        self.labels, self._classes = _encode_labels(raw[:n], names)
        self._problems = {i: p for i, p in self._problems.items() if i < n}
        for i in np.flatnonzero(self.labels < 0):
            self._problems.setdefault(int(i), f"no label (.cls, or {label_field!r} in .json)")
        seen: dict[str, int] = {}
        for i, image_id in enumerate(self._ids):
            if image_id in seen:
                first, second = self.shards[self._shard_of[seen[image_id]]], self.shards[self._shard_of[i]]
                raise ValueError(f"image id {image_id!r} occurs twice (in {first} and {second}); set "
                                 "dataset.id_column to a unique .json field")
            seen[image_id] = i
        log.info("webdataset %s: %d images in %d shards (%d indexed by reading them), %d classes, %.1fs",
                 uri, n, len(self.shards), streamed, len(self._classes), time.perf_counter() - started)

    def _index_shard(self, tar: ObjectInfo, sidecar: ObjectInfo | None) -> tuple[ShardIndex, bool]:
        if sidecar is not None:
            index = read_sidecar(self.store, tar, sidecar, self.label_field, self.id_field)
            if index is not None:
                return index, False
        return stream_index(self.store, tar, self.label_field, self.id_field), True

    def __len__(self) -> int:
        return len(self._ids)

    def image_id(self, index: int) -> str:
        return self._ids[index]

    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    def _file(self, shard: int) -> Any:
        files: OrderedDict[int, Any] = self.__dict__.setdefault("_cache", OrderedDict())
        f = files.get(shard)
        if f is None:
            fs, base = self.store.arrow_filesystem()
            f = files[shard] = fs.open_input_file(f"{base}/{self.shards[shard]}")
            while len(files) > _OPEN_FILES:
                files.popitem(last=False)[1].close()
        files.move_to_end(shard)
        return f

    def fetch(self, indices: list[int]) -> list[Encoded]:
        found: dict[int, Encoded] = {}
        readable: dict[int, list[int]] = {}
        for i in indices:
            if i in self._problems:
                found[i] = Encoded(i, int(self.labels[i]), reason=self._problems[i])
            else:
                readable.setdefault(int(self._shard_of[i]), []).append(i)
        for shard, members in readable.items():
            members = sorted(set(members), key=lambda i: self.offsets[i])
            for span in _spans(members, self.offsets, self.sizes):
                start = int(self.offsets[span[0]])
                stop = int(self.offsets[span[-1]] + self.sizes[span[-1]])
                data = self._file(shard).read_at(stop - start, start)  # one ranged GET on S3
                for i in span:
                    lo = int(self.offsets[i]) - start
                    chunk = data[lo : lo + int(self.sizes[i])]
                    if len(chunk) < self.sizes[i]:
                        reason = f"shard {self.shards[shard]} is truncated inside this image"
                        found[i] = Encoded(i, int(self.labels[i]), reason=reason)
                    else:
                        found[i] = Encoded(i, int(self.labels[i]), bytes(chunk))
        return [found[i] for i in indices]

    def natural_shards(self, max_size: int) -> Sequence[range]:
        n = len(self)
        bounds = [*self._starts, n]
        units = [range(a, min(b, n)) for a, b in zip(bounds, bounds[1:], strict=False) if a < n]
        return pack_units(units, max_size)

    def fingerprint(self) -> str:
        shards = (f"{k}\t{s}" for k, s in zip(self.shards, self.shard_sizes, strict=True))
        sizes = [str(self.image_size)] + ([f"resize={self.resize}"] if self.resize else [])
        fields = f"{self.label_field}|{self.id_field}"
        return content_hash(["webdataset", *sizes, str(len(self)), fields, *shards, *self._ids])


def stream_index(
    store: Store, tar: ObjectInfo, label_field: str = "label", id_field: str | None = None
) -> ShardIndex:
    """Index a shard of ``store`` by reading it once: on S3 one stream of large reads (each a
    ranged GET), never a request per member; locally, headers only (the data is skipped by seeking)."""
    fs, base = store.arrow_filesystem()
    path = f"{base}/{tar.key}"
    if fs.type_name != "local":
        with fs.open_input_stream(path, compression=None, buffer_size=16 << 20) as stream:
            return index_tar(stream, tar.size, label_field, id_field, name=tar.key)
    with fs.open_input_file(path) as f:
        return index_tar(f, tar.size, label_field, id_field, seekable=True, name=tar.key)


def read_sidecar(
    store: Store, tar: ObjectInfo, sidecar: ObjectInfo, label_field: str = "label",
    id_field: str | None = None,
) -> ShardIndex | None:
    """The shard's index from its sidecar, or None when there is none usable for these fields (then
    the shard must be read). A shard shorter than its sidecar says is truncated: the samples past
    the cut keep their place and are skipped with the reason."""
    try:
        # ParquetFile, not pq.read_table: the dataset reader it goes through, called from worker
        # threads, can abort the interpreter at exit (pyarrow 26, seen with torch loaded).
        table = pq.ParquetFile(pa.BufferReader(store.get_bytes(sidecar.key))).read(use_threads=False)
        index, meta = ShardIndex.from_table(table)
    except (MissingKeyError, OSError, ValueError, KeyError, pa.ArrowException) as exc:
        log.warning("ignoring unreadable index %s: %s", sidecar.key, exc)
        return None
    if (meta.get("version"), meta.get("label_field"), meta.get("id_field")) != (
        SIDECAR_VERSION, label_field, id_field
    ):
        log.info("index %s was built for other fields; reading %s instead", sidecar.key, tar.key)
        return None
    if tar.size > index.size or not _layout_matches(store, tar, index):
        log.warning("index %s is stale (the shard changed); reading %s instead", sidecar.key, tar.key)
        return None
    if tar.size == index.size:
        return index
    reason = f"shard {tar.key} is truncated: {tar.size} of its {index.size} bytes are left"
    index.problem = reason
    for k, (offset, size) in enumerate(zip(index.offsets, index.sizes, strict=True)):
        if offset + size > tar.size:
            index.problems[k] = reason
    index.size = tar.size
    return index


def _layout_matches(store: Store, tar: ObjectInfo, index: ShardIndex) -> bool:
    """Whether the shard still has the layout its sidecar describes, checked with one ranged read:
    the header just before the last image still in the file gives that image's size, and the
    end-of-archive marker is where it was (so nothing was appended or moved). A cheap check that
    catches shards rewritten or grown in place even when tar's padding keeps their size."""
    within = [k for k, (o, n) in enumerate(zip(index.offsets, index.sizes, strict=True))
              if o >= 512 and o + n <= tar.size]
    if not within:
        return True
    last = within[-1]
    start = index.offsets[last] - 512
    marker = index.end >= 0 and index.end + 512 <= tar.size
    stop = index.end + 512 if marker else index.offsets[last]
    fs, base = store.arrow_filesystem()
    with fs.open_input_file(f"{base}/{tar.key}") as f:
        data = f.read_at(stop - start, start)
    try:
        header = tarfile.TarInfo.frombuf(data[:512], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return header.size == index.sizes[last] and (not marker or data[-512:] == bytes(512))


def write_sidecars(
    uri: str, endpoint_url: str | None = None, label_field: str = "label", id_field: str | None = None,
    *, force: bool = False,
) -> list[str]:
    """Write the index sidecar of every shard at ``uri`` that has none usable for these fields (all
    of them with ``force``), reading each such shard once; returns the sidecars' keys. Opening the
    dataset then reads one small file per shard instead of the shards."""
    from jobs.store import open_store

    root, listed = _list_shards(uri, endpoint_url)
    store = open_store(root, endpoint_url)
    objects = {o.key: o for o in listed}
    tars = [o for o in listed if o.key.lower().endswith(".tar")]
    if not tars:
        raise ValueError(f"no .tar shards at {uri}")

    def one(tar: ObjectInfo) -> str | None:
        sidecar = objects.get(tar.key + SIDECAR_SUFFIX)
        if not force and sidecar is not None and read_sidecar(store, tar, sidecar, label_field, id_field):
            return None
        index = stream_index(store, tar, label_field, id_field)
        store.put_bytes(tar.key + SIDECAR_SUFFIX, sidecar_bytes(index, label_field, id_field))
        return tar.key + SIDECAR_SUFFIX

    with ThreadPoolExecutor(max_workers=min(_INDEX_THREADS, len(tars))) as pool:
        return [k for k in pool.map(one, tars) if k is not None]


def sidecar_bytes(index: ShardIndex, label_field: str = "label", id_field: str | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(index.to_table(label_field, id_field), buf, compression="zstd")
    return buf.getvalue()


def _list_shards(uri: str, endpoint_url: str | None) -> tuple[str, list[ObjectInfo]]:
    """The store root and the objects there: one .tar file, a folder, or a folder's files whose
    names start with the URI's last part."""
    from jobs.store import open_store

    loc = parse_uri(uri)
    if loc.path.lower().endswith(".tar"):
        parent, name = loc.parent_and_name()
        listed = [o for o in open_store(str(parent), endpoint_url).list_objects(name)
                  if o.key in (name, name + SIDECAR_SUFFIX)]
        if not any(o.key == name for o in listed):
            raise ValueError(f"no such tar file: {uri}")
        return str(parent), listed
    listed = open_store(uri, endpoint_url).list_objects("")
    if listed or not loc.path.strip("/"):
        return uri, listed
    parent, name = loc.parent_and_name()
    # A prefix: the keys are relative to its folder, so `train-000.tar` not `000.tar`.
    return str(parent), open_store(str(parent), endpoint_url).list_objects(name)


def _spans(members: list[int], offsets: np.ndarray, sizes: np.ndarray) -> list[list[int]]:
    """Members (sorted by offset) grouped into runs read with one request each: a run continues
    while the gap to the next member is under ``_GAP`` and the run stays under ``_MAX_SPAN``."""
    spans: list[list[int]] = []
    start = end = -1
    for i in members:
        stop = int(offsets[i] + sizes[i])
        if spans and int(offsets[i]) - end <= _GAP and stop - start <= _MAX_SPAN:
            spans[-1].append(i)
        else:
            spans.append([i])
            start = int(offsets[i])
        end = stop
    return spans


def _encode_labels(
    raw: list[int | str | None], names: list[dict[int, str]]
) -> tuple[np.ndarray, list[str]]:
    """int64 labels (-1 for none) and class names: class numbers as they are, named by the shards'
    class names when those agree and name every class from 0 up (else "0".."max"); class names
    given as labels are numbered in sorted order."""
    present = [v for v in raw if v is not None]
    if all(isinstance(v, int) for v in present):
        labels = np.array([v if isinstance(v, int) and v >= 0 else -1 for v in raw], np.int64)
        top = int(labels.max()) if len(labels) else -1
        merged: dict[int, str] = {}
        agree = True
        for shard_names in names:
            for number, name in shard_names.items():
                agree = agree and merged.setdefault(number, name) == name
        merged = merged if agree else {}
        count = max(top + 1, max(merged, default=-1) + 1)
        if merged and all(i in merged for i in range(count)):
            return labels, [merged[i] for i in range(count)]
        return labels, [str(i) for i in range(top + 1)]
    classes = sorted({str(v) for v in present})
    index = {name: i for i, name in enumerate(classes)}
    return np.array([-1 if v is None else index[str(v)] for v in raw], np.int64), classes
