"""Pictures made of arrays: projections for display, grids of tiles, enlarged and thumbnail tiles.

Every function takes and returns uint8 (H, W, 3) RGB arrays (projections: float (3, h, w)); they
are what the atlas, training's feature evolution and the analyses draw, and exist once here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def display(projection: np.ndarray, scale: float | None = None) -> np.ndarray:
    """A projection (3, h, w) as a uint8 (h, w, 3) image: zero is mid-grey, a magnitude of
    ``scale`` (default: the projection's largest) reaches black or white, larger ones clip (the
    paper's contrast-normalized display)."""
    scale = float(np.abs(projection).max()) if scale is None else float(scale)
    img = 0.5 + 0.5 * projection / scale if scale > 0 else np.full_like(projection, 0.5)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


def grid(
    tiles: list[np.ndarray], columns: int = 3, pad: int = 2, cell: tuple[int, int] | None = None
) -> np.ndarray:
    """uint8 (h, w, 3) tiles in a grid on a white background (the paper's Fig. 2 3x3 blocks).
    Tiles smaller than the cell (boxes clipped at the image border) are centred in it."""
    ch = cell[0] if cell else max(t.shape[0] for t in tiles)
    cw = cell[1] if cell else max(t.shape[1] for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    out = np.full((rows * (ch + pad) + pad, columns * (cw + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        top = pad + r * (ch + pad) + (ch - t.shape[0]) // 2
        left = pad + c * (cw + pad) + (cw - t.shape[1]) // 2
        out[top : top + t.shape[0], left : left + t.shape[1]] = t
    return out


def enlarge(image: np.ndarray, min_side: int) -> np.ndarray:
    """Repeat pixels by the smallest integer factor that makes the short side >= ``min_side``."""
    return _repeat(image, max(1, -(-min_side // min(image.shape[:2]))))


def enlarge_together(tiles: list[np.ndarray], side: int) -> list[np.ndarray]:
    """Tiles scaled up by the same whole factor (nearest neighbour) so the largest is at least
    ``side`` pixels: small tiles (conv1's are 7px) become viewable, and stay comparable."""
    factor = max(1, -(-side // max(max(t.shape[:2]) for t in tiles)))
    return [_repeat(t, factor) for t in tiles]


def _repeat(image: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def thumbnail(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` resized (bilinear) to fit side x side with its aspect kept, centred on white (a
    receptive field clipped at the image border stays the shape it is)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    out = np.full((side, side, 3), 255, np.uint8)
    top, left = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return out


def image_row(images: Sequence[np.ndarray], pad: int = 2, scale: int = 2) -> np.ndarray:
    """uint8 (h, w, 3) images side by side on white, each enlarged ``scale`` times (nearest)."""
    tiles = [enlarge(im, im.shape[0] * scale) for im in images]
    h = max(t.shape[0] for t in tiles)
    w = sum(t.shape[1] for t in tiles) + pad * (len(tiles) + 1)
    out = np.full((h + 2 * pad, w, 3), 255, np.uint8)
    left = pad
    for t in tiles:
        out[pad : pad + t.shape[0], left : left + t.shape[1]] = t
        left += t.shape[1] + pad
    return out
