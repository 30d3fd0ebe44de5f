"""The atlas job on Ray: top-k images of every channel, projected to pixels with the deconvnet.

Two phases on the same worker actors (:class:`jobs.atlas.scanner.AtlasScanner`, one per GPU when
the cluster has GPUs):

1. scan: each actor scans shards of the dataset with one forward pass per batch, tracking every
   requested layer's top-k with :class:`zfcore.topk.TopKTracker`; the driver merges shard
   trackers as they arrive (exact: merging is order-independent).
2. project: the winning (image, layer, channel, position) items, a few whole channels per call,
   are re-read by image index and projected in batches; the actor writes each feature's PNGs and
   raw projections into the run and returns the table rows.

A shard or a group whose actor dies is retried on the remaining actors (:func:`run_on_actors`),
so the atlas is the same as a fault-free run. Nothing is visible until the runner commits the
manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from jobs.atlas.scanner import AtlasScanner, projection_groups
from jobs.atlas.spec import AtlasSpec
from jobs.atlas.tables import CHANNELS_PER_ROW_GROUP, FEATURES, FEATURES_SCHEMA
from jobs.datasets import open_dataset, shard_ranges
from jobs.networks import preflight
from jobs.rendering.images import grid
from jobs.runtime.actors import peak_rss_mb, run_on_actors, started_workers, worker_info
from jobs.runtime.cluster import connect, worker_options
from jobs.store import RunWriter
from zfcore.topk import TopKTracker

log = logging.getLogger(__name__)


class _AtlasActor(AtlasScanner):
    """The scanner as a Ray actor: it also says where it runs."""

    def info(self) -> dict[str, Any]:
        return {**worker_info(self.device), "model_fingerprint": self.model_fingerprint}

    def scan(self, shard: range) -> dict[str, Any]:
        return {**super().scan(shard), "actor": ray.get_runtime_context().get_actor_id(),
                "peak_rss_mb": peak_rss_mb()}


# A dead worker is not restarted: its work moves to the others (see run_on_actors).
AtlasWorker = ray.remote(max_restarts=0)(_AtlasActor)


def build_atlas(spec: AtlasSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    """Run the atlas job into ``run`` (not committed here); returns the manifest fields."""
    t0 = time.perf_counter()
    connect()
    source = open_dataset(spec.dataset, spec.preprocess, spec.endpoint_url)
    shards = shard_ranges(len(source), spec.shard_size)
    res = spec.resources
    count, options = worker_options(res.workers, res.gpus_per_worker, res.cpus_per_worker)
    count = min(count, len(shards))
    # Before any worker starts: the checkpoint fits, and the deconvnet can go down every layer.
    deconvnet = preflight(spec.model, spec.preprocess, spec.layers if spec.project else [], spec.endpoint_url)
    with started_workers(AtlasWorker, count, options, spec, run, options["num_cpus"],
                         name=f"zfatlas-atlas-{run.run_id}") as (actors, workers):
        log.info("atlas %s: %d images in %d shards on %d workers", run.run_id, len(source), len(shards),
                 len(actors))

        # Phase 1: scan.
        merged: TopKTracker | None = None
        scanned, skipped = 0, []
        shards_by_actor: dict[str, int] = {}
        peak_rss: dict[str, float] = {}  # per worker, MiB, as of its last shard
        bar = tqdm(total=len(source), unit="img", desc="scan", disable=quiet)

        def on_scan(shard: range, out: dict[str, Any]) -> None:
            nonlocal merged, scanned
            tracker = TopKTracker.from_state_dict(out["state"])
            merged = tracker if merged is None else merged.merge(tracker)
            scanned += out["images"]
            skipped.extend(out["skipped"])
            shards_by_actor[out["actor"]] = shards_by_actor.get(out["actor"], 0) + 1
            peak_rss[out["actor"]] = max(peak_rss.get(out["actor"], 0.0), out["peak_rss_mb"])
            bar.update(len(shard))
            bar.set_postfix(shards=f"{sum(shards_by_actor.values())}/{len(shards)}")

        t_scan = time.perf_counter()
        alive = run_on_actors(actors, lambda a, s: a.scan.remote(s), shards, on_scan, spec.max_retries)
        scan_s = time.perf_counter() - t_scan
        bar.close()
        if merged is None or scanned == 0:
            raise RuntimeError("no image could be read from the dataset; nothing to build an atlas from")
        results = merged.results()
        if skipped:
            log.warning("skipped %d unreadable images", len(skipped))

        # Phase 2: project the winners (or, without projections, describe them), a few whole
        # channels per call.
        rows: list[dict[str, Any]] = []
        thumbnails: dict[str, dict[int, np.ndarray]] = {layer: {} for layer in spec.layers}
        lost = 0
        t_proj = time.perf_counter()
        groups = projection_groups(results, spec.layers, max(1, res.batch_size // spec.k))
        pbar = tqdm(total=len(groups), unit="group", desc="project", disable=quiet or not spec.project)

        def on_group(group: dict[str, Any], out: dict[str, Any]) -> None:
            nonlocal lost
            rows.extend(out["rows"])
            thumbnails[group["layer"]].update(out["thumbnails"])
            lost += out["lost"]
            pbar.update(1)

        def call(actor: Any, group: dict[str, Any]) -> Any:
            return (actor.project if spec.project else actor.describe).remote(group)

        alive = run_on_actors(alive, call, groups, on_group, spec.max_retries)
        pbar.close()
        project_s = time.perf_counter() - t_proj
        lost_workers = len(actors) - len(alive)

    t_write = time.perf_counter()
    rows.sort(key=lambda r: (spec.layers.index(r["layer"]), r["channel"], r["rank"]))
    table = pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA)
    # Rows are sorted by layer, channel, rank: row groups of a few channels let a one-channel query
    # (jobs.results.query, the API) read one small group instead of the whole table.
    run.write_table(FEATURES, table, FEATURES_SCHEMA, row_group_size=CHANNELS_PER_ROW_GROUP * spec.k)
    summaries = {}
    for layer, thumbs in thumbnails.items():
        if thumbs:
            tiles = [thumbs[c] for c in sorted(thumbs)]
            columns = math.ceil(math.sqrt(len(tiles)))
            summaries[layer] = run.put_png(f"summary/{layer}.png", grid(tiles, columns=columns, pad=1))
    write_s = time.perf_counter() - t_write
    total_s = time.perf_counter() - t0
    return {
        "name": spec.name,
        "model_fingerprint": workers[0]["model_fingerprint"],
        "dataset_fingerprint": source.fingerprint(),
        "images_total": len(source),
        "images_scanned": scanned,
        "images_skipped": len(skipped),
        "skipped": [{"image_id": i, "reason": r} for i, r in skipped[:1000]],
        "layers": spec.layers,
        "preprocess": dataclasses.asdict(spec.preprocess),
        "k": spec.k,
        "precision": spec.precision,
        "deconvnet": deconvnet,
        "features_rows": table.num_rows,
        "items_lost_on_reread": lost,
        "workers": [
            {
                **{k: v for k, v in w.items() if k != "model_fingerprint"},
                "shards": shards_by_actor.get(w["actor_id"], 0),
            }
            for w in workers
        ],
        "workers_lost": lost_workers,
        "peak_rss_mb": {"driver": peak_rss_mb(), "scanner_max": max(peak_rss.values(), default=None)},
        "timings": {"scan_s": scan_s, "project_s": project_s, "write_s": write_s, "total_s": total_s},
        "throughput_images_per_s": scanned / scan_s if scan_s > 0 else None,
        "tables": {"features": FEATURES, "projections": "projections/"},
        "summaries": summaries,
    }
