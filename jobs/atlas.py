"""The atlas job: top-k images of every channel, projected to pixels with the deconvnet.

Two phases on the same worker actors (one per GPU when the cluster has GPUs):

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

import logging
import math
import os
import resource
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from tqdm import tqdm

from jobs.cluster import ACTOR_LOST, connect, run_on_actors, torch_threads, worker_options
from jobs.datasets import open_dataset, shard_ranges
from jobs.models import load_model
from jobs.spec import AtlasSpec
from jobs.store import RunWriter, Store
from zfcore.data import to_tensor
from zfcore.deconv import deconvolve
from zfcore.receptive import receptive_box
from zfcore.scan import layer_shapes, scan_batches
from zfcore.topk import TopKTracker

log = logging.getLogger(__name__)

FEATURES_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("rank", pa.int8(), nullable=False),
        pa.field("activation", pa.float32(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("y", pa.int32(), nullable=False),
        pa.field("x", pa.int32(), nullable=False),
        pa.field("box_top", pa.int32(), nullable=False),
        pa.field("box_left", pa.int32(), nullable=False),
        pa.field("box_height", pa.int32(), nullable=False),
        pa.field("box_width", pa.int32(), nullable=False),
        pa.field("patch_key", pa.string(), nullable=False),
        pa.field("projection_key", pa.string(), nullable=False),
        pa.field("patch_grid_key", pa.string(), nullable=False),
        pa.field("projection_grid_key", pa.string(), nullable=False),
    ]
)

# Raw float32 projections, cropped to the receptive box (the projection is exactly zero outside
# it). ``values`` is the (3, box_height, box_width) array in C order, in normalized-input units.
PROJECTIONS_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("rank", pa.int8(), nullable=False),
        pa.field("box_top", pa.int32(), nullable=False),
        pa.field("box_left", pa.int32(), nullable=False),
        pa.field("box_height", pa.int32(), nullable=False),
        pa.field("box_width", pa.int32(), nullable=False),
        pa.field("values", pa.list_(pa.float32()), nullable=False),
    ]
)

SUMMARY_TILE = 48  # pixels per channel tile in a layer's summary grid
FAST_PNG = 1  # zlib level for the thousands of per-feature PNGs: ~4x faster than 6, a few % larger


def display(projection: np.ndarray) -> np.ndarray:
    """A projection (3, h, w) as a uint8 (h, w, 3) image: zero is mid-grey, the largest magnitude
    reaches black or white (the paper's contrast-normalized display)."""
    scale = float(np.abs(projection).max())
    img = 0.5 + 0.5 * projection / scale if scale > 0 else np.full_like(projection, 0.5)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


def grid(
    tiles: list[np.ndarray], columns: int = 3, pad: int = 2, cell: tuple[int, int] | None = None
) -> np.ndarray:
    """uint8 (h, w, 3) tiles in a grid on a white background (the paper's Fig. 2 3x3 blocks).
    Tiles smaller than the cell (boxes clipped at the image border) are centred in it."""
    ch = cell[0] if cell else max(t.shape[0] for t in tiles)
    cw = cell[1] if cell else max(t.shape[1] for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    out = np.full((rows * (ch + pad) + pad, columns * (cw + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        top = pad + r * (ch + pad) + (ch - t.shape[0]) // 2
        left = pad + c * (cw + pad) + (cw - t.shape[1]) // 2
        out[top : top + t.shape[0], left : left + t.shape[1]] = t
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _thumbnail(image: np.ndarray, side: int = SUMMARY_TILE) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))


class AtlasScanner:
    """Holds the model and the dataset reader; scans shards and projects winners. Runs as a Ray
    actor (:data:`AtlasWorker`), one per GPU; a plain object in benchmarks."""

    def __init__(self, spec: AtlasSpec, run: RunWriter, num_cpus: float) -> None:
        torch.set_num_threads(torch_threads(num_cpus))
        self.spec = spec
        self.run = run
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = load_model(spec.model, spec.seed, spec.endpoint_url)
        fmt = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.memory_format = fmt
        self.model = model.to(self.device, memory_format=fmt).eval()
        self.image_size = spec.dataset.image_size or spec.model.image_size
        self.source = open_dataset(spec.dataset, self.image_size, spec.endpoint_url)
        self.shapes = layer_shapes(self.model, spec.layers, self.image_size)
        self.autocast = torch.bfloat16 if spec.precision == "bf16" else None

    def info(self) -> dict[str, Any]:
        """Where this worker runs. Outside Ray (benchmarks) only the device and pid are known."""
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "node_id": ctx.get_node_id() if ctx else None,
            "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])] if ctx else [],
            "device": str(self.device),
            "pid": os.getpid(),
            "actor_id": ctx.get_actor_id() if ctx else None,
            "peak_rss_mb": _peak_rss_mb(),
        }

    def _to_device(self, images: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(images)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)  # uint8 over the bus, 4x less
        return to_tensor(t).contiguous(memory_format=self.memory_format)

    def _batches(self, indices: list[int], stats: dict):
        bs = self.spec.resources.batch_size
        for i in range(0, len(indices), bs):
            batch = self.source.read(indices[i : i + bs])
            stats["skipped"].extend(batch.skipped)
            stats["images"] += len(batch.indices)
            if len(batch.indices):
                yield self._to_device(batch.images), torch.from_numpy(batch.indices).to(self.device)

    def scan(self, shard: range) -> dict[str, Any]:
        start = time.perf_counter()
        stats: dict[str, Any] = {"images": 0, "skipped": []}
        tracker = TopKTracker(self.shapes, self.spec.k, self.device)
        scan_batches(self.model, self._batches(list(shard), stats), self.spec.layers, self.spec.k,
                     tracker, self.autocast)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {**stats, "state": tracker.state_dict(), "seconds": time.perf_counter() - start,
                "actor": self.info()["actor_id"], "peak_rss_mb": _peak_rss_mb()}

    def project(self, group: dict[str, Any]) -> dict[str, Any]:
        """Project a group of whole channels of one layer; write their PNGs and raw projections.

        group: {"layer", "part", "items": [(channel, rank, image_index, y, x), ...]}.
        """
        start = time.perf_counter()
        layer, items = group["layer"], group["items"]
        wanted = sorted({it[2] for it in items})
        batch = self.source.read(wanted)
        found = {int(i): n for n, i in enumerate(batch.indices)}
        usable = [it for it in items if it[2] in found]
        images = self._to_device(batch.images) if len(batch.indices) else None
        values = np.zeros(len(usable), np.float32)
        projections = np.zeros((len(usable), 3, self.image_size, self.image_size), np.float32)
        bs = self.spec.resources.batch_size
        for i in range(0, len(usable), bs):
            chunk = usable[i : i + bs]
            rows = torch.tensor([found[it[2]] for it in chunk], device=self.device)
            out = deconvolve(
                self.model, images[rows], layer, [it[0] for it in chunk],
                positions=[(it[3], it[4]) for it in chunk] if layer.startswith("conv") else None,
            )
            values[i : i + len(chunk)] = out.activations.float().cpu().numpy()
            projections[i : i + len(chunk)] = out.projections.float().cpu().numpy()

        rows_out: list[dict[str, Any]] = []
        raw: dict[str, list] = {name: [] for name in PROJECTIONS_SCHEMA.names}
        by_channel: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for n, (channel, rank, index, y, x) in enumerate(usable):
            box = receptive_box(self.model, layer, y, x, self.image_size)
            proj = projections[n][:, box.top : box.top + box.height, box.left : box.left + box.width]
            image = batch.images[found[index]]
            patch = image[box.top : box.top + box.height, box.left : box.left + box.width]
            base = f"images/{layer}/{channel:04d}"
            patch_key = self.run.put_png(f"{base}/patch-{rank}.png", np.ascontiguousarray(patch), FAST_PNG)
            proj_img = display(proj)
            projection_key = self.run.put_png(f"{base}/projection-{rank}.png", proj_img, FAST_PNG)
            by_channel.setdefault(channel, []).append((rank, np.ascontiguousarray(patch), proj_img))
            rows_out.append({
                "layer": layer, "channel": channel, "rank": rank, "activation": float(values[n]),
                "image_id": self.source.image_id(index), "image_index": index,
                "label": int(batch.labels[found[index]]), "y": y, "x": x,
                "box_top": box.top, "box_left": box.left, "box_height": box.height, "box_width": box.width,
                "patch_key": patch_key, "projection_key": projection_key,
                "patch_grid_key": self.run.key(f"{base}/patch-grid.png"),
                "projection_grid_key": self.run.key(f"{base}/projection-grid.png"),
            })
            for name, value in (("layer", layer), ("channel", channel), ("rank", rank),
                                ("box_top", box.top), ("box_left", box.left),
                                ("box_height", box.height), ("box_width", box.width),
                                ("values", proj.astype(np.float32).ravel())):
                raw[name].append(value)

        thumbnails = {}
        for channel, entries in by_channel.items():
            entries.sort(key=lambda e: e[0])
            base = f"images/{layer}/{channel:04d}"
            self.run.put_png(f"{base}/patch-grid.png", grid([e[1] for e in entries]), FAST_PNG)
            self.run.put_png(f"{base}/projection-grid.png", grid([e[2] for e in entries]), FAST_PNG)
            thumbnails[channel] = _thumbnail(entries[0][2])
        if rows_out:
            self.run.write_table(f"projections/{layer}/part-{group['part']:05d}.parquet",
                                 pa.table(raw), PROJECTIONS_SCHEMA)
        return {"rows": rows_out, "thumbnails": thumbnails, "lost": len(items) - len(usable),
                "seconds": time.perf_counter() - start}


# A dead worker is not restarted: its work moves to the others (see run_on_actors).
AtlasWorker = ray.remote(max_restarts=0)(AtlasScanner)


def _started(actors: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Wait for the workers to load; those that die while starting are dropped."""
    infos, alive = [], []
    for actor, ref in [(a, a.info.remote()) for a in actors]:
        try:
            infos.append(ray.get(ref))
            alive.append(actor)
        except ACTOR_LOST as err:
            log.warning("a worker died while starting (%s); going on without it", type(err).__name__)
    if not alive:
        raise RuntimeError("no worker actor could start")
    return infos, alive


def _groups(results: dict[str, Any], layers: list[str], channels_per_group: int) -> list[dict[str, Any]]:
    """Winning items, a few whole channels per group so each group can draw its channels' grids."""
    groups = []
    for layer in layers:
        top = results[layer]
        ys, xs = top.positions_yx()
        channels = list(range(top.values.shape[0]))
        for part, start in enumerate(range(0, len(channels), channels_per_group)):
            items = []
            for c in channels[start : start + channels_per_group]:
                for r in range(top.values.shape[1]):
                    index = int(top.image_index[c, r])
                    if index >= 0:  # slots stay empty when the dataset has fewer than k images
                        items.append((c, r, index, int(ys[c, r]), int(xs[c, r])))
            if items:
                groups.append({"layer": layer, "part": part, "items": items})
    return groups


def run(spec: AtlasSpec, store: Store, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    """Run the atlas job into ``run`` (not committed here); returns the manifest fields."""
    t0 = time.perf_counter()
    connect()
    image_size = spec.dataset.image_size or spec.model.image_size
    source = open_dataset(spec.dataset, image_size, spec.endpoint_url)
    shards = shard_ranges(len(source), spec.shard_size)
    res = spec.resources
    count, options = worker_options(res.workers, res.gpus_per_worker, res.cpus_per_worker)
    count = min(count, len(shards))
    # Named, so operators (and the fault tests) can find a run's workers: zfatlas-atlas-<run>-<i>.
    actors = [
        AtlasWorker.options(name=f"zfatlas-atlas-{run.run_id}-{i}", **options).remote(
            spec, run, options["num_cpus"]
        )
        for i in range(count)
    ]
    workers, actors = _started(actors)
    log.info("atlas %s: %d images in %d shards on %d workers", run.run_id, len(source), len(shards), count)

    # Phase 1: scan.
    model, model_fingerprint = load_model(spec.model, spec.seed, spec.endpoint_url)
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
    lost_workers = count - len(alive)
    scan_s = time.perf_counter() - t_scan
    bar.close()
    if merged is None or scanned == 0:
        raise RuntimeError("no image could be read from the dataset; nothing to build an atlas from")
    results = merged.results()
    if skipped:
        log.warning("skipped %d unreadable images", len(skipped))

    # Phase 2: project the winners, a few whole channels per call.
    rows: list[dict[str, Any]] = []
    thumbnails: dict[str, dict[int, np.ndarray]] = {layer: {} for layer in spec.layers}
    lost = 0
    t_proj = time.perf_counter()
    if spec.project:
        groups = _groups(results, spec.layers, max(1, res.batch_size // spec.k))
        pbar = tqdm(total=len(groups), unit="group", desc="project", disable=quiet)

        def on_project(group: dict[str, Any], out: dict[str, Any]) -> None:
            nonlocal lost
            rows.extend(out["rows"])
            thumbnails[group["layer"]].update(out["thumbnails"])
            lost += out["lost"]
            pbar.update(1)

        alive = run_on_actors(alive, lambda a, g: a.project.remote(g), groups, on_project, spec.max_retries)
        lost_workers = count - len(alive)
        pbar.close()
    project_s = time.perf_counter() - t_proj
    for a in actors:
        ray.kill(a)

    t_write = time.perf_counter()
    if not spec.project:
        rows = _rows_without_projections(results, spec.layers, source, model, image_size)
    rows.sort(key=lambda r: (spec.layers.index(r["layer"]), r["channel"], r["rank"]))
    table = pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA)
    # Rows are sorted by layer, channel, rank: row groups of 64 channels let a one-channel query
    # (jobs.query, the API) read one small group instead of the whole table.
    run.write_table("features.parquet", table, FEATURES_SCHEMA, row_group_size=64 * spec.k)
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
        "model_fingerprint": model_fingerprint,
        "dataset_fingerprint": source.fingerprint(),
        "images_total": len(source),
        "images_scanned": scanned,
        "images_skipped": len(skipped),
        "skipped": [{"image_id": i, "reason": r} for i, r in skipped[:1000]],
        "layers": spec.layers,
        "k": spec.k,
        "precision": spec.precision,
        "features_rows": table.num_rows,
        "items_lost_on_reread": lost,
        "workers": [{**w, "shards": shards_by_actor.get(w["actor_id"], 0)} for w in workers],
        "workers_lost": lost_workers,
        "peak_rss_mb": {"driver": _peak_rss_mb(), "scanner_max": max(peak_rss.values(), default=None)},
        "timings": {"scan_s": scan_s, "project_s": project_s, "write_s": write_s, "total_s": total_s},
        "throughput_images_per_s": scanned / scan_s if scan_s > 0 else None,
        "tables": {"features": "features.parquet", "projections": "projections/"},
        "summaries": summaries,
    }


def _rows_without_projections(
    results: dict[str, Any], layers: list[str], source: Any, model: Any, image_size: int
) -> list[dict[str, Any]]:
    """Feature rows when projections are turned off: the scan's values and boxes, no image keys,
    and label -1 (labels come from re-reading the images, which this mode skips)."""
    rows = []
    for layer in layers:
        top = results[layer]
        ys, xs = top.positions_yx()
        for c in range(top.values.shape[0]):
            for r in range(top.values.shape[1]):
                index = int(top.image_index[c, r])
                if index < 0:
                    continue
                box = receptive_box(model, layer, int(ys[c, r]), int(xs[c, r]), image_size)
                rows.append({
                    "layer": layer, "channel": c, "rank": r, "activation": float(top.values[c, r]),
                    "image_id": source.image_id(index), "image_index": index, "label": -1,
                    "y": int(ys[c, r]), "x": int(xs[c, r]), "box_top": box.top, "box_left": box.left,
                    "box_height": box.height, "box_width": box.width, "patch_key": "", "projection_key": "",
                    "patch_grid_key": "", "projection_grid_key": "",
                })
    return rows

