"""Decoding encoded image bytes into the square RGB uint8 images jobs feed to networks.

An image that cannot be read is reported with its reason, never raised past the source, so one
bad file cannot kill a long job.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def decode_image(data: bytes, size: int, resize: int | None = None) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 RGB: short side resized to ``resize`` (default
    ``size``), then the center square of ``size`` cropped. Raises on bytes that are not a complete
    image."""
    short = resize or size
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (short, short))  # lets JPEG decode at a reduced scale when much larger
        img.load()  # decode fully now, so truncated files fail here rather than later
        return fit_image(img, size, resize)


def decode_or_reason(data: bytes, size: int, resize: int | None = None) -> tuple[np.ndarray | None, str]:
    try:
        return decode_image(data, size, resize), ""
    except Exception as exc:
        # Decoders raise all sorts (OSError, SyntaxError, struct.error, DecompressionBombError...)
        # on bad bytes; whatever it is, it concerns this one image only.
        return None, f"{type(exc).__name__}: {exc}"


def fit_image(img: Image.Image, size: int, resize: int | None = None) -> np.ndarray:
    """Resize the short side of ``img`` to ``resize`` (default ``size``) and crop the center
    ``size`` square, as uint8 RGB."""
    img = img.convert("RGB")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError("empty image")
    short = max(resize or size, size)
    scale = short / min(w, h)
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
