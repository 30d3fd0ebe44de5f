"""Held-out procedural images for the analysis tests: a seed the ``trained_small`` model never saw."""

from __future__ import annotations

import numpy as np
import torch

from zfcore.data import ProceduralDataset, Sample, to_tensor

HELD_OUT_SEED = 7


def held_out(n: int, image_size: int = 64) -> ProceduralDataset:
    return ProceduralDataset(n, image_size, seed=HELD_OUT_SEED)


def of_class(dataset: ProceduralDataset, label: int, count: int) -> list[Sample]:
    """The first ``count`` samples of one class, in index order."""
    found = [dataset[i] for i in range(len(dataset)) if dataset.label(i) == label][:count]
    assert len(found) == count, f"class {label}: only {len(found)} images"
    return found


def stack(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (B, 3, H, W) normalized, labels (B,), boxes (B, 4))."""
    images = to_tensor(np.stack([s.image for s in samples]))
    labels = torch.tensor([s.label for s in samples])
    boxes = torch.tensor([s.box for s in samples])
    return images, labels, boxes
