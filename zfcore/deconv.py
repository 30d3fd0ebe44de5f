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

from .network import Network, as_network


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


def _forward_tape(network: Network, images: torch.Tensor, layer: str) -> tuple[torch.Tensor, list[_Step]]:
    """Run the forward pass up to ``layer``'s activation, recording each op for the way down."""
    target = network.layer_module(layer)
    chain = network.chain()
    if chain is None:
        raise ValueError(f"{type(network.module).__name__} is not a plain chain of modules")
    tape: list[_Step] = []
    x = images
    for module in chain:
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.dilation != (1, 1):
                raise ValueError("deconvnet supports plain convolutions only")
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
        else:
            raise ValueError(f"deconvnet does not know how to invert {type(module).__name__}")
        if module is target:
            return x, tape
    raise KeyError(layer)  # pragma: no cover - layer_module already validated the name


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


@torch.no_grad()
def deconvolve(
    model: nn.Module | Network,
    images: torch.Tensor,
    layer: str,
    channels: torch.Tensor | list[int],
    positions: torch.Tensor | list[tuple[int, int]] | None = None,
) -> Deconvolution:
    """Project, for every image b, the activation (channels[b], positions[b]) of ``layer``.

    images: (B, 3, H, W). positions: (B, 2) (y, x), or None for the strongest activation of the
    map. Works for conv and fc layers, on any device the model is on; one pass for the batch.
    """
    acts, tape = _forward_tape(as_network(model), images, layer)
    signal, values, pos = _select(acts, channels, positions)
    return Deconvolution(_down(signal, tape), values, pos)


def project(
    model: nn.Module | Network,
    images: torch.Tensor,
    layer: str,
    channels: torch.Tensor | list[int],
    positions: torch.Tensor | list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Pixel-space projections (B, 3, H, W) of one activation per image; see :func:`deconvolve`."""
    return deconvolve(model, images, layer, channels, positions).projections


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
