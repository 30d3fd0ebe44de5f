"""The atlas job on Ray: top-k images of every channel, projected to pixels with the deconvnet.

Two phases on the same worker actors (:class:`jobs.atlas.scanner.AtlasScanner`, one per GPU when
the cluster has GPUs):

1. scan: each actor scans shards of the dataset with one forward pass per batch, tracking every
   requested layer's top-k with :class:`zfcore.topk.TopKTracker`; the driver merges shard
   trackers as they arrive (exact: merging is order-independent).
2. project: the winning (image, layer, channel, position) items, in groups of a few whole
   channels and parts of a few groups (one part per call), are projected in batches from the
   images the actor kept from its scan (or read again); the actor writes the part's image and
   projection tables into the run itself and returns the feature rows. The driver writes
   features.parquet and the summaries: no pixel goes through it.

A shard or a part whose actor dies is retried on the remaining actors (:func:`run_on_actors`),
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

from jobs.atlas.layer_tables import upload
from jobs.atlas.scanner import AtlasScanner, projection_groups, projection_parts
from jobs.atlas.spec import AtlasSpec
from jobs.atlas.tables import (
    CHANNELS_PER_ROW_GROUP,
    FEATURES,
    FEATURES_SCHEMA,
    FORMAT,
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

    def project_part(self, part: dict[str, Any], driver_node: str | None = None) -> dict[str, Any]:
        # A local store is the driver machine's folder: a worker elsewhere sends the part's bytes.
        elsewhere = driver_node not in (None, ray.get_runtime_context().get_node_id())
        out = super().project_part(part, send_bytes=self.run.store.machine_local and elsewhere)
        return {**out, "actor": ray.get_runtime_context().get_actor_id()}


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
    warm_arrow()  # before the clock of the first phase: the driver writes features.parquet
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
            made, alive = _project(spec, run, alive, scan.results, quiet)
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
                # Parts projected, and those sent for the driver to write (a local store's folder
                # is on another machine than this worker's).
                "parts": made.parts_by_actor.get(w["actor_id"], 0),
                "parts_sent": made.sent_by_actor.get(w["actor_id"], 0),
            }
            for w in workers
        ],
        "workers_lost": lost_workers,
        "peak_rss_mb": {"driver": peak_rss_mb(), "scanner_max": max(scan.peak_rss.values(), default=None)},
        "timings": {"startup_s": startup_s, "scan_s": scan_s, "project_s": project_s, "write_s": write_s,
                    "total_s": total_s},
        "throughput_images_per_s": scan.images / scan_s if scan_s > 0 else None,
        "format": FORMAT,
        # Every table file (the parts of a layer's image tables, in channel order), and each
        # part's channel range: a reader opens the one part that holds a channel.
        "tables": {"features": FEATURES, **{key.removesuffix(".parquet"): key for key in sorted(made.files)}},
        "parts": made.parts,
        "objects_written": len(sizes) + len(made.files),
        "bytes_written": sum(sizes.values()) + sum(made.files.values()),
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
    thumbnails: dict[str, dict[int, np.ndarray]]
    dead: dict[str, int]
    parts: dict[str, list[list[int]]]  # per layer, each part's [first, last] channel
    files: dict[str, int] = dataclasses.field(default_factory=dict)  # the parts' tables: relkey -> bytes
    lost: int = 0
    parts_by_actor: dict[str, int] = dataclasses.field(default_factory=dict)
    sent_by_actor: dict[str, int] = dataclasses.field(default_factory=dict)  # bytes sent to the driver


def _project(
    spec: AtlasSpec, run: RunWriter, actors: list[Any], results: dict[str, Any], quiet: bool
) -> tuple[_Made, list[Any]]:
    """Phase 2: the winners projected (or, without projections, described), a part of a few
    groups of whole channels per call; each worker writes the parts it projects into the run (or
    sends them, for the driver to write, when the store is a folder of another machine)."""
    groups = projection_groups(results, spec.layers, max(1, spec.resources.batch_size // spec.k))
    parts = projection_parts(groups)
    made = _Made([], {layer: {} for layer in spec.layers}, {}, {layer: [] for layer in spec.layers})
    for part in parts:
        made.parts[part["layer"]].append(part["channels"])
    bar = tqdm(total=len(groups), unit="group", desc="project", disable=quiet or not spec.project)

    def on_part(part: dict[str, Any], out: dict[str, Any]) -> None:
        for group_out in out["groups"]:
            made.rows.extend(group_out["rows"])
            dead = sum(1 for row in group_out["rows"] if row["dead"])
            made.dead[part["layer"]] = made.dead.get(part["layer"], 0) + dead
            if spec.project:
                made.thumbnails[part["layer"]].update(group_out["thumbnails"])
            made.lost += group_out["lost"]
        made.files.update(out["files"])
        actor = out["actor"]
        made.parts_by_actor[actor] = made.parts_by_actor.get(actor, 0) + 1
        if out["payload"]:
            made.sent_by_actor[actor] = made.sent_by_actor.get(actor, 0) + 1
            if sum(made.sent_by_actor.values()) == 1:
                log.info("workers on other machines than the local store %s send their parts through "
                         "the driver (with an S3 store every worker uploads its own)", run.store.uri_of(""))
        for relkey, data in out["payload"].items():
            run.put_bytes(relkey, data)
            made.files[relkey] = len(data)
        bar.update(len(part["groups"]))

    here = ray.get_runtime_context().get_node_id()

    def call(actor: Any, part: dict[str, Any]) -> Any:
        return actor.project_part.remote(part, here)

    alive = run_on_actors(actors, call, parts, on_part, spec.max_retries)
    bar.close()
    if not spec.project:
        made.parts = {}
    return made, alive


def _write(spec: AtlasSpec, run: RunWriter, made: _Made, scratch: str) -> tuple[pa.Table, dict, dict]:
    """features.parquet and the summaries into the run (the workers wrote the layers' tables)."""
    made.rows.sort(key=lambda r: (spec.layers.index(r["layer"]), r["channel"], r["rank"]))
    table = pa.Table.from_pylist(made.rows, schema=FEATURES_SCHEMA)
    files: dict[str, str] = {}
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
