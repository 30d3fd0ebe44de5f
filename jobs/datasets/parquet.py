"""Parquet files of encoded images and labels, on a local folder or S3."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.datasets.base import Batch, StoreSource, content_hash
from jobs.datasets.decode import decode_or_reason
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
                    image, reason = decode_or_reason(data, self.image_size, self.resize)
                    if image is not None:
                        rows.append((i, image, label))
                        continue
            log.warning("skipping unreadable image %s: %s", self._ids[i], reason)
            skipped.append((self._ids[i], reason))
        return self._batch(rows, skipped)

    def fingerprint(self) -> str:
        meta = json.dumps([self.files, self.file_sizes, [g.rows for g in self.groups]])
        columns = f"{self.image_column}|{self.label_column}|{self.id_column}"
        sizes = [str(self.image_size)] + ([f"resize={self.resize}"] if self.resize else [])
        return content_hash(["parquet", *sizes, str(len(self)), columns, meta, *self._ids])


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
