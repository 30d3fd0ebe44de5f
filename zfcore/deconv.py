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

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .deconv_graph import DeconvError, Inversion, project_graph
from .network import Network, as_network, zeros_like_input

__all__ = [
    "DeconvError", "Deconvolution", "Inversion", "deconvolve", "inspect", "method_for", "project",
    "project_autograd",
]


def unpool_adjoint(signal: torch.Tensor, switches: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    """Adjoint of max pooling: put each value of ``signal`` (B, C, h, w) at its switch in a zero
    map of ``input_shape`` (B, C, H, W), adding values that share a switch."""
    b, c, hh, ww = input_shape
    out = signal.new_zeros(b, c, hh * ww)
    out.scatter_add_(2, switches.flatten(2), signal.flatten(2))
    return out.view(b, c, hh, ww)


@dataclass
class _Step:
    """One op of the forward path, with what the way down needs to undo it."""

    kind: str  # "conv" | "pool" | "relu" | "linear" | "flatten"
    module: nn.Module | None = None
    shape: torch.Size | None = None  # the op's input shape
    switches: torch.Tensor | None = None


class Deconvolution(NamedTuple):
    projections: torch.Tensor  # (B, 3, H, W), same shape as the images
    activations: torch.Tensor  # (B,) value of the projected activation
    positions: torch.Tensor  # (B, 2) (y, x) in the layer's map; zeros for fc layers


_CHAIN_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.ReLU, nn.LocalResponseNorm, nn.Flatten, nn.Linear, nn.Dropout)


def _chain_to(network: Network, layer: str) -> list[nn.Module] | None:
    """The chain of modules up to ``layer``'s module when the tape below can undo every one of
    them (plain convolutions, max pools, ReLUs, LRN, flatten, linear, dropout); else None."""
    chain = network.chain()
    if chain is None:
        return None
    target = network.layer_module(layer)
    if not any(m is target for m in chain):
        return None
    upto = chain[: next(i for i, m in enumerate(chain) if m is target) + 1]
    for m in upto:
        if not isinstance(m, _CHAIN_MODULES):
            return None
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros"):
            return None
    return upto


def _forward_tape(chain: list[nn.Module], images: torch.Tensor) -> tuple[torch.Tensor, list[_Step]]:
    """Run the chain (ending at the layer's module), recording each op for the way down."""
    tape: list[_Step] = []
    x = images
    for module in chain:
        if isinstance(module, nn.Conv2d):
            tape.append(_Step("conv", module, x.shape))
            x = module(x)
        elif isinstance(module, nn.MaxPool2d):
            shape = x.shape
            x, switches = F.max_pool2d(
                x, module.kernel_size, module.stride, module.padding, module.dilation,
                ceil_mode=module.ceil_mode, return_indices=True,
            )
            tape.append(_Step("pool", module, shape, switches))
        elif isinstance(module, nn.ReLU):
            tape.append(_Step("relu"))
            x = module(x)
        elif isinstance(module, nn.LocalResponseNorm):
            x = module(x)  # skipped on the way down
        elif isinstance(module, nn.Flatten):
            tape.append(_Step("flatten", shape=x.shape))
            x = module(x)
        elif isinstance(module, nn.Linear):
            tape.append(_Step("linear", module, x.shape))
            x = module(x)
        elif isinstance(module, nn.Dropout):
            pass  # eval semantics: identity both ways
    return x, tape


def _down(signal: torch.Tensor, tape: list[_Step]) -> torch.Tensor:
    for step in reversed(tape):
        if step.kind == "relu":
            signal = F.relu(signal)
        elif step.kind == "pool":
            signal = unpool_adjoint(signal, step.switches, step.shape)
        elif step.kind == "conv":
            conv = step.module
            out_h, out_w = signal.shape[-2:]
            in_h, in_w = step.shape[-2:]
            # Recover the rows/columns the forward stride skipped, so the map is the input's size.
            extra = tuple(
                n_in - ((n_out - 1) * s - 2 * p + k)
                for n_in, n_out, s, p, k in zip(
                    (in_h, in_w), (out_h, out_w), conv.stride, conv.padding, conv.kernel_size, strict=True
                )
            )
            signal = F.conv_transpose2d(
                signal, conv.weight.to(signal.dtype), None, conv.stride, conv.padding, extra
            )
        elif step.kind == "flatten":
            signal = signal.view(step.shape)
        elif step.kind == "linear":
            signal = signal @ step.module.weight.to(signal.dtype)
    return signal


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
            acts, tape = _forward_tape(chain, images)
            signal, values, pos = _select(acts, channels, positions)
            return Deconvolution(_down(signal, tape), values, pos)
    projections, values, pos = project_graph(
        network, images, layer, lambda acts: _select(acts, channels, positions), inversion
    )
    return Deconvolution(projections, values, pos)


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
