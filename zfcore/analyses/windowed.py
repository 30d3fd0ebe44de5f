"""Forward passes of occluded copies that recompute the first layers only where the square
changes them.

A square of ``size`` pixels changes a convolution's (or pooling's) output only where its kernels
overlap the square, and the changed region grows layer by layer by each kernel's reach. For the
first local layers of a network (convolutions, max pooling, ReLU, LRN, eval BatchNorm: ops whose
output at a position depends on a bounded neighbourhood of the input) a copy's activations are
therefore the unoccluded image's everywhere except in one window per layer. :class:`WindowedPrefix`
computes that window only (one batched op per layer on same-sized crops, the true image borders
padded as the op pads them: zeros for convolutions, -inf for max pooling) and pastes it into the
unoccluded output of the prefix's last layer. Deeper layers run as usual.

Which layers form the prefix: on a plain chain of modules (:meth:`zfcore.network.Network.chain`,
e.g. ZFNet) the local layers from the input while the window stays under half the map (and never
past the layer whose activations are asked for); on any other network, its first convolution when
the network applies it to the input tensor itself. The results equal full forward passes.

Shapes: images (B, 3, H, W); tops, lefts (B,): each copy's square; maps (B, C, h, w).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..network import Network

MAX_WINDOW_SHARE = 0.5  # stop windowing once a layer's window covers more of its map than this


@dataclass(frozen=True)
class _Reach:
    """How a local op's output position depends on its input along one axis: output o reads
    input [o*stride - pad, o*stride - pad + span - 1]."""

    span: int  # dilation * (kernel - 1) + 1
    stride: int
    pad: int


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _reach(module: nn.Module) -> tuple[_Reach, _Reach] | None:
    """(rows, columns) reach of a local op; None if the module is not one this module windows."""
    if isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d and module.padding_mode == "zeros":
        if isinstance(module.padding, str):
            return None
        k, s, p, d = (_pair(x) for x in (module.kernel_size, module.stride, module.padding, module.dilation))
    elif type(module) is nn.MaxPool2d and not module.ceil_mode and not module.return_indices:
        k, s, p, d = (_pair(x) for x in (module.kernel_size, module.stride or module.kernel_size,
                                         module.padding, module.dilation))
    elif type(module) in (nn.ReLU, nn.LocalResponseNorm, nn.Identity) or (
        type(module) is nn.BatchNorm2d and not module.training
    ):
        k, s, p, d = (1, 1), (1, 1), (0, 0), (1, 1)
    else:
        return None
    return tuple(_Reach(d[i] * (k[i] - 1) + 1, s[i], p[i]) for i in (0, 1))  # type: ignore[return-value]


def _window_length(r: _Reach, in_len: int, window: int, out_len: int) -> int:
    """Outputs a window of ``window`` input positions can change, at most, wherever it starts."""
    counts = [min(out_len - 1, (a + window - 1 + r.pad) // r.stride) - _first(a, r) + 1
              for a in range(max(1, in_len - window + 1))]
    return max(1, min(out_len, max(counts)))


@dataclass
class _Layer:
    module: nn.Module
    reach: tuple[_Reach, _Reach]
    base_in: torch.Tensor  # (1, C, h, w) the layer's input on the unoccluded image
    base_out: torch.Tensor  # (1, C', h', w') its output
    window: tuple[int, int]  # output window size (rows, columns)


class WindowedPrefix:
    """The prefix layers' output for occluded copies of one image (see the module docstring)."""

    def __init__(self, layers: list[_Layer], size: int) -> None:
        self.layers = layers
        self.size = size

    @classmethod
    def plan(
        cls, network: Network, image: torch.Tensor, size: int, layer_module: nn.Module
    ) -> WindowedPrefix | None:
        """The prefix for squares of ``size`` on ``image`` (1, 3, H, W); None when nothing can be
        windowed. ``layer_module``: the module whose activations are asked for (the prefix ends
        there at the latest)."""
        chain = network.chain()
        modules: list[nn.Module] = list(chain) if chain is not None else _first_conv(network, image)
        layers: list[_Layer] = []
        window = (size, size)
        x = image
        for module in modules:
            reach = _reach(module)
            if reach is None:
                break
            out = module(x)
            if out.ndim != 4:
                break
            sizes = tuple(_window_length(reach[i], x.shape[2 + i], window[i], out.shape[2 + i])
                          for i in (0, 1))
            if sizes[0] * sizes[1] > MAX_WINDOW_SHARE * out.shape[2] * out.shape[3] and layers:
                break
            layers.append(_Layer(module, reach, x, out, sizes))  # type: ignore[arg-type]
            window, x = sizes, out  # type: ignore[assignment]
            if module is layer_module:
                break
        return cls(layers, size) if layers else None

    def __call__(self, batch: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor) -> torch.Tensor:
        """The last prefix layer's output for each copy (B, C, h, w)."""
        # Offsets are a few ints per copy: plain Python, and the crops and pastes slices of them
        # (advanced indexing over B x C x h x w elements costs more than the compute it saves).
        starts = [[int(t) for t in tops], [int(v) for v in lefts]]
        # The changed input: the square itself, as the copies hold it.
        values = torch.stack([batch[i, :, t : t + self.size, v : v + self.size]
                              for i, (t, v) in enumerate(zip(*starts, strict=True))])
        for layer in self.layers:
            values, starts = self._step(layer, values, starts)
        out = layer.base_out.expand(batch.shape[0], -1, -1, -1).clone()
        h, w = values.shape[2:]
        for i, (t, v) in enumerate(zip(*starts, strict=True)):
            out[i, :, t : t + h, v : v + w] = values[i]
        return out

    @staticmethod
    def _step(
        layer: _Layer, values: torch.Tensor, starts: list[list[int]]
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """One layer: from the changed window of its input (``values`` at ``starts``) to the
        changed window of its output."""
        ry, rx = layer.reach
        out_h, out_w = layer.base_out.shape[2:]
        (n_y, n_x), (w_y, w_x) = values.shape[2:], layer.window
        if all(r.span == r.stride == 1 and r.pad == 0 for r in (ry, rx)) and (n_y, n_x) == (w_y, w_x):
            # A pointwise op (ReLU, LRN, eval BatchNorm): its changed window is the op of the
            # changed input, where it is; no crop of the unoccluded map is needed.
            return _apply(layer.module, values), starts
        o_y = [min(_first(a, ry), out_h - w_y) for a in starts[0]]
        o_x = [min(_first(a, rx), out_w - w_x) for a in starts[1]]
        crop_h = (w_y - 1) * ry.stride + ry.span
        crop_w = (w_x - 1) * rx.stride + rx.span
        # The unoccluded input, padded as the op pads (zeros; -inf for max pooling).
        fill = float("-inf") if isinstance(layer.module, nn.MaxPool2d) else 0.0
        padded = F.pad(layer.base_in, (rx.pad, rx.pad + crop_w, ry.pad, ry.pad + crop_h), value=fill)[0]
        # Every crop starts at a multiple of the stride: one gather from a strided view.
        tiles = padded.unfold(1, crop_h, ry.stride).unfold(2, crop_w, rx.stride)  # (C, ny, nx, ch, cw)
        crops = tiles[:, o_y, o_x].transpose(0, 1).contiguous()  # (B, C, crop_h, crop_w)
        for i in range(len(o_y)):  # the changed input, where it falls in each crop
            y0 = starts[0][i] + ry.pad - o_y[i] * ry.stride
            x0 = starts[1][i] + rx.pad - o_x[i] * rx.stride
            sy, sx = slice(max(0, y0), min(crop_h, y0 + n_y)), slice(max(0, x0), min(crop_w, x0 + n_x))
            if sy.start < sy.stop and sx.start < sx.stop:
                crops[i, :, sy, sx] = values[i, :, sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0]
        return _apply(layer.module, crops), [o_y, o_x]


def _first(start: int, r: _Reach) -> int:
    """The first output whose input range reaches position ``start`` (o*s - p + span - 1 >= start)."""
    return max(0, -(-(start + r.pad - r.span + 1) // r.stride))


def _apply(module: nn.Module, crop: torch.Tensor) -> torch.Tensor:
    """The op on a crop that already holds its padding: no padding of its own, and functional, so
    no hook on the module sees a crop (the network's layer capture hooks it)."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(crop, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
    if isinstance(module, nn.MaxPool2d):
        return F.max_pool2d(crop, module.kernel_size, module.stride or module.kernel_size, 0, module.dilation)
    if isinstance(module, nn.ReLU):
        return F.relu(crop)
    if isinstance(module, nn.LocalResponseNorm):
        return F.local_response_norm(crop, module.size, module.alpha, module.beta, module.k)
    if isinstance(module, nn.BatchNorm2d):
        return F.batch_norm(crop, module.running_mean, module.running_var, module.weight, module.bias,
                            False, 0.0, module.eps)
    return crop  # nn.Identity


def _first_conv(network: Network, image: torch.Tensor) -> list[nn.Module]:
    """[the Conv2d the network applies to its input tensor itself], or [] if its first op is
    anything else."""
    found: list[nn.Module] = []

    def record(module: nn.Module, args: tuple) -> None:
        if not found and args and args[0] is image:
            found.append(module)

    convs = [m for m in network.module.modules() if type(m) is nn.Conv2d]
    handles = [m.register_forward_pre_hook(record) for m in convs]
    try:
        network.module(image)
    finally:
        for h in handles:
            h.remove()
    return found


@contextmanager
def windowed(prefix: WindowedPrefix, state: dict) -> Iterator[None]:
    """While active, the network's forward pass on ``state["batch"]`` (the occluded copies, their
    squares at ``state["tops"]``, ``state["lefts"]``) gets the prefix's output from ``prefix``: the
    first prefix module returns it, the others pass it on untouched (their hooks still run). On
    any other input the modules are themselves. Restored however the block ends."""
    modules = [layer.module for layer in prefix.layers]
    plain = [m.forward for m in modules]
    last = modules[-1]

    def first(x: torch.Tensor) -> torch.Tensor:
        if x is state.get("batch"):
            state["out"] = prefix(x, state["tops"], state["lefts"])
            return state["out"] if len(modules) == 1 else _Marked(state["out"], last)
        return plain[0](x)

    def passing(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if isinstance(x, _Marked):
                return x.tensor if modules[n] is last else x
            return plain[n](x)
        return forward

    try:
        modules[0].forward = first  # instance attributes: nn.Module.__call__ and hooks stay
        for n in range(1, len(modules)):
            modules[n].forward = passing(n)
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)
        state.pop("out", None)


class _Marked:
    """The prefix's output on its way through the prefix's other modules (which pass it on)."""

    def __init__(self, tensor: torch.Tensor, last: nn.Module) -> None:
        self.tensor, self.last = tensor, last
