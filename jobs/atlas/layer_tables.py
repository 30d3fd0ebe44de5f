"""The parts of the layers' image tables (images, raw projections), each written by the worker
that projected it (format 3), and the driver's upload of the rest of the run.

A part is up to :data:`jobs.atlas.tables.GROUPS_PER_PART` consecutive projection groups of one
layer. Each group becomes one row group of the part's two tables, so a one-channel read is one
row group; the parts are fixed by the spec, so the same spec gives byte-identical files whatever
the workers did, and a part redone after its worker died replaces the same two keys. Nothing is
visible before the manifest, so a part is written once, straight into the run: on a local store
on the scratch folder's disk a rename, on S3 an upload (the two tables at once). A worker on
another machine than a local store's sends the part's bytes to the driver instead.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.atlas.tables import IMAGES_SCHEMA, PROJECTIONS_SCHEMA, part_key
from jobs.store import RunWriter
from jobs.store.encoding import conform

log = logging.getLogger(__name__)

# name, schema, compression. The raw float projections are not compressed: zstd made them 7%
# smaller (111 -> 103 MB for zfnet-small's 3,168 items) at twice the write time (0.25 vs 0.13 s);
# the pixels compress by a fifth (56 -> 44 MB) for 0.07 s.
_TABLES = (("images", IMAGES_SCHEMA, "zstd"), ("projections", PROJECTIONS_SCHEMA, "none"))


def part_files(layer: str, part: int, groups: list[dict[str, pa.Table]], folder: str) -> dict[str, str]:
    """Write a part's two tables in ``folder``, one row group per group's tables (in order, empty
    ones skipped). Returns {run-relative key: local path}."""
    files = {}
    for name, schema, codec in _TABLES:
        path = os.path.join(folder, f"{name}.parquet")
        # Dictionary encoding only for the layer name: on the pixel and projection columns it
        # finds nothing to share and took twice as long as the rest of the write. Statistics only
        # where a reader looks: a row group's channel range is how a one-channel read finds it.
        with pq.ParquetWriter(path, schema, compression=codec, use_dictionary=["layer"],
                              write_statistics=["layer", "channel", "rank"]) as writer:
            for tables in groups:
                if tables[name].num_rows:
                    writer.write_table(conform(tables[name], schema))  # one row group
        files[part_key(name, layer, part)] = path
    return files


def upload(run: RunWriter, files: dict[str, str], threads: int = 8) -> dict[str, int]:
    """Move every {relkey: local path} into the run, ``threads`` at a time (S3 uploads overlap
    their round trips; a local store on the scratch folder's disk renames each file instead of
    copying it). Returns {relkey: bytes}."""
    def put(item: tuple[str, str]) -> tuple[str, int]:
        relkey, path = item
        size = os.path.getsize(path)
        run.move_file(relkey, path)
        return relkey, size

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        return dict(pool.map(put, sorted(files.items())))
