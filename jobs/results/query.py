"""Questions users ask an artifact store: which runs exist, what excites a channel, one layer out.

Atlas tables are read with ``pyarrow.dataset`` through :meth:`Store.arrow_filesystem`, the same
way on a local folder and on S3, with the filter and the column list pushed down to the Parquet
reader: a query for one channel reads the file footer and the column chunks of the row groups
whose statistics can hold that channel, not the whole table. (How much that saves depends on the
writer: ``features.parquet`` sorted by (layer, channel, rank) and cut into several row groups.)

Errors a user can fix (unknown run, layer or channel, a malformed run id) are :class:`QueryError`
with a one-line message; the CLI and the HTTP API turn them into exit code 2 and 404/400.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.atlas.tables import (
    FEATURES,
    FEATURES_SCHEMA,
    FORMAT,
    images_key,
    part_key,
    projections_key,
    summary_key,
)
from jobs.rendering.images import grid
from jobs.store import MissingKeyError, Store, check_key, committed_runs, read_manifest, run_prefix
from jobs.store.encoding import png_bytes

log = logging.getLogger(__name__)

ATLAS = "atlas"
# Columns of a channel tile: everything the viewer shows for a channel before it is opened.
TILE_COLUMNS = ["channel", "activation", "image_id", "label"]
ROW_COLUMNS = list(FEATURES_SCHEMA.names)
#: What a channel's images are: one per rank (patch, projection) and its 3x3 grids of them.
IMAGE_KINDS = ("patch", "projection")
GRID_KINDS = ("patch_grid", "projection_grid")
_V1_KEYS = {"patch": "patch_key", "projection": "projection_key",
            "patch_grid": "patch_grid_key", "projection_grid": "projection_grid_key"}
#: PNGs made from format-2 and -3 tables: zlib level 1 (fast; the API and `atlas export` make the same bytes).
PNG_LEVEL = 1


class QueryError(ValueError):
    """A question the store cannot answer as asked (the message says why, in one line)."""


class UnknownRunError(QueryError, LookupError):
    """No committed atlas run with that id in the store."""


class UnknownLayerError(QueryError, LookupError):
    """The atlas has no such layer."""


class UnknownChannelError(QueryError, LookupError):
    """The layer has no such channel."""


@dataclass(frozen=True)
class LayerInfo:
    """A layer of an atlas: its channel count, k (rows per channel) and summary image key."""

    name: str
    channels: int
    k: int
    summary_key: str | None


@dataclass(frozen=True)
class ExportResult:
    rows: int
    files: int
    destination: str


def model_arch(manifest: dict[str, Any]) -> str | None:
    """The architecture a run's model was (runs before 0.2 called it ``variant``)."""
    model = (manifest.get("spec") or {}).get("model") or {}
    return model.get("arch") or model.get("variant")


