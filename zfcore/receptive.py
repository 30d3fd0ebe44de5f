"""Receptive fields: which input pixels can influence an activation, and crops of them.

Computed from the network's own forward pass, not from a table: one pass of a zero image runs under
a ``TorchFunctionMode`` that follows every tensor's *geometry* from the input to each layer. Along
each axis, position ``i`` of a map sees input pixels ``i * stride + offset`` to
``i * stride + offset + size - 1``:

- a convolution or pool (kernel k, stride s, padding p, dilation d) maps (S, O, R) to
  (s S, O - p S, R + (k - 1) d S); explicit padding shifts the offset;
- an op whose output keeps its inputs' map size (ReLU, BatchNorm, a residual sum, a concatenation
  of channels) sees the union of its inputs' fields: the smallest offset and the furthest end;
- anything that mixes all positions (flatten, a global pool, a fully connected layer, a
  broadcast of a pooled vector over a map) sees the whole image, as do ops whose geometry is not
  an integer stride (upsampling, transposed convolutions, adaptive pools that do not divide evenly).

So the field is exact for the graph: the union over every path from the input to the layer. Boxes
are clipped to the image.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .network import Network, as_network, evaluating, zeros_like_input


@dataclass(frozen=True)
class Box:
    """A box of input pixels: rows top..top+height-1, columns left..left+width-1."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Geometry:
    """Where map position (y, x) looks in the input, per axis (rows, cols); ``whole`` when every
    position sees the whole image."""

    stride: tuple[int, int] = (1, 1)
    offset: tuple[int, int] = (0, 0)
    size: tuple[int, int] = (1, 1)
    whole: bool = False

    def then(self, kernel: Any, stride: Any, padding: Any, dilation: Any = 1) -> Geometry:
        """The geometry after a sliding window (conv or pool) over maps of this geometry."""
        if self.whole:
            return self
        k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
        return Geometry(
            tuple(s[i] * self.stride[i] for i in range(2)),
            tuple(self.offset[i] - p[i] * self.stride[i] for i in range(2)),
            tuple(self.size[i] + (k[i] - 1) * d[i] * self.stride[i] for i in range(2)),
        )

    def union(self, other: Geometry) -> Geometry:
        if self.whole or other.whole or self.stride != other.stride:
            return WHOLE
        lo = tuple(min(self.offset[i], other.offset[i]) for i in range(2))
        hi = tuple(max(self.offset[i] + self.size[i], other.offset[i] + other.size[i]) for i in range(2))
        return Geometry(self.stride, lo, tuple(hi[i] - lo[i] for i in range(2)))

    def box(self, y: int, x: int, image_size: tuple[int, int] | int) -> Box:
        h, w = _pair(image_size)
        if self.whole:
            return Box(0, 0, h, w)
        top = y * self.stride[0] + self.offset[0]
        left = x * self.stride[1] + self.offset[1]
        bottom, right = top + self.size[0] - 1, left + self.size[1] - 1
        top, left = max(top, 0), max(left, 0)
        bottom, right = min(bottom, h - 1), min(right, w - 1)
        return Box(top, left, bottom - top + 1, right - left + 1)


WHOLE = Geometry(whole=True)
IDENTITY = Geometry()


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


_ATTR = "_zfatlas_geometry"
# Matched by identity: what a TorchFunctionMode sees when modules call these (nn.Conv2d calls
# F.conv2d, which is torch.conv2d; nn.MaxPool2d calls F.max_pool2d; ...).
_CONV = (F.conv2d,)
_POOL = (F.max_pool2d, F.avg_pool2d)
_ADAPTIVE = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
_WHOLE_OPS = (F.interpolate, F.conv_transpose2d, F.unfold, F.fold, F.grid_sample)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _hw(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape[-2:]) if t.ndim >= 2 else ()


