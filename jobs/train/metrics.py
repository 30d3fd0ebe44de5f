"""What training measures every epoch, and the Parquet tables it goes into.

- ``metrics.parquet``: one row per epoch (loss, top-1/top-5 train and validation error, images/s,
  learning rate, and the two symptoms the paper's renormalization is for: conv1 filters pinned at
  the radius and channels that never activate on the probe set).
- ``layers.parquet``: the same filter statistics per conv layer and epoch.

Train error counts the training batches as they were stepped on (augmented, dropout on), summed
over all workers; validation error is the held-out split in eval mode, each worker scoring its
share. Sums cross workers with ``torch.distributed`` when it is initialized (Ray Train sets it up).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from jobs.runtime.device import to_device
from jobs.train.data import ShardReader
from jobs.train.step import StepResult
from zfcore.network import Network, Preprocess, as_network
from zfcore.renorm import DEFAULT_RADIUS, filter_rms, fraction_at_radius
from zfcore.training import evaluate

METRICS_SCHEMA = pa.schema(
    [
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("lr", pa.float64(), nullable=False),
        pa.field("train_loss", pa.float64(), nullable=False),
        pa.field("train_top1_error", pa.float64(), nullable=False),
        pa.field("train_top5_error", pa.float64(), nullable=False),
        pa.field("val_loss", pa.float64(), nullable=True),
        pa.field("val_top1_error", pa.float64(), nullable=True),
        pa.field("val_top5_error", pa.float64(), nullable=True),
        pa.field("images", pa.int64(), nullable=False),
        pa.field("epoch_s", pa.float64(), nullable=False),
        pa.field("images_per_s", pa.float64(), nullable=False),
        pa.field("filters_rescaled", pa.int64(), nullable=False),
        pa.field("conv1_at_radius", pa.float64(), nullable=False),
        pa.field("dead_channels", pa.float64(), nullable=False),
    ]
)

LAYERS_SCHEMA = pa.schema(
    [
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channels", pa.int32(), nullable=False),
        pa.field("dead_fraction", pa.float64(), nullable=False),
        pa.field("at_radius_fraction", pa.float64(), nullable=False),
        pa.field("rms_mean", pa.float64(), nullable=False),
        pa.field("rms_max", pa.float64(), nullable=False),
    ]
)


def all_reduce(values: Iterable[float], device: torch.device, op: str = "sum") -> list[float]:
    """``values`` summed (or maxed) over all workers; unchanged in a single process."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


@dataclass
class EpochMeter:
    """Sums of one worker's training steps in an epoch."""

    loss_sum: float = 0.0
    images: int = 0
    top1: int = 0
    top5: int = 0
    rescaled: int = 0

    def add(self, result: StepResult) -> None:
        self.loss_sum += result.loss * result.images
        self.images += result.images
        self.top1 += result.top1
        self.top5 += result.top5
        self.rescaled += result.rescaled

    def totals(self, device: torch.device) -> dict[str, float]:
        """Loss and errors over every worker's images this epoch."""
        loss_sum, images, top1, top5 = all_reduce(
            [self.loss_sum, self.images, self.top1, self.top5], device
        )
        n = max(images, 1.0)
        return {
            "train_loss": loss_sum / n,
            "train_top1_error": 1 - top1 / n,
            "train_top5_error": 1 - top5 / n,
            "images": int(images),
            # Every worker applies the same renormalization to the same weights: rank 0's count.
            "filters_rescaled": self.rescaled,
        }


def validate(
    forward: nn.Module,
    reader: ShardReader,
    batch_size: int,
    device: torch.device,
    preprocess: Preprocess | None = None,
) -> dict[str, float | None]:
    """Validation loss and errors over every worker's share (None without a validation split)."""
    loss_sum = top1 = top5 = n = 0.0
    if len(reader):
        order = np.arange(len(reader))
        for images, labels in reader.batches(order, batch_size):
            x = to_device(images, device, preprocess)
            y = torch.from_numpy(labels).to(device)
            out = evaluate(forward, x, y, batch_size)
            k = len(labels)
            loss_sum += out["loss"] * k
            top1 += round((1 - out["top1_error"]) * k)
            top5 += round((1 - out["top5_error"]) * k)
            n += k
    loss_sum, top1, top5, n = all_reduce([loss_sum, top1, top5, n], device)
    if n == 0:
        return {"val_loss": None, "val_top1_error": None, "val_top5_error": None}
    return {"val_loss": loss_sum / n, "val_top1_error": 1 - top1 / n, "val_top5_error": 1 - top5 / n}


@torch.no_grad()
def layer_stats(
    network: nn.Module | Network, probe: torch.Tensor, radius: float | None, batch_size: int
) -> list[dict]:
    """Per conv layer: channels whose activation is never positive on the probe images, filters
    whose RMS sits at the renormalization radius (the paper's 0.1 when renormalization is off),
    and the filters' RMS."""
    net = as_network(network)
    convs = net.layer_convs()
    layers = list(convs)
    was_training = net.module.training
    net.module.eval()
    peak: dict[str, torch.Tensor] = {}
    for i in range(0, len(probe), batch_size):
        acts = net.features(probe[i : i + batch_size], layers)
        for name, a in acts.items():
            m = a.float().amax(dim=(0, 2, 3))
            peak[name] = m if name not in peak else torch.maximum(peak[name], m)
    net.module.train(was_training)
    rows = []
    for name in layers:
        conv = convs[name]
        rms = filter_rms(conv.weight)
        rows.append({
            "layer": name,
            "channels": int(conv.out_channels),
            "dead_fraction": float((peak[name] <= 0).float().mean()) if name in peak else 0.0,
            "at_radius_fraction": fraction_at_radius(conv, radius or DEFAULT_RADIUS),
            "rms_mean": float(rms.mean()),
            "rms_max": float(rms.max()),
        })
    return rows


def filter_summary(rows: list[dict]) -> dict[str, float]:
    """The per-epoch columns of :data:`METRICS_SCHEMA` from :func:`layer_stats` rows."""
    channels = sum(r["channels"] for r in rows)
    dead = sum(r["dead_fraction"] * r["channels"] for r in rows)
    first = rows[0] if rows else {"at_radius_fraction": 0.0}
    return {"conv1_at_radius": first["at_radius_fraction"], "dead_channels": dead / max(channels, 1)}