def run_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields of a manifest worth listing (no file list, no full spec)."""
    spec = manifest.get("spec") or {}
    model = spec.get("model") or {}
    dataset = spec.get("dataset") or {}
    return {
        "kind": manifest.get("kind"),
        "run_id": manifest.get("run_id"),
        "name": manifest.get("name"),
        "committed_at": manifest.get("committed_at"),
        "model_arch": model_arch(manifest),
        "model_checkpoint": model.get("checkpoint"),
        "model_fingerprint": manifest.get("model_fingerprint"),
        "dataset_format": dataset.get("format"),
        "dataset_fingerprint": manifest.get("dataset_fingerprint"),
        "images": manifest.get("images_scanned", manifest.get("images_total")),
        "layers": manifest.get("layers"),
        "k": manifest.get("k"),
        "files": len(manifest.get("files") or []),
    }


def list_runs(store: Store, kind: str | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
    """Summaries of the committed runs (oldest first), optionally of one kind / since a time."""
    if kind is not None:
        try:
            check_key(kind)
        except ValueError as exc:
            raise QueryError(f"bad kind {kind!r}: {exc}") from None
        if "/" in kind:
            raise QueryError(f"bad kind {kind!r}: must not contain '/'")
    return [run_summary(m) for m in committed_runs(store, kind, since)]


def _counts_from_statistics(data: ds.Dataset) -> dict[str, int] | None:
    counts: dict[str, int] = {}
    for fragment in data.get_fragments():
        for group in fragment.row_groups:
            stats = group.statistics
            layer, channel = stats.get("layer"), stats.get("channel")
            if layer is None or channel is None or layer["min"] != layer["max"]:
                return None
            counts[layer["min"]] = max(counts.get(layer["min"], 0), int(channel["max"]) + 1)
    return counts


class AtlasReader:
    """Read-only queries on one committed atlas run.

    ``filesystem`` overrides the store's pyarrow filesystem (a counting one in the
    tests); table reads go through it, images and the manifest through the store. Runs are
    immutable once committed, so a reader may be cached and shared between threads.
    """

    def __init__(self, store: Store, run_id: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        self.store = store
        self.run_id = run_id
        try:
            self.prefix = run_prefix(ATLAS, run_id)
        except ValueError as exc:
            raise QueryError(f"bad run id {run_id!r}: {exc}") from None
        try:
            self.manifest = read_manifest(store, ATLAS, run_id)
        except MissingKeyError:
            raise UnknownRunError(f"no committed atlas run {run_id!r} in {store.uri_of('')}") from None
        fs, base = store.arrow_filesystem()
        self.filesystem = filesystem or fs
        self.base = base.rstrip("/")
        if self.format > FORMAT:
            raise QueryError(
                f"atlas {run_id} is of format {self.format}; this version of zfatlas reads formats 1 to "
                f"{FORMAT}: upgrade zfatlas to read it"
            )
        self._tables: dict[str, _ChannelTable] = {}
        self._tables_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AtlasReader({self.store.uri_of(self.prefix)!r})"

    def path(self, relkey: str) -> str:
        """The path of a file of the run in :attr:`filesystem`."""
        return f"{self.base}/{self.prefix}/{check_key(relkey)}"

    @property
    def format(self) -> int:
        """The run's artifact layout (:data:`jobs.atlas.tables.FORMAT`); runs before 0.2 are 1."""
        return int(self.manifest.get("format") or 1)

    def table_key(self, kind: str, layer: str, channel: int) -> str:
        """The run-relative key of the ``kind`` ("images" or "projections") table file that holds
        ``channel`` of ``layer`` (formats 2 and 3): format 2 has one per layer, format 3 a part
        per few dozen channels, found by the channel ranges in the manifest's ``parts``."""
        if self.format == 2:
            return images_key(layer) if kind == "images" else projections_key(layer)
        ranges = self.manifest.get("parts", {}).get(layer, [])
        part = next((n for n, (lo, hi) in enumerate(ranges) if lo <= channel <= hi), None)
        if part is None:
            raise UnknownChannelError(f"channel {channel} of {layer} has no {kind} in atlas {self.run_id}")
        return part_key(kind, layer, part)

    def _layer_table(self, relkey: str) -> _ChannelTable:
        with self._tables_lock:
            table = self._tables.get(relkey)
            if table is None:
                table = self._tables[relkey] = _ChannelTable(self.filesystem, self.path(relkey), relkey)
            return table

    @functools.cached_property
    def features(self) -> ds.Dataset:
        """``features.parquet`` as a dataset. Its footer (schema, row-group statistics) is read
        once here and kept, so each later query reads only the column chunks it needs."""
        fmt = ds.ParquetFileFormat()
        # One fragment made by hand rather than ds.dataset(path): discovery would read the footer
        # a second time just to learn the schema.
        fragment = fmt.make_fragment(self.path(FEATURES), self.filesystem)
        try:
            fragment.ensure_complete_metadata()
        except FileNotFoundError:
            raise QueryError(f"atlas {self.run_id} has no {FEATURES}") from None
        return ds.FileSystemDataset([fragment], fragment.physical_schema, fmt, self.filesystem)

    def scan(self, expression: ds.Expression | None, columns: list[str]) -> pa.Table:
        """Rows of ``features.parquet`` matching ``expression`` (pushed down), only ``columns``."""
        return self.features.to_table(columns=columns, filter=expression)

    @property
    def k(self) -> int:
        return int(self.manifest.get("k") or 9)

    @functools.cached_property
    def _channel_counts(self) -> dict[str, int]:
        """Channels per layer: from the row-group statistics when every row group holds one layer
        (no data read), else from a scan of the ``layer`` and ``channel`` columns."""
        counts = _counts_from_statistics(self.features)
        if counts is not None:
            return counts
        top = self.scan(ds.field("rank") == 0, ["layer", "channel"])
        agg = top.group_by("layer").aggregate([("channel", "max")])
        return {layer: int(m) + 1 for layer, m in zip(agg["layer"].to_pylist(),
                                                        agg["channel_max"].to_pylist(), strict=True)}

    def layer_names(self) -> list[str]:
        """The atlas's layers in the job's order (from the manifest: no table read)."""
        return list(self.manifest.get("layers") or sorted(self._channel_counts))

    def _check_layer(self, layer: str) -> None:
        names = self.layer_names()
        if layer not in names:
            known = ", ".join(names)
            raise UnknownLayerError(f"atlas {self.run_id} has no layer {layer!r} (it has: {known})")

    def layers(self) -> list[LayerInfo]:
        """The atlas's layers in the job's order, with their channel counts."""
        summaries = self.manifest.get("summaries") or {}
        return [
            LayerInfo(name, self._channel_counts.get(name, 0), self.k, summaries.get(name))
            for name in self.layer_names()
        ]

    def layer(self, name: str) -> LayerInfo:
        self._check_layer(name)
        return next(info for info in self.layers() if info.name == name)

    def channel(self, layer: str, channel: int, columns: list[str] | None = None) -> pa.Table:
        """The k rows of one channel, strongest first (one pushed-down query, no other read)."""
        self._check_layer(layer)
        wanted = list(columns or self.features.schema.names)
        expr = (ds.field("layer") == layer) & (ds.field("channel") == channel)
        table = self.scan(expr, wanted if "rank" in wanted else [*wanted, "rank"])
        if table.num_rows == 0:
            count = self._channel_counts.get(layer, 0)
            raise UnknownChannelError(
                f"layer {layer} of atlas {self.run_id} has channels 0..{count - 1}, not {channel}"
            )
        return table.sort_by("rank").select(wanted)

    def tiles(self, layer: str, offset: int = 0, limit: int = 100) -> pa.Table:
        """One row per channel (its strongest activation) for channels offset..offset+limit-1."""
        info = self.layer(layer)
        if offset < 0 or limit < 1:
            raise QueryError(f"offset must be >= 0 and limit >= 1 (got {offset}, {limit})")
        stop = min(offset + limit, info.channels)
        if offset >= stop:
            schema = self.features.schema
            return schema.empty_table().select(TILE_COLUMNS)
        expr = (
            (ds.field("layer") == layer)
            & (ds.field("rank") == 0)
            & (ds.field("channel") >= offset)
            & (ds.field("channel") < stop)
        )
        return self.scan(expr, TILE_COLUMNS).sort_by("channel")

    def layer_rows(self, layers: list[str], columns: list[str]) -> pa.Table:
        """Every row of the given layers (e.g. for diffs), only ``columns``."""
        for name in layers:
            self._check_layer(name)
        return self.scan(ds.field("layer").isin(layers), columns)

    def projections(self, layer: str, channel: int) -> pa.Table:
        """The raw float32 projections of one channel (``PROJECTIONS_SCHEMA`` rows), by rank."""
        rows = self.channel(layer, channel, ["rank", "dead"] if self.format >= 2 else ["rank"])
        if self.format >= 2:
            if rows.column("dead")[0].as_py():
                raise QueryError(f"channel {channel} of {layer} never fired: it has no projections")
            table = self._layer_table(self.table_key("projections", layer, channel))
            return table.channel(channel).sort_by("rank")
        folder = self.path(f"projections/{layer}")
        try:
            data = ds.dataset(folder, filesystem=self.filesystem, format="parquet")
        except (FileNotFoundError, OSError) as exc:
            raise QueryError(f"atlas {self.run_id} has no raw projections for {layer}: {exc}") from None
        expr = (ds.field("layer") == layer) & (ds.field("channel") == channel)
        return data.to_table(filter=expr).sort_by("rank")

    def png(self, layer: str, channel: int, kind: str, rank: int | None = None) -> bytes:
        """A PNG of one channel: ``kind`` "patch" or "projection" with a ``rank``, or "patch_grid"
        or "projection_grid" (its top-k, 3 to a row). Format 1 reads the run's PNG file; formats 2
        and 3 draw it from the layer's images table (one row group read, kept for the next
        request)."""
        if kind not in IMAGE_KINDS + GRID_KINDS:
            raise QueryError(f"no image kind {kind!r}; one of {', '.join(IMAGE_KINDS + GRID_KINDS)}")
        if (kind in IMAGE_KINDS) != (rank is not None):
            per = "per rank" if kind in IMAGE_KINDS else "one per channel"
            raise QueryError(f"{kind} images are {per}")
        if self.format == 1:
            rows = self.channel(layer, channel).to_pylist()
            row = rows[0] if rank is None else next((r for r in rows if r["rank"] == rank), None)
            key = row and row[_V1_KEYS[kind]]
            if not key:
                raise UnknownChannelError(f"channel {channel} of {layer} has no {kind} image of rank {rank}")
            return self.store.get_bytes(key)
        rows = self.channel(layer, channel, ["rank", "dead"])
        if rows.column("dead")[0].as_py():
            raise UnknownChannelError(f"channel {channel} of {layer} never fired: it has no images")
        pixels = self.pixels(layer, channel, kind.removesuffix("_grid"))
        if rank is not None:
            if rank not in pixels:
                raise UnknownChannelError(f"channel {channel} of {layer} has no rank {rank}")
            return png_bytes(pixels[rank], PNG_LEVEL)
        return png_bytes(grid([pixels[r] for r in sorted(pixels)]), PNG_LEVEL)

    def pixels(self, layer: str, channel: int, kind: str) -> dict[int, np.ndarray]:
        """Formats 2 and 3: one channel's ``kind`` ("patch" or "projection") images by rank, uint8
        (h, w, 3)."""
        table = self._layer_table(self.table_key("images", layer, channel)).channel(channel)
        out = {}
        for rank, h, w, data in zip(*(table.column(c).to_pylist() for c in ("rank", "height", "width", kind)),
                                    strict=True):
            out[int(rank)] = np.frombuffer(data, np.uint8).reshape(h, w, 3)
        return out

    def export_layer(self, layer: str, out: Store, *, threads: int = 8) -> ExportResult:
        """Copy one layer into ``out`` as a self-contained folder of plain files:
        ``features.parquet`` (the layer's rows, with ``*_key`` columns naming the PNGs relative to
        ``out``), ``images/<layer>/<channel>/{patch,projection}-<rank>.png`` and the two grids,
        ``projections/<layer>/`` (raw values, Parquet) and ``summary/<layer>.png``. The PNGs are
        the very bytes the API serves."""
        info = self.layer(layer)
        table = self.scan(ds.field("layer") == layer, self.features.schema.names)
        table = table.sort_by([("channel", "ascending"), ("rank", "ascending")])
        strip = f"{self.prefix}/"
        if self.format == 1:
            for name in _V1_KEYS.values():
                column = table.column(name)
                inside = pc.starts_with(column, strip)
                rel = pc.if_else(inside, pc.utf8_slice_codeunits(column, len(strip)), column)
                table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), rel)
        else:
            table = _with_export_keys(table, layer)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        out.put_bytes(FEATURES, buf.getvalue())

        jobs: list[tuple[str, Any]] = []
        if self.format == 1:
            keys = [o.key for o in self.store.list_objects(f"{self.prefix}/images/{layer}/")]
            keys += [o.key for o in self.store.list_objects(f"{self.prefix}/projections/{layer}/")]
            jobs = [(k[len(strip):], functools.partial(self.store.get_bytes, k)) for k in keys]
        else:
            live = sorted({r["channel"] for r in table.to_pylist() if not r["dead"]})
            for c in live:
                base = f"images/{layer}/{c:04d}"
                for kind in GRID_KINDS:
                    jobs.append((f"{base}/{kind.replace('_', '-')}.png",
                                 functools.partial(self.png, layer, c, kind)))
                for rank in self.pixels(layer, c, "patch"):
                    for kind in IMAGE_KINDS:
                        png = functools.partial(self.png, layer, c, kind, rank)
                        jobs.append((f"{base}/{kind}-{rank}.png", png))
            if self.format == 2:
                raw = {f"projections/{layer}/part-00000.parquet": projections_key(layer)}
            else:  # the same names as in the run
                raw = {part_key("projections", layer, n): part_key("projections", layer, n)
                       for n in range(len(self.manifest.get("parts", {}).get(layer, [])))}
            for name, relkey in raw.items():
                jobs.append((name, functools.partial(self.store.get_bytes, f"{self.prefix}/{relkey}")))
        if info.summary_key and self.store.exists(info.summary_key):
            jobs.append((summary_key(layer), functools.partial(self.store.get_bytes, info.summary_key)))

        def copy(job: tuple[str, Any]) -> None:
            out.put_bytes(job[0], job[1]())

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(copy, jobs))
        log.info("exported %s of atlas %s: %d rows, %d files to %s", layer, self.run_id, table.num_rows,
                 len(jobs) + 1, out.uri_of(""))
        return ExportResult(rows=table.num_rows, files=len(jobs) + 1, destination=out.uri_of(""))


