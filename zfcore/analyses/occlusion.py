"""Occlusion sensitivity (Zeiler & Fergus, section 4.2 and Fig. 7).

A grey square slides over an image. For every position of the square the occluded image is
classified and three things are recorded:

(b) the summed activation of one feature map of a chosen layer (layer 5 in the paper): the map that
    is strongest on the *unoccluded* image, so the heat map shows which pixels that feature needs;
(d) the probability of the image's true class;
(e) the most probable class.

Plus (c): the deconv projection of that map's strongest activation on the unoccluded image, to put
beside (b). All positions of one image are evaluated as batches (``batch_size`` occluded copies per
forward pass), never one forward per position; ``batch_size=1`` is the per-position reference.

"Grey" is the normalization mean (0 in the model's input space; see :data:`zfcore.data.MEAN`): the
paper's networks see mean-subtracted pixels, where grey mean colour is exactly zero.

A square changes the first layers' activations only in a window around it, so the occluded
copies recompute those layers only there (:mod:`zfcore.analyses.windowed`; on ZFNet-small the
first conv/pool/LRN stage is ~85% of a forward pass); deeper layers run as usual. The results
equal full forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..deconv import deconvolve
from ..network import Network, as_network, evaluating
from .windowed import WindowedPrefix, windowed


@dataclass(frozen=True)
class OcclusionResult:
    """Everything recorded for one image. The grid has one cell per square position: cell (r, c)
    is the square whose top-left pixel is (``tops[r]``, ``lefts[c]``)."""

    layer: str
    channel: int  # the map strongest on the unoccluded image
    label: int  # the true class
    size: int  # side of the square, pixels
    stride: int  # step between square positions, pixels
    tops: torch.Tensor  # (R,) int64
    lefts: torch.Tensor  # (C,) int64
    activation: torch.Tensor  # (R, C) float32: summed activation of ``channel``'s map
    true_prob: torch.Tensor  # (R, C) float32: softmax probability of ``label``
    top_class: torch.Tensor  # (R, C) int64: most probable class
    top_prob: torch.Tensor  # (R, C) float32: its probability
    base_activation: float  # the same three on the unoccluded image
    base_true_prob: float
    base_top_class: int
    projection: torch.Tensor  # (3, H, W) deconv projection of the map's strongest activation


def square_offsets(length: int, size: int, stride: int) -> torch.Tensor:
    """Top (or left) pixel of every square position along one axis of ``length`` pixels.

    Steps of ``stride`` from 0; when the last step stops short of the edge, one more square flush with
    the edge is added, so every pixel is covered by at least one square. Returns (N,) int64.
    """
    if not 1 <= size <= length:
        raise ValueError(f"square size {size} must be in [1, {length}]")
    if stride < 1:
        raise ValueError("stride must be >= 1")
    offsets = list(range(0, length - size + 1, stride))
    if offsets[-1] != length - size:
        offsets.append(length - size)
    return torch.tensor(offsets, dtype=torch.long)


def occlude(
    image: torch.Tensor,
    tops: torch.Tensor,
    lefts: torch.Tensor,
    size: int,
    fill: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Copies of one image, copy p with the square at (tops[p], lefts[p]) set to ``fill``.

    image: (3, H, W); tops, lefts: (P,) -> (P, 3, H, W). ``fill`` is in the model's (normalized)
    input space, one value or one per channel. Built with broadcast masks, not a loop per copy.
    """
    _, h, w = image.shape
    tops = tops.to(image.device).view(-1, 1, 1)
    lefts = lefts.to(image.device).view(-1, 1, 1)
    ys = torch.arange(h, device=image.device).view(1, h, 1)
    xs = torch.arange(w, device=image.device).view(1, 1, w)
    inside = (ys >= tops) & (ys < tops + size) & (xs >= lefts) & (xs < lefts + size)  # (P, H, W)
    value = torch.as_tensor(fill, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
    return torch.where(inside.unsqueeze(1), value, image.unsqueeze(0))


def strongest_map(activation: torch.Tensor) -> int:
    """The channel whose map has the largest single activation (the atlas's ranking: each map by its
    spatial maximum). activation: (C, H, W) or (F,) for fc layers, where a map is one unit."""
    per_channel = activation.reshape(activation.shape[0], -1).amax(dim=1)
    return int(per_channel.argmax())  # first maximum on ties: deterministic


def _summed_map(activation: torch.Tensor, channel: int) -> torch.Tensor:
    """(B, C, H, W) or (B, F) -> (B,): the sum of one map (one unit's value for fc layers)."""
    return activation[:, channel].reshape(activation.shape[0], -1).sum(dim=1)


@torch.no_grad()
def occlusion_sensitivity(
    model: nn.Module | Network,
    image: torch.Tensor,
    label: int,
    *,
    layer: str | None = None,
    size: int = 16,
    stride: int = 4,
    fill: float | Sequence[float] = 0.0,
    batch_size: int = 64,
    window: bool = True,
) -> OcclusionResult:
    """Slide a ``size`` x ``size`` square over ``image`` (3, H, W, normalized) in steps of
    ``stride``; see the module docstring for what is recorded. ``batch_size`` occluded copies go
    through the model per forward pass; ``window``: the first layers are recomputed only where
    each square changes them (see the module docstring; ``False`` for plain forward passes).
    Runs on the device of ``image`` (the model must be there). ``layer`` defaults to the last conv
    layer (the paper's layer 5).
    """
    network = as_network(model)
    layer = layer or network.spatial_layers()[-1]
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    _, h, w = image.shape
    tops, lefts = square_offsets(h, size, stride), square_offsets(w, size, stride)
    with evaluating(network):
        acts, logits = network.features_and_logits(image.unsqueeze(0), [layer])
        base_prob = logits.softmax(dim=1)[0]
        channel = strongest_map(acts[layer][0])
        base_activation = float(_summed_map(acts[layer], channel)[0])

        # Row-major grid of positions, cut into batches of occluded copies.
        grid_t = tops.repeat_interleave(len(lefts))
        grid_l = lefts.repeat(len(tops))
        activation, true_prob, top_class, top_prob = [], [], [], []
        target = network.layer_module(layer)
        prefix = WindowedPrefix.plan(network, image.unsqueeze(0), size, target) if window else None
        state: dict = {}
        for start in range(0, len(grid_t), batch_size):
            t, left = grid_t[start : start + batch_size], grid_l[start : start + batch_size]
            batch = occlude(image, t, left, size, fill)
            if prefix is None:
                acts, logits = network.features_and_logits(batch, [layer])
            else:
                state.update(batch=batch, tops=t, lefts=left)
                with windowed(prefix, state):
                    acts, logits = network.features_and_logits(batch, [layer])
            prob = logits.softmax(dim=1)
            activation.append(_summed_map(acts[layer], channel))
            true_prob.append(prob[:, label])
            best = prob.max(dim=1)
            top_class.append(best.indices)
            top_prob.append(best.values)

        projection = deconvolve(network, image.unsqueeze(0), layer, [channel]).projections[0]

    shape = (len(tops), len(lefts))
    return OcclusionResult(
        layer=layer,
        channel=channel,
        label=int(label),
        size=size,
        stride=stride,
        tops=tops,
        lefts=lefts,
        activation=torch.cat(activation).float().view(shape).cpu(),
        true_prob=torch.cat(true_prob).float().view(shape).cpu(),
        top_class=torch.cat(top_class).view(shape).cpu(),
        top_prob=torch.cat(top_prob).float().view(shape).cpu(),
        base_activation=base_activation,
        base_true_prob=float(base_prob[label]),
        base_top_class=int(base_prob.argmax()),
        projection=projection.cpu(),
    )


def pixel_map(
    values: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size: int, image_hw: tuple[int, int]
) -> torch.Tensor:
    """Spread a grid of per-square values (R, C) over the image: each pixel gets the mean value of
    the squares that covered it, (H, W) float32. This is what heat maps are drawn from, so a cell's
    value lands on the pixels it was measured by occluding (not on a stretched grid)."""
    h, w = image_hw
    ys = torch.arange(h).view(h, 1)
    xs = torch.arange(w).view(w, 1)
    in_row = ((ys >= tops.view(1, -1)) & (ys < tops.view(1, -1) + size)).float()  # (H, R)
    in_col = ((xs >= lefts.view(1, -1)) & (xs < lefts.view(1, -1) + size)).float()  # (W, C)
    # sum over covering squares / number of covering squares, both as (H, R) @ (R, C) @ (C, W).
    total = in_row @ values.float() @ in_col.T
    count = in_row @ torch.ones_like(values, dtype=torch.float32) @ in_col.T
    return total / count.clamp_min(1.0)
