"""The deconvnet of Zeiler & Fergus (section 2.1): project one activation back to pixel space.

Going up, the forward pass records the max-pool switches. Going down from the chosen activation
(every other activation of its layer set to zero), each layer is undone in turn:

- unpool: each value goes back to its switch. 3x3/2 pools overlap, so several outputs can share a
  switch; their values are *added* (a scatter-add: the exact adjoint of the pool's gather).
  ``nn.MaxUnpool2d`` overwrites instead, and which value survives is undefined.
- rectify: ReLU applied to the signal coming down (not masked by the forward pass).
- filter: the layer's filters transposed (``conv_transpose2d`` with the same weights), no bias.
- contrast normalization is skipped on the way down, as in the paper; dropout is the identity.

The result is the gradient of the activation with respect to the input with ReLU's backward
replaced by ReLU-on-the-signal, times the activation's value. :func:`project_autograd` computes
exactly that with autograd and hooks, as an independent check of :func:`project`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .deconv_chain import down_full, down_windows, forward_tape, undoable, unpool_adjoint
from .deconv_graph import DeconvError, Inversion, project_graph
from .network import Network, as_network, zeros_like_input
from .receptive import Geometry, geometries

__all__ = [
    "DeconvError", "Deconvolution", "Inversion", "Windows", "deconvolve", "inspect", "method_for",
    "project", "project_autograd", "project_windows", "unpool_adjoint",
]


class Deconvolution(NamedTuple):
    projections: torch.Tensor  # (B, 3, H, W), same shape as the images
    activations: torch.Tensor  # (B,) value of the projected activation
    positions: torch.Tensor  # (B, 2) (y, x) in the layer's map; zeros for fc layers


class Windows(NamedTuple):
    """Projections of many items, each only inside its receptive field (all an atlas keeps)."""

    windows: torch.Tensor  # (N, C, h, w): the projection in the item's window, zero outside the image
    offsets: torch.Tensor  # (N, 2) (top, left) of each window in the image (may be negative)
    activations: torch.Tensor  # (N,) value of each projected activation
    positions: torch.Tensor  # (N, 2) (y, x) in the layer's map; zeros for fc layers


def _chain_to(network: Network, layer: str) -> list[nn.Module] | None:
    """The chain of modules up to ``layer``'s module when the tape can undo every one of them;
    else None (the graph path)."""
    chain = network.chain()
    if chain is None:
        return None
    target = network.layer_module(layer)
    if not any(m is target for m in chain):
        return None
    upto = chain[: next(i for i, m in enumerate(chain) if m is target) + 1]
    return upto if undoable(upto) else None


def _select(
    acts: torch.Tensor, channels: torch.Tensor, positions: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen activation of each item: returns a signal with only it kept, its values, and
    its (y, x) positions. acts: (B, C, H, W) or (B, F)."""
    b = acts.shape[0]
    rows = torch.arange(b, device=acts.device)
    channels = torch.as_tensor(channels, device=acts.device).long().view(-1)
    if channels.shape[0] != b:
        raise ValueError(f"got {channels.shape[0]} channels for {b} images")
    n_channels = acts.shape[1]
    if (channels < 0).any() or (channels >= n_channels).any():
        raise ValueError(f"channels must be in [0, {n_channels})")
    signal = torch.zeros_like(acts)
    if acts.ndim == 2:  # fc layer: one unit per channel
        values = acts[rows, channels]
        signal[rows, channels] = values
        return signal, values, torch.zeros(b, 2, dtype=torch.long, device=acts.device)
    h, w = acts.shape[-2:]
    maps = acts[rows, channels]  # (B, H, W)
    if positions is None:
        flat = maps.flatten(1).argmax(dim=1)  # first maximum: deterministic
        pos = torch.stack((flat // w, flat % w), dim=1)
    else:
        pos = torch.as_tensor(positions, device=acts.device).long().view(b, 2)
        if (pos[:, 0] < 0).any() or (pos[:, 0] >= h).any() or (pos[:, 1] < 0).any() or (pos[:, 1] >= w).any():
            raise ValueError(f"positions must lie in the {h}x{w} map")
    values = maps[rows, pos[:, 0], pos[:, 1]]
    signal[rows, channels, pos[:, 0], pos[:, 1]] = values
    return signal, values, pos


def deconvolve(
    model: nn.Module | Network,
    images: torch.Tensor,
    layer: str,
    channels: torch.Tensor | list[int],
    positions: torch.Tensor | list[tuple[int, int]] | None = None,
    *,
    method: str = "auto",
) -> Deconvolution:
    """Project, for every image b, the activation (channels[b], positions[b]) of ``layer``.

    images: (B, C, H, W). positions: (B, 2) (y, x), or None for the strongest activation of the
    map. Works for conv and fc layers of any network (``model`` any ``nn.Module``, ``layer`` a
    layer of its contract: for most modules, a module path), on any device the model is on; one
    pass for the batch. A network that is a plain chain of modules (ZFNet) goes down a tape of
    its forward pass; any other through autograd with ReLU rectifying the signal
    (:mod:`zfcore.deconv_graph`); both give the same projections. ``method`` "graph" forces the
    second way, "chain" the first (ValueError if the network is not such a chain).
    """
    return _deconvolve(as_network(model), images, layer, channels, positions, method, None)


def _deconvolve(
    network: Network,
    images: torch.Tensor,
    layer: str,
    channels: torch.Tensor | list[int],
    positions: torch.Tensor | list[tuple[int, int]] | None,
    method: str,
    inversion: Inversion | None,
) -> Deconvolution:
    if method not in ("auto", "chain", "graph"):
        raise ValueError(f"method must be auto, chain or graph, not {method!r}")
    network.check_layers([layer])
    chain = _chain_to(network, layer) if method != "graph" and inversion is None else None
    if method == "chain" and chain is None:
        raise ValueError(f"{type(network.module).__name__} up to {layer!r} is not a chain the tape can undo")
    if chain is not None:
        with torch.no_grad():
            acts, tape = forward_tape(chain, images)
            signal, values, pos = _select(acts, channels, positions)
            return Deconvolution(down_full(signal, tape), values, pos)
    projections, values, pos = project_graph(
        network, images, layer, lambda acts: _select(acts, channels, positions), inversion
    )
    return Deconvolution(projections, values, pos)


def project_windows(
    model: nn.Module | Network,
    images: torch.Tensor,
    layer: str,
    image_of: torch.Tensor | Sequence[int],
    channels: torch.Tensor | Sequence[int],
    positions: torch.Tensor | Sequence[tuple[int, int]] | None = None,
    *,
    method: str = "auto",
) -> Windows:
    """Project many items at once: item n is activation (channels[n], positions[n]) of
    ``images[image_of[n]]`` (images (U, C, H, W): each distinct image once). Returns each item's
    projection inside its receptive-field window (see :class:`Windows`); cropped to the image,
    that is exactly its receptive box, where the whole projection is non-zero.

    On a plain chain (ZFNet) every image goes up once and every item comes down on its window
    only (:func:`zfcore.deconv_chain.down_windows`); otherwise each item is projected whole by the
    graph path and its window cut out. Both give the same windows.
    """
    network = as_network(model)
    network.check_layers([layer])
    image_of = torch.as_tensor(image_of, dtype=torch.long, device=images.device).view(-1)
    n = image_of.shape[0]
    chain = _chain_to(network, layer) if method != "graph" else None
    geometry = geometries(network, images.shape[-1])[layer]
    if chain is not None:
        with torch.no_grad():
            acts, tape = forward_tape(chain, images)
            picked = acts[image_of]  # (N, ...) each item's own image's map
            signal, values, pos = _select(picked, channels, positions)
            if acts.ndim == 4 and not geometry.whole:
                # Each item's signal is its one activation: (N, C), its value at its channel.
                rows = torch.arange(n, device=images.device)
                point = torch.zeros(n, acts.shape[1], dtype=signal.dtype, device=signal.device)
                point[rows, torch.as_tensor(channels, device=images.device).long().view(-1)] = values
                windows, offsets = down_windows(point, pos, tape, image_of, acts.shape)
                if offsets is not None:
                    return Windows(windows, offsets, values, pos)
                full = windows  # whole projections (the windows outgrew a small input)
            else:
                full = down_full(signal, tape, image_of)
    else:
        out = deconvolve(network, images[image_of], layer, channels, positions, method="graph")
        full, values, pos = out.projections, out.activations, out.positions
    return _cut_windows(full, geometry, pos, values)


def _cut_windows(full: torch.Tensor, geometry: Geometry, pos: torch.Tensor, values: torch.Tensor) -> Windows:
    """Windows of whole projections (N, C, H, W), by the layer's receptive geometry; along an axis
    where the field is as large as the image, the window is the whole image."""
    n, _, h, w = full.shape
    if geometry.whole or (geometry.size[0] >= h and geometry.size[1] >= w):
        return Windows(full, torch.zeros(n, 2, dtype=torch.long, device=full.device), values, pos)
    offsets, index = [], []
    for axis, length in ((0, h), (1, w)):
        size = geometry.size[axis]
        if size >= length:
            start = torch.zeros(n, dtype=torch.long, device=full.device)
            size = length
        else:
            start = pos[:, axis].to(torch.long) * geometry.stride[axis] + geometry.offset[axis]
        offsets.append(start)
        # Positions outside the image read the zero padding below.
        index.append((start.view(n, 1) + torch.arange(size, device=full.device)).clamp(-1, length) + 1)
    padded = F.pad(full, (1, 1, 1, 1))  # index -1 and `length` land on zeros
    ys = index[0].view(n, 1, -1, 1)
    xs = index[1].view(n, 1, 1, -1)
    rows = torch.arange(n, device=full.device).view(n, 1, 1, 1)
    chans = torch.arange(full.shape[1], device=full.device).view(1, -1, 1, 1)
    return Windows(padded[rows, chans, ys, xs], torch.stack(offsets, dim=1), values, pos)


def method_for(model: nn.Module | Network, layer: str) -> str:
    """Which way :func:`deconvolve` goes down from ``layer``: "chain" (the tape of a plain chain of
    modules) or "graph" (autograd with ReLU rectifying the signal)."""
    return "chain" if _chain_to(as_network(model), layer) is not None else "graph"


def inspect(model: nn.Module | Network, layer: str, image_size: int | None = None) -> Inversion:
    """How the deconvnet goes down from ``layer`` (which activations it meets), from one
    projection of one unit of a random image; :class:`DeconvError` if it cannot. Works on a
    network on the ``meta`` device (shapes only: a check that costs no compute)."""
    network = as_network(model)
    size = image_size or network.preprocess.image_size
    zeros = zeros_like_input(network.module, network.preprocess.channels, size)
    image = torch.randn(zeros.shape, dtype=zeros.dtype, device=zeros.device)

    def one_unit(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        signal = torch.zeros_like(acts)
        signal.view(acts.shape[0], -1)[:, 0] = 1.0
        return signal, signal.view(acts.shape[0], -1)[:, 0], torch.zeros(acts.shape[0], 2, dtype=torch.long)

    inversion = Inversion()
    network.check_layers([layer])
    project_graph(network, image, layer, one_unit, inversion)
    return inversion


def project(
    model: nn.Module | Network,
    images: torch.Tensor,
    layer: str,
    channels: torch.Tensor | list[int],
    positions: torch.Tensor | list[tuple[int, int]] | None = None,
    *,
    method: str = "auto",
) -> torch.Tensor:
    """Pixel-space projections (B, C, H, W) of one activation per image; see :func:`deconvolve`."""
    return deconvolve(model, images, layer, channels, positions, method=method).projections


def _relu_signal_hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
    return (F.relu(grad_output[0]),)


def _identity_hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
    return (grad_output[0],)


def project_autograd(
    model: nn.Module | Network,
    images: torch.Tensor,
    layer: str,
    channels: torch.Tensor | list[int],
    positions: torch.Tensor | list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """The same projection as :func:`project`, computed by autograd with backward hooks that put
    ReLU on the signal and pass contrast normalization through. Slower; used to cross-check.

    Hooks are always removed, even when the call fails.
    """
    network = as_network(model)
    module_ = network.module
    was_training = module_.training
    handles: list[torch.utils.hooks.RemovableHandle] = []
    captured: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured["acts"] = output

    try:
        module_.eval()
        hooks: list[tuple[type, Callable]] = [
            (nn.ReLU, _relu_signal_hook),
            (nn.LocalResponseNorm, _identity_hook),
        ]
        for module in module_.modules():
            for kind, hook in hooks:
                if isinstance(module, kind):
                    handles.append(module.register_full_backward_hook(hook))
        handles.append(network.layer_module(layer).register_forward_hook(keep))
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            module_(x)
            acts = captured["acts"]
            signal, _, _ = _select(acts.detach(), channels, positions)
            # d/dx of sum_b value_b * a_b: each image's projection, scaled by its activation.
            (acts * signal).sum().backward()
        return x.grad.detach()
    finally:
        for h in handles:
            h.remove()
        module_.train(was_training)
