"""Each layer's image tables (images, raw projections), written in channel order while the
projection groups come back from the workers in whatever order they finish.

A group's rows become one row group of each table, so a one-channel read is one row group; groups
are written in their order within the layer (a group that arrives early waits in memory for the
ones before it), so the same spec gives byte-identical files whatever the workers did. The files
are written to a local scratch folder and uploaded when the layer is complete, all layers at once
(:func:`upload`): an atlas is a handful of objects however many channels it has.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.atlas.tables import IMAGES_SCHEMA, PROJECTIONS_SCHEMA, images_key, projections_key
from jobs.store import RunWriter
from jobs.store.encoding import conform

log = logging.getLogger(__name__)

# name, schema, key, compression. The raw float projections are not compressed: zstd made them
# 7% smaller (111 -> 103 MB for zfnet-small's 3,168 items) at twice the write time (0.25 vs
# 0.13 s); the pixels compress by a fifth (56 -> 44 MB) for 0.07 s.
_TABLES = (("images", IMAGES_SCHEMA, images_key, "zstd"),
           ("projections", PROJECTIONS_SCHEMA, projections_key, "none"))


class LayerTables:
    """The two tables of one layer, in ``folder``; :meth:`add` a group's result by its part
    number (0, 1, 2, ... within the layer), :meth:`close` when all ``parts`` are in."""

    def __init__(self, layer: str, parts: Iterable[int], folder: str) -> None:
        self.layer = layer
        self.expected = sorted(parts)
        self.paths = {name: os.path.join(folder, f"{layer}.{name}.parquet") for name, *_ in _TABLES}
        # Dictionary encoding only for the layer name: tried on the pixel and projection columns
        # it finds nothing to share and took twice as long as the rest of the write (0.57 of
        # 0.89 s for zfnet-small's 3,168 items). Statistics only where a reader looks: the
        # channel range of each row group is how a one-channel read finds its group.
        self._writers = {
            name: pq.ParquetWriter(self.paths[name], schema, compression=codec, use_dictionary=["layer"],
                                   write_statistics=["layer", "channel", "rank"])
            for name, schema, _, codec in _TABLES
        }
        self._waiting: dict[int, dict[str, pa.Table]] = {}
        self._next = 0  # index into self.expected of the next part to write

    def add(self, part: int, tables: dict[str, pa.Table]) -> None:
        self._waiting[part] = tables
        while self._next < len(self.expected) and self.expected[self._next] in self._waiting:
            ready = self._waiting.pop(self.expected[self._next])
            for name, schema, *_ in _TABLES:
                if ready[name].num_rows:
                    self._writers[name].write_table(conform(ready[name], schema))  # one row group
            self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.expected)

    def close(self) -> dict[str, str]:
        """Finish the files; returns {run-relative key: local path}."""
        if not self.complete:
            missing = self.expected[self._next :]
            raise RuntimeError(f"layer {self.layer}: projection groups {missing[:5]} never came back")
        for writer in self._writers.values():
            writer.close()
        return {key(self.layer): self.paths[name] for name, _, key, _ in _TABLES}


def upload(run: RunWriter, files: dict[str, str], threads: int = 8) -> dict[str, Any]:
    """Move every {relkey: local path} into the run, ``threads`` at a time (S3 uploads overlap
    their round trips; a local store on the scratch folder's disk renames each file instead of
    copying it: 0.15 s of zfnet-small's 157 MB). Returns {relkey: bytes}."""
    def put(item: tuple[str, str]) -> tuple[str, int]:
        relkey, path = item
        size = os.path.getsize(path)
        run.move_file(relkey, path)
        return relkey, size

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        return dict(pool.map(put, sorted(files.items())))