def _with_export_keys(table: pa.Table, layer: str) -> pa.Table:
    """Format-2 rows with the PNG file keys an export writes (empty for dead channels)."""
    channels = table.column("channel").to_pylist()
    ranks = table.column("rank").to_pylist()
    dead = table.column("dead").to_pylist()

    def key(c: int, name: str, d: bool) -> str:
        return "" if d else f"images/{layer}/{c:04d}/{name}.png"

    columns = {
        "patch_key": [key(c, f"patch-{r}", d) for c, r, d in zip(channels, ranks, dead, strict=True)],
        "projection_key": [
            key(c, f"projection-{r}", d) for c, r, d in zip(channels, ranks, dead, strict=True)
        ],
        "patch_grid_key": [key(c, "patch-grid", d) for c, d in zip(channels, dead, strict=True)],
        "projection_grid_key": [key(c, "projection-grid", d) for c, d in zip(channels, dead, strict=True)],
    }
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values, pa.string()))
    return table


class _ChannelTable:
    """One format-2 or -3 table file of a layer (rows sorted by channel, a row group per few channels): the
    rows of a channel, reading only its row group, the last few groups kept decoded."""

    _KEEP = 8

    def __init__(self, filesystem: pafs.FileSystem, path: str, relkey: str) -> None:
        try:
            self.file = pq.ParquetFile(filesystem.open_input_file(path))
        except (FileNotFoundError, OSError) as exc:
            raise QueryError(f"{relkey} cannot be read: {exc}") from None
        meta, self.groups = self.file.metadata, []
        column = self.file.schema_arrow.get_field_index("channel")
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics
            self.groups.append((int(stats.min), int(stats.max)))
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._lock = threading.Lock()

    def channel(self, channel: int) -> pa.Table:
        group = next((g for g, (lo, hi) in enumerate(self.groups) if lo <= channel <= hi), None)
        if group is None:
            raise UnknownChannelError(f"channel {channel} has no images")
        with self._lock:
            table = self._cache.get(group)
            if table is None:
                table = self._cache[group] = self.file.read_row_group(group)
                while len(self._cache) > self._KEEP:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(group)
        return table.filter(pc.equal(table.column("channel"), channel))
