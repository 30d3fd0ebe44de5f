"""Decoding encoded image bytes into the square RGB uint8 images jobs feed to networks.

An image that cannot be read is reported with its reason, never raised past the source, so one
bad file cannot kill a long job.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 RGB: short side resized to ``size``, then the
    center square cropped. Raises on bytes that are not a complete image."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (size, size))  # lets JPEG decode at a reduced scale when much larger
        img.load()  # decode fully now, so truncated files fail here rather than later
        return fit_image(img, size)


def decode_or_reason(data: bytes, size: int) -> tuple[np.ndarray | None, str]:
    try:
        return decode_image(data, size), ""
    except Exception as exc:
        # Decoders raise all sorts (OSError, SyntaxError, struct.error, DecompressionBombError...)
        # on bad bytes; whatever it is, it concerns this one image only.
        return None, f"{type(exc).__name__}: {exc}"


def fit_image(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side of ``img`` to ``size`` and crop the center square, as uint8 RGB."""
    img = img.convert("RGB")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError("empty image")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
