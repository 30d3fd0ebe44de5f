"""The atlas's work, as plain Python: scan shards for every channel's top-k, then project the
winners and write their images. :class:`AtlasScanner` runs as a Ray actor in the job
(:mod:`jobs.atlas.driver`) and directly in the benchmarks; nothing here imports Ray.

A projection group is a few whole channels of one layer, so a group can draw its channels' 3x3
grids: ``{"layer", "part", "items": [(channel, rank, image_index, y, x), ...]}``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from jobs.atlas.spec import AtlasSpec
from jobs.atlas.tables import PROJECTIONS_SCHEMA
from jobs.datasets import open_dataset
from jobs.networks import load_model
from jobs.rendering.images import display, grid, thumbnail
from jobs.runtime.device import memory_format, pick_device, to_device, torch_threads
from jobs.store import RunWriter
from zfcore.deconv import deconvolve
from zfcore.network import as_network
from zfcore.receptive import receptive_box
from zfcore.scan import layer_shapes, scan_batches
from zfcore.topk import TopK, TopKTracker

SUMMARY_TILE = 48  # pixels per channel tile in a layer's summary grid
FAST_PNG = 1  # zlib level for the thousands of per-feature PNGs: ~4x faster than 6, a few % larger


def projection_groups(
    results: dict[str, TopK], layers: list[str], channels_per_group: int
) -> list[dict[str, Any]]:
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
                        items.append((c, r, index, int(ys[c, r]), int(xs[c, r]), float(top.values[c, r])))
            if items:
                groups.append({"layer": layer, "part": part, "items": items})
    return groups


class AtlasScanner:
    """Holds the model and the dataset reader; scans shards and projects winners."""

    def __init__(self, spec: AtlasSpec, run: RunWriter, num_cpus: float) -> None:
        torch.set_num_threads(torch_threads(num_cpus))
        self.spec = spec
        self.run = run
        self.device = pick_device()
        self.preprocess = spec.preprocess
        model, self.model_fingerprint = load_model(spec.model, spec.seed, spec.endpoint_url, self.preprocess)
        self.memory_format = memory_format(self.device)
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        self.network = as_network(self.model)
        self.image_size = spec.image_size
        self.source = open_dataset(spec.dataset, spec.preprocess, spec.endpoint_url)
        self.shapes = layer_shapes(self.network, spec.layers, self.image_size)
        self.autocast = torch.bfloat16 if spec.precision == "bf16" else None

    def _batches(self, indices: list[int], stats: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.spec.resources.batch_size
        for i in range(0, len(indices), bs):
            batch = self.source.read(indices[i : i + bs])
            stats["skipped"].extend(batch.skipped)
            stats["images"] += len(batch.indices)
            if len(batch.indices):
                x = to_device(batch.images, self.device, self.preprocess)
                yield x, torch.from_numpy(batch.indices).to(self.device)

    def scan(self, shard: range) -> dict[str, Any]:
        start = time.perf_counter()
        stats: dict[str, Any] = {"images": 0, "skipped": []}
        tracker = TopKTracker(self.shapes, self.spec.k, self.device)
        scan_batches(self.network, self._batches(list(shard), stats), self.spec.layers, self.spec.k,
                     tracker, self.autocast)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {**stats, "state": tracker.state_dict(), "seconds": time.perf_counter() - start}

    def _row(
        self, layer: str, item: tuple, activation: float, label: int, box: Any, keys: dict[str, str]
    ) -> dict:
        channel, rank, index, y, x = item[:5]
        return {
            "layer": layer, "channel": channel, "rank": rank, "activation": activation,
            "image_id": self.source.image_id(index), "image_index": index, "label": label, "y": y, "x": x,
            "box_top": box.top, "box_left": box.left, "box_height": box.height, "box_width": box.width,
            **keys,
        }

    def describe(self, group: dict[str, Any]) -> dict[str, Any]:
        """Feature rows of a group without projections: the scan's values and receptive boxes, no
        image keys, and label -1 (labels come from re-reading the images, which this mode skips)."""
        layer = group["layer"]
        empty = dict.fromkeys(("patch_key", "projection_key", "patch_grid_key", "projection_grid_key"), "")
        rows = []
        for it in group["items"]:
            box = receptive_box(self.network, layer, it[3], it[4], self.image_size)
            rows.append(self._row(layer, it, it[5], -1, box, empty))
        return {"rows": rows, "thumbnails": {}, "lost": 0}

    def project(self, group: dict[str, Any]) -> dict[str, Any]:
        """Project a group of whole channels of one layer; write their PNGs and raw projections."""
        start = time.perf_counter()
        layer, items = group["layer"], group["items"]
        spatial = self.network.layers(self.image_size)[layer].spatial
        wanted = sorted({it[2] for it in items})
        batch = self.source.read(wanted)
        found = {int(i): n for n, i in enumerate(batch.indices)}
        usable = [it for it in items if it[2] in found]
        images = to_device(batch.images, self.device, self.preprocess) if len(batch.indices) else None
        values = np.zeros(len(usable), np.float32)
        projections = np.zeros((len(usable), 3, self.image_size, self.image_size), np.float32)
        bs = self.spec.resources.batch_size
        for i in range(0, len(usable), bs):
            chunk = usable[i : i + bs]
            rows = torch.tensor([found[it[2]] for it in chunk], device=self.device)
            out = deconvolve(
                self.network, images[rows], layer, [it[0] for it in chunk],
                positions=[(it[3], it[4]) for it in chunk] if spatial else None,
            )
            values[i : i + len(chunk)] = out.activations.float().cpu().numpy()
            projections[i : i + len(chunk)] = out.projections.float().cpu().numpy()

        rows_out: list[dict[str, Any]] = []
        raw: dict[str, list] = {name: [] for name in PROJECTIONS_SCHEMA.names}
        by_channel: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for n, item in enumerate(usable):
            channel, rank, index, y, x = item[:5]
            box = receptive_box(self.network, layer, y, x, self.image_size)
            proj = projections[n][:, box.top : box.top + box.height, box.left : box.left + box.width]
            image = batch.images[found[index]]
            patch = image[box.top : box.top + box.height, box.left : box.left + box.width]
            base = f"images/{layer}/{channel:04d}"
            patch_key = self.run.put_png(f"{base}/patch-{rank}.png", np.ascontiguousarray(patch), FAST_PNG)
            proj_img = display(proj)
            projection_key = self.run.put_png(f"{base}/projection-{rank}.png", proj_img, FAST_PNG)
            by_channel.setdefault(channel, []).append((rank, np.ascontiguousarray(patch), proj_img))
            keys = {
                "patch_key": patch_key, "projection_key": projection_key,
                "patch_grid_key": self.run.key(f"{base}/patch-grid.png"),
                "projection_grid_key": self.run.key(f"{base}/projection-grid.png"),
            }
            label = int(batch.labels[found[index]])
            rows_out.append(self._row(layer, item, float(values[n]), label, box, keys))
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
            thumbnails[channel] = thumbnail(entries[0][2], SUMMARY_TILE)
        if rows_out:
            self.run.write_table(f"projections/{layer}/part-{group['part']:05d}.parquet",
                                 pa.table(raw), PROJECTIONS_SCHEMA)
        return {"rows": rows_out, "thumbnails": thumbnails, "lost": len(items) - len(usable),
                "seconds": time.perf_counter() - start}
