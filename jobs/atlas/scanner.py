"""The atlas's work, as plain Python: scan shards for every channel's top-k, then project the
winners and draw their images. :class:`AtlasScanner` runs as a Ray actor in the job
(:mod:`jobs.atlas.driver`) and directly in the benchmarks; nothing here imports Ray.

A projection group is a few whole channels of one layer, so a group can draw its channels' 3x3
grids: ``{"layer", "group", "items": [(channel, rank, image_index, y, x, value, dead), ...]}``;
a group's result is its feature rows and its rows of the layer's two image tables. A part is up
to :data:`jobs.atlas.tables.GROUPS_PER_PART` consecutive groups of one layer: the worker that
projects it writes its two table files into the run (:mod:`jobs.atlas.layer_tables`) and returns
only the feature rows and thumbnails. Nothing per item is written as a file.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from jobs.atlas.layer_tables import part_files, upload
from jobs.atlas.spec import AtlasSpec
from jobs.atlas.tables import GROUPS_PER_PART, IMAGES_SCHEMA, PROJECTIONS_SCHEMA
from jobs.atlas.winners import WinnerImages, tracked_images
from jobs.datasets import Prefetcher, open_dataset
from jobs.networks import load_model
from jobs.rendering.images import display, thumbnail
from jobs.runtime.device import memory_format, pick_device, to_device, torch_threads
from jobs.store import RunWriter
from jobs.store.encoding import binary_column, list_column, warm_arrow
from zfcore.deconv import project_windows
from zfcore.network import as_network
from zfcore.receptive import receptive_box
from zfcore.scan import layer_shapes, scan_batches
from zfcore.topk import TopK, TopKTracker

SUMMARY_TILE = 48  # pixels per channel tile in a layer's summary grid
# Display: each channel's projections share one scale, the 99.5th percentile of their magnitudes
# (the paper's figures are contrast-normalized per feature; the max alone leaves them faint grey).
DISPLAY_PERCENTILE = 99.5


def projection_groups(
    results: dict[str, TopK], layers: list[str], channels_per_group: int
) -> list[dict[str, Any]]:
    """Winning items, a few whole channels per group so each group can draw its channels' grids.
    A channel that never fired (strongest activation not positive) has one item, rank 0, marked
    dead: there is nothing to project or show."""
    groups = []
    for layer in layers:
        top = results[layer]
        ys, xs = top.positions_yx()
        channels = list(range(top.values.shape[0]))
        for group, start in enumerate(range(0, len(channels), channels_per_group)):
            items = []
            for c in channels[start : start + channels_per_group]:
                dead = not float(top.values[c, 0]) > 0
                for r in range(1 if dead else top.values.shape[1]):
                    index = int(top.image_index[c, r])
                    if index >= 0:  # slots stay empty when the dataset has fewer than k images
                        value = float(top.values[c, r])
                        items.append((c, r, index, int(ys[c, r]), int(xs[c, r]), value, dead))
            if items:
                groups.append({"layer": layer, "group": group, "items": items})
    return groups


def projection_parts(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups (in :func:`projection_groups`' order) in parts of up to ``GROUPS_PER_PART``
    consecutive groups of one layer: ``{"layer", "part", "channels": [first, last], "groups"}``."""
    parts: list[dict[str, Any]] = []
    for layer in dict.fromkeys(g["layer"] for g in groups):
        mine = [g for g in groups if g["layer"] == layer]
        for part, start in enumerate(range(0, len(mine), GROUPS_PER_PART)):
            chunk = mine[start : start + GROUPS_PER_PART]
            channels = [it[0] for g in chunk for it in g["items"]]
            parts.append({"layer": layer, "part": part, "channels": [min(channels), max(channels)],
                          "groups": chunk})
    return parts


def channel_scale(projections: list[np.ndarray]) -> float:
    """One display scale for a channel's projections (see :data:`DISPLAY_PERCENTILE`)."""
    if not projections:
        return 0.0
    magnitudes = np.concatenate([p.ravel() for p in projections])
    np.abs(magnitudes, out=magnitudes)
    scale = upper_percentile(magnitudes, DISPLAY_PERCENTILE) if magnitudes.size else 0.0
    return scale if scale > 0 else float(magnitudes.max(initial=0.0))


def upper_percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear method, the same float arithmetic, so the same
    value) for a high ``q``, about 9x faster on a channel's projections: only the values above a
    bound taken from a strided sample are partitioned. The bound is checked to keep every value at
    or above the percentile's rank, or the whole array is partitioned. 1-D, no NaN."""
    n = values.size
    pos = (n - 1) * (q / 100)  # numpy's virtual index for the linear method
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    tail = values
    if n > 8192:
        sample = values[:: n // 2048]
        # A sample rank with four times the needed share of values above it.
        rank = max(0, math.floor(sample.size * (1 - 4 * (n - lo) / n)) - 1)
        above = values[values >= np.partition(sample, rank)[rank]]
        if above.size >= n - lo:  # the top n - lo values are all in it
            tail = above
    skipped = n - tail.size
    part = np.partition(tail, [lo - skipped, hi - skipped])
    a, b = part[lo - skipped], part[hi - skipped]
    gamma, diff = float(pos - lo), b - a  # numpy's _lerp, in the array's dtype
    return float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)