def _window(func: Any, geo: Geometry, args: tuple, kwargs: dict) -> Geometry:
    """The geometry after a conv or pool call."""
    if func in _CONV:
        kernel = tuple(_arg(args, kwargs, 1, "weight", None).shape[-2:])
        padding = _arg(args, kwargs, 4, "padding", 0)
        dilation = _arg(args, kwargs, 5, "dilation", 1)
        if isinstance(padding, str):  # "valid", or "same" (stride 1): half the dilated kernel before
            d = _pair(dilation)
            padding = (0, 0) if padding == "valid" else tuple(d[i] * (kernel[i] - 1) // 2 for i in range(2))
        return geo.then(kernel, _arg(args, kwargs, 3, "stride", 1), padding, dilation)
    kernel = _arg(args, kwargs, 1, "kernel_size", None)
    stride = _arg(args, kwargs, 2, "stride", None) or kernel
    padding = _arg(args, kwargs, 3, "padding", 0)
    dilation = _arg(args, kwargs, 4, "dilation", 1) if func is F.max_pool2d else 1
    return geo.then(kernel, stride, padding, dilation)


def _adaptive(geo: Geometry, before: tuple[int, ...], after: tuple[int, ...]) -> Geometry:
    if before == after:
        return geo
    if all(a % b == 0 for a, b in zip(before, after, strict=True)):
        step = tuple(a // b for a, b in zip(before, after, strict=True))
        return geo.then(step, step, 0)
    return WHOLE  # uneven windows: no integer stride


def _padded(geo: Geometry, pad: Any) -> Geometry:
    left, _, top, _ = (list(pad) + [0, 0, 0, 0])[:4]
    if geo.whole:
        return geo
    offset = (geo.offset[0] - top * geo.stride[0], geo.offset[1] - left * geo.stride[1])
    return Geometry(geo.stride, offset, geo.size)


class _GeometryTracer(TorchFunctionMode):
    """Follows the :class:`Geometry` of every tensor computed from the traced input."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        inputs = [t for t in leaves if isinstance(t, torch.Tensor) and hasattr(t, _ATTR)]
        outputs = [
            t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.dtype.is_floating_point
        ]
        if not inputs or not outputs:
            return out
        first, geo = inputs[0], getattr(inputs[0], _ATTR)
        if func in _CONV or func in _POOL:
            geo = _window(func, geo, args, kwargs)
        elif func in _ADAPTIVE:
            geo = _adaptive(geo, _hw(first), _hw(outputs[0]))
        elif func is F.pad:
            geo = _padded(geo, _arg(args, kwargs, 1, "pad", ()))
        elif func in _WHOLE_OPS:
            geo = WHOLE
        else:
            # Elementwise and channel ops keep the map: the union of the inputs' fields. A map
            # combined with a pooled vector (squeeze-and-excitation), a flatten or a matrix
            # product mixes every position.
            for other in inputs[1:]:
                geo = geo.union(getattr(other, _ATTR))
            if any(_hw(t) != _hw(first) for t in inputs) or any(
                t.ndim < 3 or _hw(t) != _hw(first) for t in outputs
            ):
                geo = WHOLE
        for t in outputs:
            setattr(t, _ATTR, geo if t.ndim >= 3 else WHOLE)
        return out


_CACHE: weakref.WeakKeyDictionary[Network, dict[int, dict[str, Geometry]]] = weakref.WeakKeyDictionary()


def geometries(model: nn.Module | Network, image_size: int | None = None) -> dict[str, Geometry]:
    """The :class:`Geometry` of every layer of ``model`` (traced once per input size, then cached)."""
    network = as_network(model)
    size = image_size or network.preprocess.image_size
    per_size = _CACHE.setdefault(network, {})
    if size not in per_size:
        x = zeros_like_input(network.module, network.preprocess.channels, size)
        setattr(x, _ATTR, IDENTITY)
        runnable = list(network.layers(size))  # fc layers sized for another input do not run
        with torch.no_grad(), evaluating(network), _GeometryTracer():
            acts = network.features(x, runnable)
        per_size[size] = {name: getattr(a, _ATTR, WHOLE) for name, a in acts.items()}
    return per_size[size]


def receptive_box(
    model: nn.Module | Network, layer: str, y: int, x: int, image_size: tuple[int, int] | int
) -> Box:
    """The input box that can influence activation (y, x) of ``layer``, clipped to the image.

    For layers that mix every position (fully connected ones) the box is the whole image.
    """
    network = as_network(model)
    network.check_layers([layer])
    side = _pair(image_size)[0]
    return geometries(network, side)[layer].box(y, x, image_size)


def receptive_boxes(
    model: nn.Module | Network,
    layer: str,
    positions: np.ndarray | torch.Tensor,
    image_size: tuple[int, int] | int,
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
