"""A plain PyTorch training step and loop for ZFNet configs.

This is the step the distributed trainer runs inside each Ray Train worker, and the baseline its
benchmark compares against: the paper's recipe (SGD, momentum 0.9, filter renormalization after
each step, random crops and flips) without any distribution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ProceduralDataset, to_tensor
from .renorm import DEFAULT_RADIUS, renormalize_filters

log = logging.getLogger(__name__)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Random crop (after reflect-padding by ``pad`` pixels) and horizontal flip, per image.

    The paper takes random 224 crops of 256 images (pad = 1/16 of the side); the same proportion is
    used for small configs. images: (B, 3, H, W) -> (B, 3, H, W).
    """
    b, _, h, w = images.shape
    pad = max(1, h // 16) if pad is None else pad
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(b):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    renorm_radius: float | None = DEFAULT_RADIUS,
) -> float:
    """One SGD step, then filter renormalization. Returns the batch loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    if renorm_radius is not None:
        renormalize_filters(model, renorm_radius)
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> dict:
    """Top-1 and top-5 error (fractions) and mean loss on a labelled tensor set."""
    model.eval()
    losses, top1, top5 = [], 0, 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size])
        y = labels[i : i + batch_size]
        losses.append(float(F.cross_entropy(logits, y, reduction="sum")))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((top[:, 0] == y).sum())
        top5 += int((top == y[:, None]).any(dim=1).sum())
    n = len(images)
    return {"loss": sum(losses) / n, "top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n}


@dataclass
class FitResult:
    steps: int
    losses: list[float]
    val: dict


def fit_procedural(
    model: nn.Module,
    dataset: ProceduralDataset,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    renorm_radius: float | None = DEFAULT_RADIUS,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> FitResult:
    """Train ``model`` on a procedural dataset with a plain loop (the demo's and tests' trainer).

    The whole dataset is materialized as one tensor: procedural sets are small by design.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images_u8, labels_np = dataset.batch(range(len(dataset)))
    images, labels = to_tensor(images_u8), torch.from_numpy(labels_np)
    n_val = max(1, int(len(dataset) * val_fraction))
    train_x, train_y = images[n_val:], labels[n_val:]
    val_x, val_y = images[:n_val], labels[:n_val]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses: list[float] = []
    steps = 0
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            batch = augment(train_x[idx], gen)
            losses.append(train_step(model, optimizer, batch, train_y[idx], renorm_radius))
            steps += 1
        val = evaluate(model, val_x, val_y)
        log.info("epoch %d: train loss %.3f, val top-1 error %.3f", epoch + 1, np.mean(losses[-20:]),
                 val["top1_error"])
    return FitResult(steps, losses, evaluate(model, val_x, val_y))
