"""Receptive fields: which input pixels can influence an activation, and crops of them.

Computed from the model's own modules (each conv's and pool's kernel, stride and padding on the
path to the layer), not from a table, so it holds for every config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .model import ZFNet


@dataclass(frozen=True)
class Box:
    """A box of input pixels: rows top..top+height-1, columns left..left+width-1."""

    top: int
    left: int
    height: int
    width: int


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def spatial_path(model: ZFNet, layer: str) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """(kernel, stride, padding), each a (rows, cols) pair, of every conv and pool below
    ``layer``'s activation, input first (for an fc layer: the whole feature stack)."""
    target = model.activation_module(layer)
    path = []
    for module in model.features.children():
        if isinstance(module, nn.Conv2d | nn.MaxPool2d):
            path.append((_pair(module.kernel_size), _pair(module.stride), _pair(module.padding)))
        if module is target:
            return path
    return path  # fc layer: the whole feature stack


def receptive_box(model: ZFNet, layer: str, y: int, x: int, image_size: tuple[int, int] | int) -> Box:
    """The input box that can influence activation (y, x) of ``layer``, clipped to the image.

    For fc layers the box is the whole image.
    """
    h, w = _pair(image_size)
    if layer.startswith("fc"):
        return Box(0, 0, h, w)
    lo = [y, x]
    hi = [y, x]
    for (k, s, p) in reversed(spatial_path(model, layer)):
        for d in range(2):
            lo[d] = lo[d] * s[d] - p[d]
            hi[d] = hi[d] * s[d] - p[d] + k[d] - 1
    top, left = max(lo[0], 0), max(lo[1], 0)
    bottom, right = min(hi[0], h - 1), min(hi[1], w - 1)
    return Box(top, left, bottom - top + 1, right - left + 1)


def receptive_boxes(
    model: ZFNet, layer: str, positions: np.ndarray | torch.Tensor, image_size: tuple[int, int] | int
) -> np.ndarray:
    """Boxes for many (y, x) positions: (N, 2) -> (N, 4) int64 (top, left, height, width)."""
    pos = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    return np.array(
        [list(vars(receptive_box(model, layer, int(py), int(px), image_size)).values()) for py, px in pos],
        dtype=np.int64,
    ).reshape(-1, 4)


def crop(image: np.ndarray | torch.Tensor, box: Box) -> np.ndarray | torch.Tensor:
    """The box of an image, channels-last (H, W, ...) for numpy, channels-first (C, H, W) for
    tensors (the layouts of decoded images and of projections)."""
    if isinstance(image, torch.Tensor):
        return image[..., box.top : box.top + box.height, box.left : box.left + box.width]
    return image[box.top : box.top + box.height, box.left : box.left + box.width]
