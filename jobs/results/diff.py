"""Atlas diff: how the channels of one model changed between two atlases of the same architecture.

Per (layer, channel): how many of the top-k images the two atlases share, the change in the top
activation, and whether the channel died (activates in A, never in B), was born (the reverse),
stayed dead or stayed alive. Rows are ranked most-changed first: deaths, then births, then live
channels by fewest shared images and largest relative change; dead-in-both last. Nightly atlases
of a model diffed against the previous night's are the drift report users read each morning.

The table has the schema :data:`DIFF_SCHEMA` (documented in docs/schemas.md, "atlas diff").
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.results.query import AtlasReader, QueryError, model_arch
from jobs.store import Store, check_key

log = logging.getLogger(__name__)

DIED, BORN, ALIVE, DEAD = "died", "born", "alive", "dead"
STATUSES = (DIED, BORN, ALIVE, DEAD)

DIFF_SCHEMA = pa.schema(
    [
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("shared_topk", pa.int32(), nullable=False),
        pa.field("k", pa.int32(), nullable=False),
        pa.field("top_activation_a", pa.float32(), nullable=False),
        pa.field("top_activation_b", pa.float32(), nullable=False),
        pa.field("delta_activation", pa.float32(), nullable=False),
        pa.field("relative_change", pa.float32(), nullable=True),
        pa.field("top_image_a", pa.string(), nullable=True),
        pa.field("top_image_b", pa.string(), nullable=True),
        pa.field("projection_grid_key_a", pa.string(), nullable=True),
        pa.field("projection_grid_key_b", pa.string(), nullable=True),
        pa.field("patch_grid_key_a", pa.string(), nullable=True),
        pa.field("patch_grid_key_b", pa.string(), nullable=True),
    ]
)

_COLUMNS = ["layer", "channel", "rank", "activation", "image_id", "projection_grid_key", "patch_grid_key"]


class DiffError(QueryError):
    """The two atlases cannot be compared (different architectures, no layer in common)."""


@dataclass
class AtlasDiff:
    run_a: str
    run_b: str
    layers: list[str]
    table: pa.Table  # DIFF_SCHEMA, ranked
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Channels per status."""
        statuses = self.table.column("status").to_pylist()
        return {s: statuses.count(s) for s in STATUSES}


@dataclass
class _Channel:
    top: float = 0.0
    images: list[tuple[int, str]] = field(default_factory=list)  # (rank, image id)
    projection_grid_key: str | None = None
    patch_grid_key: str | None = None


def _channels(reader: AtlasReader, layers: list[str]) -> dict[tuple[str, int], _Channel]:
    out: dict[tuple[str, int], _Channel] = {}
    # Atlases before 0.2 name their grid PNG files in features.parquet; later ones keep grids in
    # tables (the API draws them), so the key columns of the diff are empty for them.
    columns = [c for c in _COLUMNS if c in reader.features.schema.names]
    for row in reader.layer_rows(layers, columns).to_pylist():
        ch = out.setdefault((row["layer"], row["channel"]), _Channel())
        ch.images.append((row["rank"], row["image_id"]))
        if row["rank"] == 0:
            ch.top = float(row["activation"])
            ch.projection_grid_key = row.get("projection_grid_key") or None
            ch.patch_grid_key = row.get("patch_grid_key") or None
    return out


def _variant(reader: AtlasReader) -> str | None:
    return model_arch(reader.manifest)


def _comparable_layers(
    a: AtlasReader, b: AtlasReader, layers: list[str] | None
) -> tuple[list[str], list[str]]:
    warnings = []
    if _variant(a) != _variant(b):
        raise DiffError(
            f"atlases {a.run_id} ({_variant(a)}) and {b.run_id} ({_variant(b)}) are of different "
            "architectures"
        )
    common = [name for name in a.layer_names() if name in b.layer_names()]
    if layers:
        for name in layers:
            if name not in common:
                raise DiffError(f"layer {name!r} is not in both atlases (common layers: {', '.join(common)})")
        common = [name for name in common if name in layers]
    else:
        only = sorted(set(a.layer_names()) ^ set(b.layer_names()))
        if only:
            warnings.append(f"layers in only one atlas are not compared: {', '.join(only)}")
    if not common:
        raise DiffError(f"atlases {a.run_id} and {b.run_id} have no layer in common")
    counts_a = {i.name: i.channels for i in a.layers()}
    counts_b = {i.name: i.channels for i in b.layers()}
    for name in common:
        if counts_a[name] != counts_b[name]:
            raise DiffError(
                f"layer {name} has {counts_a[name]} channels in {a.run_id} but {counts_b[name]} in "
                f"{b.run_id}: not the same architecture"
            )
    if a.manifest.get("dataset_fingerprint") != b.manifest.get("dataset_fingerprint"):
        warnings.append("the atlases were built on different datasets: shared top-k counts compare image "
                        "ids across datasets")
    return common, warnings


