"""Decoding encoded image bytes into the square RGB uint8 images jobs feed to networks.

An image that cannot be read is reported with its reason, never raised past the source, so one
bad file cannot kill a long job.

Images of more than 8 bits are brought to 8 by their value range, not clipped (PIL's own
conversion clips 16-bit values at 255, which makes them almost pure white):

- integer greyscale (PIL modes ``I;16*`` and ``I``: 16-bit PNG and TIFF, 32-bit TIFF): the full
  scale is that of the image's actual bit depth, the fewest bits (at least 8) that hold its
  largest value, so a 12-bit scan stored in 16 bits maps 4095 to 255 and a 16-bit one 65535 to
  255; negative values are 0. One scale per image, never a per-image contrast stretch of an
  8-bit-range image.
- float greyscale (mode ``F``, float TIFF): values in [0, 1] are intensities (1.0 is 255);
  anything else is mapped linearly from [min(0, lowest), highest] to [0, 255]. An image with NaN
  or infinite values is skipped with that reason.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
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
        # on bad bytes; whatever it is, it concerns this one image only. The reason goes into the
        # manifest, which must be reproducible: no object addresses ("<_io.BytesIO object at 0x..>").
        return None, f"{type(exc).__name__}: {_ADDRESS.sub('', str(exc)).strip()}"


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_eight_bits(img: Image.Image) -> Image.Image:
    """A greyscale image of more than 8 bits (modes ``I;16*``, ``I``, ``F``) as an 8-bit ``L``
    image scaled by its value range (see the module's docstring); any other image unchanged."""
    if img.mode not in HIGH_DEPTH_MODES and img.mode != "F":
        return img
    values = np.asarray(img)
    if img.mode == "F":
        values = values.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("float image with NaN or infinite values")
        low = min(0.0, float(values.min())) if values.size else 0.0
        high = float(values.max()) if values.size else 1.0
        high = 1.0 if low == 0.0 and high <= 1.0 else high
    else:
        values = np.maximum(values.astype(np.int64), 0)
        top = int(values.max()) if values.size else 0
        low, high = 0.0, float((1 << max(8, top.bit_length())) - 1)
    if high <= low:
        scaled = np.zeros(values.shape, np.uint8)
    else:
        scaled = np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def fit_geometry(w: int, h: int, size: int, resize: int | None = None) -> tuple[int, int, int, int]:
    """Where an image of ``w`` x ``h`` goes: (new width, new height, left, top) for its short side
    resized to ``resize`` (default ``size``) and the center ``size`` square cut. One geometry for
    the CPU decoder and the device one (:mod:`jobs.datasets.device_decode`)."""
    if w < 1 or h < 1:
        raise ValueError("empty image")
    short = max(resize or size, size)
    scale = short / min(w, h)
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def fit_image(img: Image.Image, size: int, resize: int | None = None) -> np.ndarray:
    """Resize the short side of ``img`` to ``resize`` (default ``size``) and crop the center
    ``size`` square, as uint8 RGB."""
    img = to_eight_bits(img).convert("RGB")
    w, h = img.size
    nw, nh, left, top = fit_geometry(w, h, size, resize)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
