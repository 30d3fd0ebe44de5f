"""The deconvnet of a plain chain of modules (ZFNet): a tape of the forward pass, then the way down.

Going up, the forward pass of each *image* records what the way down needs: each conv's input
shape and each max pool's switches. Going down from an *item* (one activation of one image), each
op is undone in turn: ReLU on the signal, unpooling to the switches (values sharing a switch
added: the exact adjoint of the pool's gather), the conv's filters transposed, contrast
normalization skipped, dropout the identity.

Two things make an atlas's projections cheap:

- **one forward pass per image**, not per item: items name their image (``image_of``), and the
  way down reads that image's switches. The way down is linear in the chosen activation, so items
  of one image share everything computed going up.
- **the way down only where it can be non-zero** (:func:`down_windows`): from one activation of a
  conv layer the signal can only reach that activation's receptive field at each level below it,
  a window of a size fixed by the layer and an offset fixed by the position. Each item carries
  just that window (positions outside the real map, the padding, are zeroed at every level), so a
  conv5 projection of the paper's 224 px network works on 3x3..139x139 windows instead of whole
  maps. The result is the projection inside the receptive box, which is all an atlas keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CHAIN_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.ReLU, nn.LocalResponseNorm, nn.Flatten, nn.Linear, nn.Dropout)


def undoable(chain: Sequence[nn.Module]) -> bool:
    """Whether the tape can undo every module of ``chain`` (plain zero-padded convolutions, max
    pools, ReLUs, LRN, flatten, linear, dropout)."""
    for m in chain:
        if not isinstance(m, CHAIN_MODULES):
            return False
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            return False
    return True


def unpool_adjoint(signal: torch.Tensor, switches: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    """Adjoint of max pooling: put each value of ``signal`` (B, C, h, w) at its switch in a zero
    map of ``input_shape`` (B, C, H, W), adding values that share a switch."""
    b, c, hh, ww = input_shape
    out = signal.new_zeros(b, c, hh * ww)
    out.scatter_add_(2, switches.flatten(2), signal.flatten(2))
    return out.view(b, c, hh, ww)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


@dataclass
class Step:
    """One op of the forward path, with what the way down needs to undo it."""

    kind: str  # "conv" | "pool" | "relu" | "linear" | "flatten"
    module: nn.Module | None = None
    shape: torch.Size | None = None  # the op's input shape (of the images' batch)
    switches: torch.Tensor | None = None  # pools: (U, C, h, w) flat indices into the input map


def forward_tape(chain: Sequence[nn.Module], images: torch.Tensor) -> tuple[torch.Tensor, list[Step]]:
    """Run the chain (ending at the layer's module) on the images, recording each op."""
    tape: list[Step] = []
    x = images
    for module in chain:
        if isinstance(module, nn.Conv2d):
            tape.append(Step("conv", module, x.shape))
            x = module(x)
        elif isinstance(module, nn.MaxPool2d):
            shape = x.shape
            x, switches = F.max_pool2d(
                x, module.kernel_size, module.stride, module.padding, module.dilation,
                ceil_mode=module.ceil_mode, return_indices=True,
            )
            tape.append(Step("pool", module, shape, switches))
        elif isinstance(module, nn.ReLU):
            tape.append(Step("relu"))
            x = module(x)
        elif isinstance(module, nn.LocalResponseNorm):
            x = module(x)  # skipped on the way down
        elif isinstance(module, nn.Flatten):
            tape.append(Step("flatten", shape=x.shape))
            x = module(x)
        elif isinstance(module, nn.Linear):
            tape.append(Step("linear", module, x.shape))
            x = module(x)
        # nn.Dropout: eval semantics, the identity both ways
    return x, tape


def down_full(signal: torch.Tensor, tape: list[Step], image_of: torch.Tensor | None = None) -> torch.Tensor:
    """The way down on whole maps: signal (N, ...) at the layer -> (N, C, H, W) at the input.
    ``image_of`` (N,): the tape row (image) of each item; None when items are the tape's rows."""
    n = signal.shape[0]
    for step in reversed(tape):
        if step.kind == "relu":
            signal = F.relu(signal)
        elif step.kind == "pool":
            switches = step.switches if image_of is None else step.switches[image_of]
            signal = unpool_adjoint(signal, switches, (n, *step.shape[1:]))
        elif step.kind == "conv":
            conv = step.module
            out_h, out_w = signal.shape[-2:]
            in_h, in_w = step.shape[-2:]
            # Recover the rows/columns the forward stride skipped, so the map is the input's size.
            extra = tuple(
                n_in - ((n_out - 1) * s - 2 * p + d * (k - 1) + 1)
                for n_in, n_out, s, p, k, d in zip(
                    (in_h, in_w), (out_h, out_w), conv.stride, conv.padding, conv.kernel_size,
                    conv.dilation, strict=True,
                )
            )
            signal = F.conv_transpose2d(
                signal, conv.weight.to(signal.dtype), None, conv.stride, conv.padding, extra,
                dilation=conv.dilation,
            )
        elif step.kind == "flatten":
            signal = signal.view(n, *step.shape[1:])
        elif step.kind == "linear":
            signal = signal @ step.module.weight.to(signal.dtype)
    return signal


def _window_below(
    step: Step, offset: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The window (per-item offsets (N, 2), size) of a step's input that its output window feeds."""
    m = step.module
    k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
    d = _pair(m.dilation)
    stride = torch.tensor(s, device=offset.device)
    pad = torch.tensor(p, device=offset.device)
    below = tuple((size[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 for i in range(2))
    return offset * stride - pad, below


def _valid(offset: torch.Tensor, size: tuple[int, int], shape: Sequence[int]) -> torch.Tensor:
    """(N, 1, h, w) mask of the window positions inside a map of ``shape`` (.., H, W)."""
    ys = offset[:, 0:1] + torch.arange(size[0], device=offset.device)  # (N, h)
    xs = offset[:, 1:2] + torch.arange(size[1], device=offset.device)  # (N, w)
    inside_y = (ys >= 0) & (ys < shape[-2])
    inside_x = (xs >= 0) & (xs < shape[-1])
    return (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1)


def down_windows(
    signal: torch.Tensor,
    positions: torch.Tensor,
    tape: list[Step],
    image_of: torch.Tensor,
    out_shape: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The way down from one activation per item of a conv layer, on windows only.

    signal: (N, C) each item's value at its own activation; positions: (N, 2) its (y, x) in the
    layer's map of shape ``out_shape`` (.., H, W). Returns (windows (N, C_in, h, w) at the input,
    offsets (N, 2) of each window's top-left pixel, which may lie outside the image: the window is
    the receptive field unclipped, zero outside the image).
    """
    n, c = signal.shape
    window = signal.view(n, c, 1, 1)
    offset = positions.to(torch.long)
    size = (1, 1)
    map_shape = tuple(out_shape)
    for i in range(len(tape) - 1, -1, -1):
        step = tape[i]
        if size[0] * size[1] >= map_shape[-2] * map_shape[-1]:
            # The window has outgrown its map (a small input): whole maps are cheaper from here.
            return down_full(_paste(window, offset, map_shape), tape[: i + 1], image_of), None
        if step.kind == "relu":
            window = F.relu(window)
        elif step.kind == "conv":
            conv = step.module
            offset, size = _window_below(step, offset, size)
            window = F.conv_transpose2d(window, conv.weight.to(window.dtype), None, conv.stride, 0,
                                        dilation=conv.dilation)
            map_shape = tuple(step.shape)
            window = window * _valid(offset, size, map_shape)  # padding: nothing below it
        elif step.kind == "pool":
            window, offset, size = _unpool_window(window, offset, size, step, image_of)
            map_shape = tuple(step.shape)
        else:
            raise ValueError("windows are for conv layers: fully connected layers see the whole image")
    return window, offset


def _paste(window: torch.Tensor, offset: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Each item's window placed in a zero map of ``shape`` (.., H, W) (the parts inside it)."""
    n, c, h, w = window.shape
    full = window.new_zeros(n, c, shape[-2] + 2 * h, shape[-1] + 2 * w)
    ys = (offset[:, 0:1] + h + torch.arange(h, device=window.device)).view(n, 1, h, 1)
    xs = (offset[:, 1:2] + w + torch.arange(w, device=window.device)).view(n, 1, 1, w)
    rows = torch.arange(n, device=window.device).view(n, 1, 1, 1)
    chans = torch.arange(c, device=window.device).view(1, c, 1, 1)
    full[rows, chans, ys, xs] = window
    return full[:, :, h : h + shape[-2], w : w + shape[-1]].contiguous()


def _unpool_window(
    window: torch.Tensor, offset: torch.Tensor, size: tuple[int, int], step: Step, image_of: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Unpool a window of the pool's output into the window of its input it came from."""
    n, c = window.shape[:2]
    switches = step.switches  # (U, C, h_out, w_out), flat indices into the (H_in, W_in) map
    h_out, w_out = switches.shape[-2:]
    w_in = step.shape[-1]
    below, below_size = _window_below(step, offset, size)
    # Each window position's switch (positions outside the pool's map carry a zero signal:
    # clamp them to any valid switch, whose scatter then adds nothing).
    ys = (offset[:, 0:1] + torch.arange(size[0], device=offset.device)).clamp(0, h_out - 1)  # (N, h)
    xs = (offset[:, 1:2] + torch.arange(size[1], device=offset.device)).clamp(0, w_out - 1)  # (N, w)
    flat = (ys[:, :, None] * w_out + xs[:, None, :]).view(n, 1, -1)  # (N, 1, h*w)
    rows = image_of.view(n, 1, 1)
    chans = torch.arange(c, device=window.device).view(1, c, 1)
    sw = switches.flatten(2)[rows, chans, flat]  # (N, C, h*w) flat indices into the input map
    sy = sw // w_in - below[:, 0].view(n, 1, 1)
    sx = sw % w_in - below[:, 1].view(n, 1, 1)
    local = (sy.clamp(0, below_size[0] - 1) * below_size[1] + sx.clamp(0, below_size[1] - 1))
    out = window.new_zeros(n, c, below_size[0] * below_size[1])
    out.scatter_add_(2, local, window.reshape(n, c, -1))
    return out.view(n, c, *below_size), below, below_size
