"""Parquet files of encoded images and labels, on a local folder or S3."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.datasets.base import Encoded, StoreSource, content_hash, pack_units
from jobs.uris import parse_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _RowGroup:
    file: int
    group: int
    start: int  # global index of its first row
    rows: int


class ParquetSource(StoreSource):
    """A Parquet file, or a folder of them (sorted, recursively), with an encoded-image column
    (binary, or a struct with a ``bytes`` field as written by Hugging Face datasets) and a label
    column (integers, or strings mapped to their sorted order).

    Hugging Face's layout (``image: struct<bytes, path>``, an integer ``label``) is read as it is:
    the class names of a ``ClassLabel`` label come from the ``huggingface`` schema metadata, and a
    row whose image was stored by path only is skipped with that reason. Files written by
    :func:`jobs.datasets.pack.pack` name their id column in the ``zfatlas`` metadata, which is the
    default ``id_column``.

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
        resize: int | None = None,
    ) -> None:
        loc = parse_uri(uri)
        single = loc.path.lower().endswith((".parquet", ".parq", ".pq"))
        # A single file: the store is its folder, so the id's file part is just its name.
        root = str(loc.parent_and_name()[0]) if single else uri
        super().__init__(root, endpoint_url)
        self.image_size, self.resize = image_size, resize
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
        meta = _metadata(self._open(0).schema_arrow)
        if id_column is None:
            # Written by `zfatlas dataset pack`: the column holding the images' original ids.
            id_column = self.id_column = meta.get("zfatlas", {}).get("id_column")
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
        names = _class_label_names(meta, label_column)
        if names is not None and len(names) >= len(self._classes):
            self._classes = names  # a Hugging Face ClassLabel: its names, in label order
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

    def _group_images(self, g: int) -> tuple[pa.Array, pa.Array | None]:
        """A row group's image bytes, and the ``path`` field of a Hugging Face image struct."""
        cache: OrderedDict[int, tuple[pa.Array, pa.Array | None]] = self.__dict__.setdefault(
            "_cache", {"files": {}, "groups": OrderedDict()}
        )["groups"]
        if g in cache:
            cache.move_to_end(g)
            return cache[g]
        group = self.groups[g]
        column = self._open(group.file).read_row_group(group.group, columns=[self.image_column]).column(0)
        column = column.combine_chunks()
        path = None
        if pa.types.is_struct(column.type):
            names = [column.type.field(f).name for f in range(column.type.num_fields)]
            path = column.field("path") if "path" in names else None
            column = column.field("bytes")
        cache[g] = (column, path)
        while len(cache) > self._CACHE_GROUPS:
            cache.popitem(last=False)
        return cache[g]

    def __len__(self) -> int:
        return len(self._ids)

    def image_id(self, index: int) -> str:
        return self._ids[index]

    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    def fetch(self, indices: list[int]) -> list[Encoded]:
        out = []
        for i in indices:
            label = int(self.labels[i])
            g = int(np.searchsorted(self._starts, i, side="right") - 1)
            data, path = self._group_images(g)
            row = i - self.groups[g].start
            value = data[row].as_py()
            if label < 0:
                # Skipped, but with its bytes: the pack tool copies unlabelled images too.
                out.append(Encoded(i, label, value, f"missing label in column {self.label_column!r}"))
            elif value is not None:
                out.append(Encoded(i, label, value))
            elif path is not None and path[row].as_py():
                # Hugging Face keeps only the path of images it was given as files it did not embed.
                reason = f"image not embedded in column {self.image_column!r} (only its path {path[row]})"
                out.append(Encoded(i, label, reason=reason))
            else:
                out.append(Encoded(i, label, reason=f"null in column {self.image_column!r}"))
        return out

    def natural_shards(self, max_size: int) -> Sequence[range]:
        n = len(self)
        groups = [range(g.start, min(g.start + g.rows, n)) for g in self.groups if g.start < n]
        return pack_units(groups, max_size)

    def fingerprint(self) -> str:
        meta = json.dumps([self.files, self.file_sizes, [g.rows for g in self.groups]])
        columns = f"{self.image_column}|{self.label_column}|{self.id_column}"
        sizes = [str(self.image_size)] + ([f"resize={self.resize}"] if self.resize else [])
        return content_hash(["parquet", *sizes, str(len(self)), columns, meta, *self._ids])


def _metadata(schema: pa.Schema) -> dict[str, Any]:
    """The JSON entries of a Parquet schema's metadata that readers use: ``huggingface`` (the
    features Hugging Face datasets writes) and ``zfatlas`` (written by the pack tool)."""
    out: dict[str, Any] = {}
    for key in ("huggingface", "zfatlas"):
        raw = (schema.metadata or {}).get(key.encode())
        if raw:
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            if isinstance(value, dict):
                out[key] = value
    return out


def _class_label_names(meta: dict[str, Any], column: str) -> list[str] | None:
    """The class names of a Hugging Face ``ClassLabel`` column, if the label column is one."""
    feature = meta.get("huggingface", {}).get("info", {}).get("features", {}).get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        names = feature.get("names")
        if isinstance(names, list) and names:
            return [str(n) for n in names]
    return None


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
