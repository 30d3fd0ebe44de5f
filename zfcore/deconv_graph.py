"""The deconvnet of any ReLU network, as autograd with ReLU's backward replaced.

Going down from one activation, the deconvnet undoes each layer with its transpose: max-pool
switches (the forward pass's argmax, values sharing a switch added), transposed filters for every
conv (any groups, dilation, padding) and linear layer, no biases. That is exactly autograd's
backward of those ops, and of every other linear map a network is made of: eval-mode BatchNorm,
average and adaptive pools, residual sums, concatenations, flattening. Two things differ from the
gradient, and this module changes exactly those, for the duration of one projection, with a
``TorchFunctionMode`` that sees every call however the network makes it:

- **ReLU rectifies the signal coming down** instead of masking it with the forward pass's sign:
  ``nn.ReLU`` modules (in-place or not, used once or many times), ``F.relu``, ``torch.relu``,
  ``Tensor.relu`` and their in-place forms all become :class:`_Rectify`.
- **Contrast normalization is skipped** on the way down (``F.local_response_norm`` passes the
  signal through unchanged), as in the paper.

Other activations (SiLU, GELU, Hardswish, sigmoid, ...) have no deconvnet rule in the paper: the
signal goes down through their gradient, and :class:`Inversion` says which ones a projection met
(jobs record it in the manifest). Ops with no gradient (sign, rounding, thresholds as steps) or a
forward pass that cuts the graph (``detach``, integer casts) cannot be inverted:
:class:`DeconvError` names them.

The mode and its functions are installed only inside :func:`project_graph`, and removed in
``finally``: nothing of the mechanism outlives a call, even a failed one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .network import Network, evaluating


class DeconvError(ValueError):
    """The network has an op on the way from the input to the layer that the deconvnet cannot
    invert (the message names it)."""


class _Rectify(torch.autograd.Function):
    """ReLU going up; ReLU of the signal (not of the forward pass's mask) going down."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.relu(grad)


class _RectifyInPlace(torch.autograd.Function):
    """:class:`_Rectify` for ``ReLU(inplace=True)``: the input tensor is overwritten, as the
    network expects."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        return torch.relu_(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.relu(grad)


class _SkipNorm(torch.autograd.Function):
    """Local response (contrast) normalization going up; the identity going down."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None, None, None, None


_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_IN_PLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}
# What a projection goes through by its gradient (named in Inversion.gradient_through).
_GRADIENT_THROUGH = {
    F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish", F.mish: "mish", F.relu6: "relu6",
    F.hardtanh: "hardtanh", F.leaky_relu: "leaky_relu", F.elu: "elu", F.selu: "selu", F.celu: "celu",
    F.prelu: "prelu", F.softplus: "softplus", F.hardsigmoid: "hardsigmoid", F.glu: "glu",
    F.logsigmoid: "logsigmoid", F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid", F.tanh: "tanh", torch.tanh: "tanh", torch.Tensor.tanh: "tanh",
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
}
# Ops whose gradient is zero or undefined everywhere: nothing comes down through them.
_NO_GRADIENT = {
    torch.sign: "sign", torch.Tensor.sign: "sign", torch.round: "round", torch.Tensor.round: "round",
    torch.floor: "floor", torch.Tensor.floor: "floor", torch.ceil: "ceil", torch.Tensor.ceil: "ceil",
    torch.trunc: "trunc", torch.Tensor.trunc: "trunc", torch.heaviside: "heaviside",
    torch.Tensor.heaviside: "heaviside", torch.argmax: "argmax", torch.Tensor.argmax: "argmax",
}


@dataclass
class Inversion:
    """How a projection went down: ``rectified`` counts the ReLUs whose signal was rectified,
    ``normalizations_skipped`` the contrast normalizations passed through, ``gradient_through``
    names the other activations met (their gradient was used)."""

    rectified: int = 0
    normalizations_skipped: int = 0
    gradient_through: set[str] = field(default_factory=set)


def _lrn_params(args: tuple, kwargs: dict) -> list[Any]:
    """size, alpha, beta, k of an ``F.local_response_norm`` call, with its defaults."""
    defaults = {"size": None, "alpha": 1e-4, "beta": 0.75, "k": 1.0}
    given = args[1:]
    return [kwargs.get(n, given[i] if i < len(given) else d) for i, (n, d) in enumerate(defaults.items())]


class _DeconvMode(TorchFunctionMode):
    def __init__(self, inversion: Inversion) -> None:
        super().__init__()
        self.inversion = inversion

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        on_path = isinstance(x, torch.Tensor) and x.requires_grad
        if on_path and (func in _RELU or func in _RELU_IN_PLACE):
            self.inversion.rectified += 1
            in_place = func in _RELU_IN_PLACE or kwargs.get("inplace", False) or (len(args) > 1 and args[1])
            return (_RectifyInPlace if in_place else _Rectify).apply(x)
        if on_path and func is F.local_response_norm:
            self.inversion.normalizations_skipped += 1
            return _SkipNorm.apply(x, *_lrn_params(args, kwargs))
        if on_path and func in _NO_GRADIENT:
            raise DeconvError(f"the deconvnet cannot invert {_NO_GRADIENT[func]}: it has no gradient")
        if on_path and func in _GRADIENT_THROUGH:
            self.inversion.gradient_through.add(_GRADIENT_THROUGH[func])
        return func(*args, **kwargs)


def project_graph(
    network: Network, images: torch.Tensor, layer: str, select: Any, inversion: Inversion | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(projections (B, C, H, W), activation values (B,), positions (B, 2)) of the activations
    ``select(acts)`` picks: ``select`` returns (signal, values, positions) with the signal zero
    everywhere but at each image's chosen activation, which keeps its value."""
    inversion = inversion if inversion is not None else Inversion()
    x = images.detach().clone().requires_grad_(True)
    with evaluating(network), torch.enable_grad(), _DeconvMode(inversion):
        acts = network.features(x, [layer])[layer]
    if not acts.requires_grad:
        raise DeconvError(
            f"layer {layer!r} does not depend on the input through differentiable ops "
            "(detach, no_grad or an integer cast in the forward pass): it cannot be projected"
        )
    signal, values, positions = select(acts.detach())
    (grad,) = torch.autograd.grad(acts, x, grad_outputs=signal, allow_unused=True)
    if grad is None:
        raise DeconvError(f"layer {layer!r} does not depend on the input: it cannot be projected")
    return grad.detach(), values, positions