def _table(schema: pa.Schema, columns: dict[str, Any]) -> pa.Table:
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) for f in schema], schema=schema)


class AtlasScanner:
    """Holds the model and the dataset reader; scans shards and projects winners."""

    def __init__(
        self, spec: AtlasSpec, run: RunWriter, num_cpus: float, decode_device: str | None = None
    ) -> None:
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
        # Batch i+1 is read and decoded (in threads) while the model computes on batch i. On CUDA
        # the JPEGs are decoded on the GPU, batched (other formats, and sources without encoded
        # bytes, on the CPU as everywhere else).
        self.prefetcher = Prefetcher(self.source, torch_threads(num_cpus),
                                     decode_device=decode_device or self._decode_device())
        self.shapes = layer_shapes(self.network, spec.layers, self.image_size)
        self.autocast = torch.bfloat16 if spec.precision == "bf16" else None
        # The winners' decoded images, kept from the scan for the projections (CPU-decoded only:
        # images decoded on the GPU are read again).
        keep = spec.project and self.prefetcher.decode_device is None
        self.winners = WinnerImages() if keep else None
        self._scanned: TopKTracker | None = None  # every shard this worker scanned, merged
        warm_arrow()  # the projections build tables

    def _decode_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    def _batches(
        self, indices: list[int], stats: dict, tracker: TopKTracker | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.spec.resources.batch_size
        chunks = [indices[i : i + bs] for i in range(0, len(indices), bs)]
        earlier = tracked_images(self._scanned) if self._scanned is not None and self.winners else set()
        for batch in self.prefetcher.batches(chunks):
            stats["skipped"].extend(batch.skipped)
            stats["images"] += len(batch.indices)
            if len(batch.indices):
                x = to_device(batch.images, self.device, self.preprocess)
                yield x, torch.from_numpy(batch.indices).to(self.device)
                # Back here, the tracker has taken this batch in.
                if self.winners is not None and tracker is not None:
                    held = tracked_images(tracker) | earlier
                    self.winners.keep_only(held)
                    self.winners.offer(batch, held)

    def scan(self, shard: range) -> dict[str, Any]:
        start = time.perf_counter()
        stats: dict[str, Any] = {"images": 0, "skipped": []}
        tracker = TopKTracker(self.shapes, self.spec.k, self.device)
        scan_batches(self.network, self._batches(list(shard), stats, tracker), self.spec.layers,
                     self.spec.k, tracker, self.autocast)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        state = tracker.state_dict()
        if self.winners is not None:
            mine = TopKTracker.from_state_dict(state, self.device)
            self._scanned = mine if self._scanned is None else self._scanned.merge(mine)
            self.winners.keep_only(tracked_images(self._scanned))
        return {**stats, "state": state, "seconds": time.perf_counter() - start}

    def _row(self, layer: str, item: tuple, activation: float, label: int, box: Any) -> dict:
        channel, rank, index, y, x = item[:5]
        return {
            "layer": layer, "channel": channel, "rank": rank, "activation": activation,
            "image_id": self.source.image_id(index), "image_index": index, "label": label, "y": y, "x": x,
            "box_top": box.top, "box_left": box.left, "box_height": box.height, "box_width": box.width,
            "dead": bool(item[6]),
        }

    def project_part(self, part: dict[str, Any], *, send_bytes: bool = False) -> dict[str, Any]:
        """A part's groups projected (or, without projections, described) and its two table files
        written into the run, or, with ``send_bytes`` (a worker that cannot reach the store's
        folder), returned as bytes for the driver to write. Returns ``{"groups": [each group's
        rows, thumbnails, lost], "files": {relkey: bytes written}, "payload": {relkey: data}}``."""
        if not self.spec.project:
            return {"groups": [self.describe(g) for g in part["groups"]], "files": {}, "payload": {}}
        outs = [self.project(g) for g in part["groups"]]
        tables = [out.pop("tables") for out in outs]
        with tempfile.TemporaryDirectory(prefix="zfatlas-part-") as scratch:
            files = part_files(part["layer"], part["part"], tables, scratch)
            if send_bytes:
                payload = {key: Path(path).read_bytes() for key, path in files.items()}
                return {"groups": outs, "files": {}, "payload": payload}
            return {"groups": outs, "files": upload(self.run, files, threads=len(files)), "payload": {}}

    def describe(self, group: dict[str, Any]) -> dict[str, Any]:
        """Feature rows of a group without projections: the scan's values and receptive boxes, and
        label -1 (labels come from re-reading the images, which this mode skips)."""
        layer = group["layer"]
        rows = []
        for it in group["items"]:
            box = receptive_box(self.network, layer, it[3], it[4], self.image_size)
            rows.append(self._row(layer, it, it[5], -1, box))
        return {"rows": rows, "lost": 0}

    def project(self, group: dict[str, Any]) -> dict[str, Any]:
        """Project a group of whole channels of one layer: every distinct image goes up once,
        every item comes down on its receptive window only (zfcore.deconv.project_windows).
        Returns the feature rows and the layer tables' rows of the group."""
        start = time.perf_counter()
        layer, items = group["layer"], group["items"]
        spatial = self.network.layers(self.image_size)[layer].spatial
        wanted = sorted({it[2] for it in items})
        if self.winners is not None:
            batch = self.winners.read(wanted, self.prefetcher.read)
        else:
            batch = self.prefetcher.read(wanted)
        found = {int(i): n for n, i in enumerate(batch.indices)}
        usable = [it for it in items if it[2] in found]
        # Patches are cut on the host (decoded on the device, the images are a tensor there).
        pixels = batch.images.cpu().numpy() if isinstance(batch.images, torch.Tensor) else batch.images
        live = [it for it in usable if not it[6]]
        images = to_device(batch.images, self.device, self.preprocess) if len(batch.indices) else None
        values = np.zeros(len(live), np.float32)
        crops: list[np.ndarray] = [np.empty(0)] * len(live)
        boxes: list[Any] = [None] * len(live)
        bs = self.spec.resources.batch_size
        # Chunks of items taken in image order, each going up with only its own distinct images:
        # every image goes up about once for the whole group (items of one image share a chunk),
        # not once per chunk, and a chunk's tape holds at most batch_size images.
        order = sorted(range(len(live)), key=lambda n: (found[live[n][2]], n))
        for i in range(0, len(order), bs):
            chunk = order[i : i + bs]
            distinct = sorted({found[live[n][2]] for n in chunk})
            local = {u: j for j, u in enumerate(distinct)}
            out = project_windows(
                self.network, images[distinct], layer, [local[found[live[n][2]]] for n in chunk],
                [live[n][0] for n in chunk],
                positions=[(live[n][3], live[n][4]) for n in chunk] if spatial else None,
            )
            activations = out.activations.float().cpu().numpy()
            windows = out.windows.float().cpu().numpy()
            offsets = out.offsets.cpu().numpy()
            for j, n in enumerate(chunk):
                it = live[n]
                box = receptive_box(self.network, layer, it[3], it[4], self.image_size)
                top, left = box.top - int(offsets[j, 0]), box.left - int(offsets[j, 1])
                values[n] = activations[j]
                crops[n] = windows[j][:, top : top + box.height, left : left + box.width]
                boxes[n] = box

        rows_out = [
            self._row(layer, it, it[5], int(batch.labels[found[it[2]]]),
                      receptive_box(self.network, layer, it[3], it[4], self.image_size))
            for it in usable if it[6]
        ]
        # Column by column, each image and projection a view until one concatenation per column:
        # a group's result crosses Ray as a few large buffers, not thousands of small objects.
        ids: dict[str, list[int]] = {"channel": [], "rank": [], "box_top": [], "box_left": [],
                                     "box_height": [], "box_width": []}
        patches: list[np.ndarray] = []
        shown_all: list[np.ndarray] = []
        raws: list[np.ndarray] = []
        thumbnails = {}
        by_channel: dict[int, list[int]] = {}
        for n, it in enumerate(live):
            by_channel.setdefault(it[0], []).append(n)
        for channel, members in by_channel.items():
            members.sort(key=lambda n: live[n][1])  # by rank
            scale = channel_scale([crops[n] for n in members])
            for n in members:
                it, box, proj = live[n], boxes[n], crops[n]
                image = pixels[found[it[2]]]
                patches.append(image[box.top : box.top + box.height, box.left : box.left + box.width])
                shown_all.append(display(proj, scale))
                raws.append(proj.astype(np.float32, copy=False))
                rows_out.append(self._row(layer, it, float(values[n]), int(batch.labels[found[it[2]]]), box))
                for name, value in (("channel", channel), ("rank", it[1]), ("box_top", box.top),
                                    ("box_left", box.left), ("box_height", box.height),
                                    ("box_width", box.width)):
                    ids[name].append(value)
            thumbnails[channel] = thumbnail(shown_all[-len(members)], SUMMARY_TILE)
        common = {"layer": [layer] * len(patches), "channel": ids["channel"], "rank": ids["rank"]}
        tables = {
            "images": _table(IMAGES_SCHEMA, {
                **common, "height": ids["box_height"], "width": ids["box_width"],
                "patch": binary_column(patches), "projection": binary_column(shown_all),
            }),
            "projections": _table(PROJECTIONS_SCHEMA, {
                **common, **{k: ids[k] for k in ("box_top", "box_left", "box_height", "box_width")},
                "values": list_column(raws, pa.float32()),
            }),
        }
        return {"rows": rows_out, "tables": tables, "thumbnails": thumbnails,
                "lost": len(items) - len(usable), "seconds": time.perf_counter() - start}
