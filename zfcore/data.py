"""The procedural dataset and image <-> tensor conversion.

Images are drawn on the fly from (seed, index), so any shard of any size can be produced anywhere
without files: image ``i`` is identical on every machine. Ten classes of shapes and textures with
random colour, size and position on a noisy background, which a small CNN learns in minutes. Every
image also knows its object's box, so analyses can tell object from background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

CLASS_NAMES = (
    "disk",
    "square",
    "triangle",
    "ring",
    "cross",
    "hstripes",
    "vstripes",
    "dstripes",
    "checker",
    "dots",
)

# Inputs are scaled to roughly [-2, 2] per channel. The paper subtracts a per-pixel mean from
# [0, 255] pixels; a fixed mean/std keeps the procedural images, ImageFolder and Parquet data on
# one scale without a dataset pass, and keeps conv1 filter RMS well under the 0.1 radius at init.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_tensor(
    images: np.ndarray | torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> normalized float tensor (B, 3, H, W), on the input's device
    (so a GPU worker copies uint8 and normalizes on the GPU). ``mean``/``std``: per channel, of
    [0, 1] pixels (the network's preprocessing; default the project's, ImageNet's)."""
    t = torch.as_tensor(images)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    t = t.permute(0, 3, 1, 2).float().div_(255.0)
    c = t.shape[1]
    m = torch.tensor(mean, dtype=t.dtype, device=t.device).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=t.dtype, device=t.device).view(1, c, 1, 1)
    return (t - m) / s


def to_uint8(tensor: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> np.ndarray:
    """Inverse of :func:`to_tensor`: (B, 3, H, W) normalized -> uint8 (B, H, W, 3)."""
    t = tensor.detach().float().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    c = t.shape[1]
    mean = torch.tensor(mean).view(1, c, 1, 1)
    std = torch.tensor(std).view(1, c, 1, 1)
    t = (t * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return t.permute(0, 2, 3, 1).numpy()


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    label: int
    box: tuple[int, int, int, int]  # object (top, left, height, width) in pixels


class ProceduralDataset:
    """``num_images`` deterministic images of ``image_size`` pixels; image i depends only on
    (seed, i). Image ids are ``proc-{i:08d}``, so the id order is the index order."""

    num_classes = len(CLASS_NAMES)

    def __init__(self, num_images: int = 2000, image_size: int = 64, seed: int = 0) -> None:
        if num_images < 1 or image_size < 16:
            raise ValueError("need num_images >= 1 and image_size >= 16")
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_images

    def image_id(self, index: int) -> str:
        return f"proc-{index:08d}"

    def label(self, index: int) -> int:
        # Balanced classes, shuffled by seed: the label does not follow the index pattern.
        rng = np.random.default_rng([self.seed, index, 1])
        return int(rng.integers(self.num_classes))

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        return draw(self.label(index), self.image_size, np.random.default_rng([self.seed, index, 2]))

    def batch(self, indices: list[int] | range) -> tuple[np.ndarray, np.ndarray]:
        """(B, H, W, 3) uint8 images and (B,) int64 labels."""
        samples = [self[i] for i in indices]
        return np.stack([s.image for s in samples]), np.array([s.label for s in samples], np.int64)


def draw(label: int, size: int, rng: np.random.Generator) -> Sample:
    """Draw one image of class ``label``: a textured background and one object on it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(0.2, 0.8, 3)
    tilt = rng.uniform(-0.15, 0.15, (2, 3))
    bg = base + tilt[0] * (yy[..., None] / size - 0.5) + tilt[1] * (xx[..., None] / size - 0.5)
    bg = bg + rng.normal(0, 0.04, (size, size, 3))

    # Object colour far from the background colour so the object is always visible.
    colour = rng.uniform(0, 1, 3)
    while np.abs(colour - base).max() < 0.35:
        colour = rng.uniform(0, 1, 3)

    side = int(rng.integers(int(size * 0.35), int(size * 0.6) + 1))
    top = int(rng.integers(0, size - side + 1))
    left = int(rng.integers(0, size - side + 1))
    # Coordinates inside the object's box, in [-1, 1].
    v = (yy - top - side / 2 + 0.5) / (side / 2)
    u = (xx - left - side / 2 + 0.5) / (side / 2)
    inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    r = np.sqrt(u**2 + v**2)
    period = rng.uniform(0.35, 0.6)  # stripe period in box units
    name = CLASS_NAMES[label]
    if name == "disk":
        mask = r <= 1
    elif name == "square":
        mask = inside & (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    elif name == "triangle":
        mask = inside & (v >= -0.9) & (v <= 0.9) & (np.abs(u) <= (v + 0.9) / 1.8)
    elif name == "ring":
        mask = (r <= 1) & (r >= 0.55)
    elif name == "cross":
        mask = inside & ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3))
    elif name == "hstripes":
        mask = inside & (np.mod(v, period) < period / 2)
    elif name == "vstripes":
        mask = inside & (np.mod(u, period) < period / 2)
    elif name == "dstripes":
        mask = inside & (np.mod(u + v, period * 1.4) < period * 0.7)
    elif name == "checker":
        mask = inside & ((np.floor(u / period) + np.floor(v / period)) % 2 == 0)
    elif name == "dots":
        cu = np.mod(u, period) - period / 2
        cv = np.mod(v, period) - period / 2
        mask = inside & (np.sqrt(cu**2 + cv**2) <= period * 0.3)
    else:  # pragma: no cover - CLASS_NAMES and the branches are one list
        raise ValueError(label)
    img = np.where(mask[..., None], colour, bg)
    img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return Sample(img, label, (top, left, side, side))
