"""Decoding a batch's JPEGs on the worker's GPU (nvJPEG through ``torchvision.io.decode_jpeg``, one
batched call), resized and center-cropped there, so a GPU is not fed by a few decoding cores.

Only JPEGs go to the device: other formats, and JPEGs the device decoder refuses (CMYK, progressive
ones some nvJPEG versions reject, corrupt ones), are decoded by the source on the CPU exactly as
:meth:`ImageSource.read` does, and a corrupt image is skipped with the CPU decoder's reason. The
geometry is the CPU path's (short side to ``resize``, center crop); the pixels differ slightly from
it (another IDCT, antialiased bilinear resampling in float, no DCT-domain downscaling), which is
why this path is chosen explicitly. The images come back as one (B, H, W, 3) uint8 tensor on the
device. It also runs on ``device="cpu"``, which is how it is tested where there is no GPU.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jobs.datasets.base import Batch, Encoded, ImageSource, decode_items
from jobs.datasets.decode import fit_geometry

log = logging.getLogger(__name__)


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def fit_tensor(image: torch.Tensor, size: int, resize: int | None = None) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8 with :func:`jobs.datasets.decode.fit_image`'s
    geometry: short side to ``resize`` (default ``size``), center square of ``size``."""
    h, w = int(image.shape[1]), int(image.shape[2])
    nw, nh, left, top = fit_geometry(w, h, size, resize)
    if (nw, nh) != (w, h):
        resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True,
                                align_corners=False)
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return image[:, top : top + size, left : left + size].permute(1, 2, 0)


def _decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs for torchcodec's; they still work, and this
        # is the one place that uses them.
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return _decode_with(decode_jpeg, ImageReadMode.RGB, datas, device)


def _decode_with(
    decode_jpeg: Any, rgb: Any, datas: list[bytes], device: torch.device
) -> list[torch.Tensor | None]:
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(tensors, mode=rgb, device=device))
    except RuntimeError:
        # One bad JPEG fails the batched call: find it (and let the CPU decoder say why).
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=rgb, device=device))
            except RuntimeError:
                out.append(None)
        return out


def read_on_device(
    source: ImageSource, indices: Sequence[int], device: torch.device, pool: Executor | None = None
) -> Batch:
    """The batch ``source.read(indices)`` gives, with its JPEGs decoded on ``device`` (see the
    module) and its images a tensor on ``device``."""
    items: list[Encoded] = source.fetch(source._check(indices))
    jpegs = [k for k, item in enumerate(items) if item.data is not None and is_jpeg(item.data)]
    on_device: dict[int, torch.Tensor] = {}
    if jpegs:
        decoded = _decode_jpegs([items[k].data for k in jpegs], device)  # type: ignore[misc]
        for k, image in zip(jpegs, decoded, strict=True):
            if image is not None and image.shape[1] > 0 and image.shape[2] > 0:
                on_device[k] = fit_tensor(image, source.image_size, source.resize)
    rest = [k for k in range(len(items)) if k not in on_device]
    on_cpu = dict(zip(rest, decode_items(source, [items[k] for k in rest], pool), strict=True))
    images, labels, kept, skipped = [], [], [], []
    for k, item in enumerate(items):
        if k in on_device:
            images.append(on_device[k])
        else:
            image, reason = on_cpu[k]
            if image is None:
                image_id = source.image_id(item.index)
                log.warning("skipping unreadable image %s: %s", image_id, reason)
                skipped.append((image_id, reason))
                continue
            images.append(torch.from_numpy(image.copy()).to(device))  # PIL's arrays are read-only
        labels.append(item.label)
        kept.append(item.index)
    size = source.image_size
    stacked = torch.stack(images) if images else torch.zeros((0, size, size, 3), dtype=torch.uint8,
                                                              device=device)
    return Batch(images=stacked, labels=np.array(labels, np.int64), indices=np.array(kept, np.int64),  # type: ignore[arg-type]
                 skipped=skipped)
