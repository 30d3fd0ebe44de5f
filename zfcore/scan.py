"""Scanning a model over batches of images with streaming top-k: the single-process atlas scan.

The distributed atlas job runs :func:`scan_batches` on each shard and merges the trackers; run
on all data in one process, it is the reference the distributed result must equal.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .network import Network, as_network
from .topk import TopKTracker


def layer_shapes(
    model: nn.Module | Network, layers: list[str], image_size: int
) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of each layer's activation for a square input; (F, 1, 1) for
    vector layers."""
    info = as_network(model).layers(image_size)
    return {name: info[name].shape for name in layers}


@torch.no_grad()
def scan_batches(
    model: nn.Module | Network,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    layers: list[str],
    k: int = 9,
    tracker: TopKTracker | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> TopKTracker:
    """Feed (images (B, 3, H, W), global image indices (B,)) batches through ``model`` once each,
    tracking the top-k of every channel of ``layers`` from that single forward pass."""
    network = as_network(model)
    for images, indices in batches:
        if tracker is None:
            tracker = TopKTracker(layer_shapes(network, layers, images.shape[-1]), k, images.device)
        if autocast_dtype is None:
            acts = network.features(images, layers)
        else:
            with torch.autocast(images.device.type, dtype=autocast_dtype):
                acts = network.features(images, layers)
        tracker.update(acts, indices)
    if tracker is None:
        raise ValueError("no batches to scan")
    return tracker
