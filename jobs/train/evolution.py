"""Feature evolution during training (paper Fig. 4).

At chosen epochs, for a few channels of every conv layer, the strongest activation over a fixed
probe set is found and projected to pixels with the deconvnet; the projection, cropped to its
receptive field, is stored as one PNG per (layer, channel, epoch). At the end, each channel's
PNGs become one strip (epochs left to right) and each layer one panel (a row per channel), read
back from the store, so a run that was interrupted and resumed still gets every epoch.

Layout in the run::

    evolution/<layer>/<channel:04d>/epoch-<epoch:04d>.png
    evolution/<layer>/<channel:04d>/strip.png
    evolution/<layer>.png
"""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from jobs.atlas.tables import POSITION_FIELDS
from jobs.rendering.images import display, enlarge_together, grid
from jobs.store import RunWriter
from zfcore.deconv import deconvolve
from zfcore.network import Network, as_network
from zfcore.receptive import receptive_box
from zfcore.scan import scan_batches

EVOLUTION_SCHEMA = pa.schema(
    [
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("activation", pa.float32(), nullable=False),
        *POSITION_FIELDS,
        pa.field("projection_key", pa.string(), nullable=False),
    ]
)


def select_channels(network: nn.Module | Network, per_layer: int) -> dict[str, list[int]]:
    """``per_layer`` channels of every conv layer, evenly spaced over its channels."""
    out = {}
    info = as_network(network).layers()
    for name in as_network(network).spatial_layers():
        count = info[name].channels
        picks = np.linspace(0, count - 1, min(per_layer, count)).round().astype(int)
        out[name] = sorted({int(c) for c in picks})
    return out


@torch.no_grad()
def snapshot(
    network: nn.Module,
    probe: torch.Tensor,
    probe_ids: list[str],
    probe_indices: list[int],
    channels: dict[str, list[int]],
    batch_size: int,
) -> list[tuple[dict, np.ndarray]]:
    """For every selected channel: its strongest activation over ``probe`` (B, 3, H, W) as a table
    row (without ``epoch`` and ``projection_key``) and its projection as a uint8 (h, w, 3) tile."""
    was_training = network.training
    network.eval()
    try:
        rows = torch.arange(len(probe), device=probe.device)
        batches = [(probe[i : i + batch_size], rows[i : i + batch_size])
                   for i in range(0, len(probe), batch_size)]
        best = scan_batches(network, batches, list(channels), k=1).results()
        out = []
        for layer, chans in channels.items():
            top = best[layer]
            ys, xs = top.positions_yx()
            picked = [int(top.image_index[c, 0]) for c in chans]
            positions = [(int(ys[c, 0]), int(xs[c, 0])) for c in chans]
            proj = deconvolve(network, probe[picked], layer, chans, positions)
            projections = proj.projections.float().cpu().numpy()
            for j, (c, row, (y, x)) in enumerate(zip(chans, picked, positions, strict=True)):
                box = receptive_box(network, layer, y, x, probe.shape[-1])
                crop = projections[j][:, box.top : box.top + box.height, box.left : box.left + box.width]
                out.append((
                    {
                        "layer": layer, "channel": c, "image_index": int(probe_indices[row]),
                        "image_id": probe_ids[row], "activation": float(proj.activations[j]),
                        "y": y, "x": x, "box_top": box.top, "box_left": box.left,
                        "box_height": box.height, "box_width": box.width,
                    },
                    display(crop),
                ))
        return out
    finally:
        network.train(was_training)


DISPLAY_SIDE = 48  # strips and panels enlarge small tiles (conv1's are 7px) to about this size


def _read_png(run: RunWriter, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(run.store.get_bytes(key))).convert("RGB"))


def _base(layer: str, channel: int) -> str:
    return f"evolution/{layer}/{channel:04d}"


def write_snapshot(run: RunWriter, epoch: int, items: list[tuple[dict, np.ndarray]]) -> list[dict]:
    """Store one epoch's tiles; returns the complete :data:`EVOLUTION_SCHEMA` rows."""
    rows = []
    for row, tile in items:
        key = run.put_png(f"{_base(row['layer'], row['channel'])}/epoch-{epoch:04d}.png", tile)
        rows.append({"epoch": epoch, **row, "projection_key": key})
    return rows


def write_strips(run: RunWriter, rows: list[dict]) -> dict[str, str]:
    """One strip per channel (epochs left to right) and one panel per layer (a row per channel),
    from the tiles already in the store. Returns {layer: panel key}."""
    by_layer: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_layer[row["layer"]][row["channel"]].append(row)
    epochs = sorted({r["epoch"] for r in rows})
    panels = {}
    for layer, channels in by_layer.items():
        loaded = {(c, r["epoch"]): _read_png(run, r["projection_key"])
                  for c, entries in channels.items() for r in entries}
        big = dict(zip(loaded, enlarge_together(list(loaded.values()), DISPLAY_SIDE), strict=True))
        cell = (max(t.shape[0] for t in big.values()), max(t.shape[1] for t in big.values()))
        blank = np.full((1, 1, 3), 255, np.uint8)
        panel = []
        for channel in sorted(channels):
            strip = [big.get((channel, e), blank) for e in epochs]
            run.put_png(f"{_base(layer, channel)}/strip.png", grid(strip, columns=len(epochs), cell=cell))
            panel.extend(strip)
        panels[layer] = run.put_png(f"evolution/{layer}.png", grid(panel, columns=len(epochs), cell=cell))
    return panels