def _status(alive_a: bool, alive_b: bool) -> str:
    if alive_a:
        return ALIVE if alive_b else DIED
    return BORN if alive_b else DEAD


def _sort_key(row: dict[str, Any]) -> tuple:
    change = row["relative_change"]
    return (
        STATUSES.index(row["status"]),
        row["shared_topk"],
        -(abs(change) if change is not None else abs(row["delta_activation"])),
        row["layer_order"],
        row["channel"],
    )


def diff_atlases(
    a: AtlasReader, b: AtlasReader, layers: list[str] | None = None, *, dead_below: float = 0.0
) -> AtlasDiff:
    """Compare atlas ``a`` (before) with ``b`` (after). A channel is dead in an atlas when its top
    activation is at most ``dead_below`` (ReLU outputs: it never fired on the dataset)."""
    common, warnings = _comparable_layers(a, b, layers)
    ch_a, ch_b = _channels(a, common), _channels(b, common)
    k = min(a.k, b.k)
    if a.k != b.k:
        warnings.append(f"k differs ({a.k} vs {b.k}): shared images are counted among the top {k}")
    rows = []
    for key in sorted(set(ch_a) | set(ch_b), key=lambda lc: (common.index(lc[0]), lc[1])):
        ca, cb = ch_a.get(key, _Channel()), ch_b.get(key, _Channel())
        top_a = {image for rank, image in ca.images if rank < k}
        top_b = {image for rank, image in cb.images if rank < k}
        delta = cb.top - ca.top
        relative = delta / abs(ca.top) if ca.top != 0 and math.isfinite(ca.top) else None
        rows.append({
            "layer": key[0], "channel": key[1], "layer_order": common.index(key[0]),
            "status": _status(ca.top > dead_below, cb.top > dead_below),
            "shared_topk": len(top_a & top_b), "k": k,
            "top_activation_a": ca.top, "top_activation_b": cb.top, "delta_activation": delta,
            "relative_change": relative,
            "top_image_a": next((img for rank, img in ca.images if rank == 0), None),
            "top_image_b": next((img for rank, img in cb.images if rank == 0), None),
            "projection_grid_key_a": ca.projection_grid_key, "projection_grid_key_b": cb.projection_grid_key,
            "patch_grid_key_a": ca.patch_grid_key, "patch_grid_key_b": cb.patch_grid_key,
        })
    rows.sort(key=_sort_key)
    for i, row in enumerate(rows, start=1):
        row["rank"] = i
        del row["layer_order"]
    table = pa.Table.from_pylist(rows, schema=DIFF_SCHEMA)
    for message in warnings:
        log.warning("diff %s -> %s: %s", a.run_id, b.run_id, message)
    return AtlasDiff(a.run_id, b.run_id, common, table, warnings)


def diff_to_parquet(diff: AtlasDiff) -> bytes:
    """The diff table as Parquet bytes, with the two run ids in the file's key-value metadata."""
    meta = {b"zfatlas.diff.run_a": diff.run_a.encode(), b"zfatlas.diff.run_b": diff.run_b.encode()}
    table = diff.table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_diff(diff: AtlasDiff, store: Store, key: str) -> str:
    """Write the diff as Parquet at ``key`` of ``store``; returns where it went."""
    check_key(key)
    if not key.endswith(".parquet"):
        raise QueryError(f"diff key {key!r} must end in .parquet")
    store.put_bytes(key, diff_to_parquet(diff))
    return store.uri_of(key)
