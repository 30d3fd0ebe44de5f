"""The atlas job on Ray: top-k images of every channel, projected to pixels with the deconvnet.

Two phases on the same worker actors (:class:`jobs.atlas.scanner.AtlasScanner`, one per GPU when
the cluster has GPUs):

1. scan: each actor scans shards of the dataset with one forward pass per batch, tracking every
   requested layer's top-k with :class:`zfcore.topk.TopKTracker`; the driver merges shard
   trackers as they arrive (exact: merging is order-independent).
2. project: the winning (image, layer, channel, position) items, in groups of a few whole
   channels (a few groups per call), are projected in batches from the images the actor kept
   from its scan (or read again); the actor returns each group's feature rows and its rows of
   the layer's image and projection tables, which the driver writes in channel order.

A shard or a group whose actor dies is retried on the remaining actors (:func:`run_on_actors`),
so the atlas is the same as a fault-free run. Nothing is visible until the runner commits the
manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from jobs.atlas.layer_tables import LayerTables, upload
from jobs.atlas.scanner import AtlasScanner, projection_groups
from jobs.atlas.spec import AtlasSpec
from jobs.atlas.tables import (
    CHANNELS_PER_ROW_GROUP,
    FEATURES,
    FEATURES_SCHEMA,
    FORMAT,
    images_key,
    projections_key,
    summary_key,
)
from jobs.datasets import open_dataset
from jobs.networks import preflight
from jobs.rendering.images import grid
from jobs.runtime.actors import peak_rss_mb, run_on_actors, started_workers, worker_info
from jobs.runtime.cluster import connect, worker_options
from jobs.store import RunWriter
from jobs.store.encoding import parquet_bytes, png_bytes, warm_arrow
from zfcore.topk import TopKTracker

log = logging.getLogger(__name__)


class _AtlasActor(AtlasScanner):
    """The scanner as a Ray actor: it also says where it runs."""

    def info(self) -> dict[str, Any]:
        return {**worker_info(self.device), "model_fingerprint": self.model_fingerprint}

    def scan(self, shard: range) -> dict[str, Any]:
        return {**super().scan(shard), "actor": ray.get_runtime_context().get_actor_id(),
                "peak_rss_mb": peak_rss_mb()}

    def groups(self, groups: list[dict[str, Any]], project: bool) -> list[dict[str, Any]]:
        """Several projection groups in one call (see :func:`_per_call`)."""
        return [self.project(g) if project else self.describe(g) for g in groups]


# A dead worker is not restarted: its work moves to the others (see run_on_actors).
AtlasWorker = ray.remote(max_restarts=0)(_AtlasActor)


def build_atlas(spec: AtlasSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    """Run the atlas job into ``run`` (not committed here); returns the manifest fields."""
    t0 = time.perf_counter()
    connect()
    source = open_dataset(spec.dataset, spec.preprocess, spec.endpoint_url)
    shards = source.natural_shards(spec.shard_size)  # whole tar files / row groups where it can
    res = spec.resources
    count, options = worker_options(res.workers, res.gpus_per_worker, res.cpus_per_worker)
    count = min(count, len(shards))
    # Before any worker starts: the checkpoint fits, and the deconvnet can go down every layer.
    deconvnet = preflight(spec.model, spec.preprocess, spec.layers if spec.project else [], spec.endpoint_url)
    warm_arrow()  # before the clock of the first phase: the driver writes the tables
    with tempfile.TemporaryDirectory(prefix="zfatlas-atlas-") as scratch:
        with started_workers(AtlasWorker, count, options, spec, run, options["num_cpus"],
                             name=f"zfatlas-atlas-{run.run_id}") as (actors, workers):
            log.info("atlas %s: %d images in %d shards on %d workers", run.run_id, len(source),
                     len(shards), len(actors))
            t_scan = time.perf_counter()
            startup_s = t_scan - t0  # connecting, the dataset's index, the preflight, the workers
            scan, alive = _scan(spec, actors, shards, len(source), quiet)
            scan_s = time.perf_counter() - t_scan
            t_proj = time.perf_counter()
            made, alive = _project(spec, alive, scan.results, scratch, quiet)
            project_s = time.perf_counter() - t_proj
            lost_workers = len(actors) - len(alive)
        t_write = time.perf_counter()  # the workers are gone: what is left is the driver's writing
        table, summaries, sizes = _write(spec, run, made, scratch)
        write_s = time.perf_counter() - t_write
    total_s = time.perf_counter() - t0
    return {
        "name": spec.name,
        "model_fingerprint": workers[0]["model_fingerprint"],
        "dataset_fingerprint": source.fingerprint(),
        "class_names": source.class_names,  # label -> name, for readers of the label column
        "images_total": len(source),
        "images_scanned": scan.images,
        "images_skipped": len(scan.skipped),
        # Sorted: shards complete in any order, the manifest must not depend on it.
        "skipped": [{"image_id": i, "reason": r} for i, r in sorted(set(scan.skipped))[:1000]],
        "layers": spec.layers,
        "preprocess": dataclasses.asdict(spec.preprocess),
        "k": spec.k,
        "precision": spec.precision,
        "deconvnet": deconvnet,
        "features_rows": table.num_rows,
        "dead_channels": {layer: made.dead.get(layer, 0) for layer in spec.layers},
        "items_lost_on_reread": made.lost,
        "workers": [
            {
                **{k: v for k, v in w.items() if k != "model_fingerprint"},
                "shards": scan.shards_by_actor.get(w["actor_id"], 0),
            }
            for w in workers
        ],
        "workers_lost": lost_workers,
        "peak_rss_mb": {"driver": peak_rss_mb(), "scanner_max": max(scan.peak_rss.values(), default=None)},
        "timings": {"startup_s": startup_s, "scan_s": scan_s, "project_s": project_s, "write_s": write_s,
                    "total_s": total_s},
        "throughput_images_per_s": scan.images / scan_s if scan_s > 0 else None,
        "format": FORMAT,
        "tables": {"features": FEATURES, **{
            f"{kind}/{layer}": key(layer) for layer in made.tables
            for kind, key in (("images", images_key), ("projections", projections_key))
        }},
        "objects_written": len(sizes),
        "bytes_written": sum(sizes.values()),
        "summaries": summaries,
    }


@dataclass
class _Scanned:
    results: dict[str, Any]
    images: int
    skipped: list[tuple[str, str]]
    shards_by_actor: dict[str, int]
    peak_rss: dict[str, float]  # per worker, MiB, as of its last shard


def _scan(
    spec: AtlasSpec, actors: list[Any], shards: Any, total: int, quiet: bool
) -> tuple[_Scanned, list[Any]]:
    """Phase 1: every shard scanned by some worker, the trackers merged as they arrive."""
    merged: TopKTracker | None = None
    out_stats = _Scanned({}, 0, [], {}, {})
    bar = tqdm(total=total, unit="img", desc="scan", disable=quiet)

    def on_scan(shard: range, out: dict[str, Any]) -> None:
        nonlocal merged
        tracker = TopKTracker.from_state_dict(out["state"])
        merged = tracker if merged is None else merged.merge(tracker)
        out_stats.images += out["images"]
        out_stats.skipped.extend(out["skipped"])
        by_actor = out_stats.shards_by_actor
        by_actor[out["actor"]] = by_actor.get(out["actor"], 0) + 1
        out_stats.peak_rss[out["actor"]] = max(out_stats.peak_rss.get(out["actor"], 0.0), out["peak_rss_mb"])
        bar.update(len(shard))
        bar.set_postfix(shards=f"{sum(by_actor.values())}/{len(shards)}")

    alive = run_on_actors(actors, lambda a, s: a.scan.remote(s), shards, on_scan, spec.max_retries)
    bar.close()
    if merged is None or out_stats.images == 0:
        raise RuntimeError("no image could be read from the dataset; nothing to build an atlas from")
    if out_stats.skipped:
        log.warning("skipped %d unreadable images", len(out_stats.skipped))
    out_stats.results = merged.results()
    return out_stats, alive


@dataclass
class _Made:
    rows: list[dict[str, Any]]
    tables: dict[str, LayerTables]
    thumbnails: dict[str, dict[int, np.ndarray]]
    dead: dict[str, int]
    lost: int = 0


def _project(
    spec: AtlasSpec, actors: list[Any], results: dict[str, Any], scratch: str, quiet: bool
) -> tuple[_Made, list[Any]]:
    """Phase 2: the winners projected (or, without projections, described), a few whole channels
    per call; each layer's image tables written in channel order as groups come back."""
    groups = projection_groups(results, spec.layers, max(1, spec.resources.batch_size // spec.k))
    made = _Made([], {}, {layer: {} for layer in spec.layers}, {})
    if spec.project:
        made.tables = {
            layer: LayerTables(layer, [g["part"] for g in groups if g["layer"] == layer], scratch)
            for layer in spec.layers
        }
    bar = tqdm(total=len(groups), unit="group", desc="project", disable=quiet or not spec.project)

    def on_group(group: dict[str, Any], out: dict[str, Any]) -> None:
        made.rows.extend(out["rows"])
        dead = sum(1 for row in out["rows"] if row["dead"])
        made.dead[group["layer"]] = made.dead.get(group["layer"], 0) + dead
        if spec.project:
            made.thumbnails[group["layer"]].update(out["thumbnails"])
            made.tables[group["layer"]].add(group["part"], out["tables"])
        made.lost += out["lost"]
        bar.update(1)

    def on_call(bundle: list[dict[str, Any]], outs: list[dict[str, Any]]) -> None:
        for group, out in zip(bundle, outs, strict=True):
            on_group(group, out)

    per_call = _per_call(len(groups), len(actors))
    calls = [groups[i : i + per_call] for i in range(0, len(groups), per_call)]
    alive = run_on_actors(actors, lambda a, bundle: a.groups.remote(bundle, spec.project), calls, on_call,
                          spec.max_retries)
    bar.close()
    return made, alive


def _per_call(groups: int, workers: int) -> int:
    """Projection groups sent in one call: up to 4, while every worker still gets 4 calls or more
    to balance the load. A call costs about 2 ms beyond its bytes (zfnet-small's 53 groups took
    0.13-0.40 s one per call, 0.06-0.08 s four per call, moving the same 157 MB); a group stays
    one row group of its layer's tables."""
    return max(1, min(4, groups // (4 * max(1, workers))))


def _write(spec: AtlasSpec, run: RunWriter, made: _Made, scratch: str) -> tuple[pa.Table, dict, dict]:
    """features.parquet, the summaries and the layers' tables into the run, uploaded together."""
    made.rows.sort(key=lambda r: (spec.layers.index(r["layer"]), r["channel"], r["rank"]))
    table = pa.Table.from_pylist(made.rows, schema=FEATURES_SCHEMA)
    files: dict[str, str] = {}
    for layer_tables in made.tables.values():
        files.update(layer_tables.close())
    summaries = {}
    for layer, thumbs in made.thumbnails.items():
        if thumbs:
            tiles = [thumbs[c] for c in sorted(thumbs)]
            path = os.path.join(scratch, f"{layer}.summary.png")
            with open(path, "wb") as f:
                # zlib level 1: PIL's default 6 took 0.11 s of zfnet-small's 0.3 s write phase.
                f.write(png_bytes(grid(tiles, columns=math.ceil(math.sqrt(len(tiles))), pad=1),
                                  compress_level=1))
            files[summary_key(layer)] = path
            summaries[layer] = run.key(summary_key(layer))
    # Rows sorted by layer, channel, rank: row groups of a few channels let a one-channel query
    # (jobs.results.query, the API) read one small group instead of the whole table.
    features = os.path.join(scratch, FEATURES)
    with open(features, "wb") as f:
        f.write(parquet_bytes(table, FEATURES_SCHEMA, row_group_size=CHANNELS_PER_ROW_GROUP * spec.k))
    files[FEATURES] = features
    return table, summaries, upload(run, files)
