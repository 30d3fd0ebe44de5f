"""Scanning a model over batches of images with streaming top-k: the single-process atlas scan.

The distributed atlas job runs :func:`scan_batches` on each shard and merges the trackers; run
on all data in one process, it is the reference the distributed result must equal.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .model import ZFNet
from .topk import TopKTracker


def layer_shapes(model: ZFNet, layers: list[str], image_size: int) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of each layer's activation for a square input; (F, 1, 1) for fc."""
    param = next(model.parameters())
    with torch.no_grad():
        probe = torch.zeros(1, model.config.in_channels, image_size, image_size, device=param.device)
        acts = model.forward_features(probe, layers)
    return {n: (a.shape[1], *(a.shape[2:] if a.ndim == 4 else (1, 1))) for n, a in acts.items()}


@torch.no_grad()
def scan_batches(
    model: ZFNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    layers: list[str],
    k: int = 9,
    tracker: TopKTracker | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> TopKTracker:
    """Feed (images (B, 3, H, W), global image indices (B,)) batches through ``model`` once each,
    tracking the top-k of every channel of ``layers`` from that single forward pass."""
    for images, indices in batches:
        if tracker is None:
            tracker = TopKTracker(layer_shapes(model, layers, images.shape[-1]), k, images.device)
        if autocast_dtype is None:
            acts = model.forward_features(images, layers)
        else:
            with torch.autocast(images.device.type, dtype=autocast_dtype):
                acts = model.forward_features(images, layers)
        tracker.update(acts, indices)
    if tracker is None:
        raise ValueError("no batches to scan")
    return tracker
