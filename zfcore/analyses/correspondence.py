"""Correspondence analysis (Zeiler & Fergus, section 4.3, Table 1).

The same part (e.g. the left eye) is masked out in each of n images of one kind of object. For
image i and layer l, eps_i = x_i - x~_i is the difference between the feature vectors of the
original and the masked image. If the network ties the part to the object consistently, the
differences change in the same directions in every image, so their signs agree:

    Delta_l = sum over pairs i != j of H(sign(eps_i), sign(eps_j))      (H: Hamming distance)

The paper's values (0.067 ... 0.107) are fractions, so the sum is normalized. Here

    Delta_l = 1 / (n (n - 1)) * sum_{i != j} H(sign(eps_i), sign(eps_j)) / D

with D the feature-vector length: the mean, over ordered pairs, of the fraction of features whose
sign differs. Ordered and unordered pairs give the same mean because H is symmetric. The "±" is the
standard deviation of the per-pair fractions (over the n (n - 1) / 2 unordered pairs). Signs take
three values, -1, 0, +1: a feature that is zero in both images (common after ReLU) has eps = 0 in
both and counts as agreeing, as sign() in the formula gives.

The random baseline masks, in each image, a box of the same size as its part at a random position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..network import Network, as_network, evaluating, flat


@dataclass(frozen=True)
class Delta:
    """Delta of one layer for one masked part: mean and std over image pairs."""

    mean: float
    std: float
    pairs: int  # unordered pairs the statistics were taken over


def mask_boxes(images: torch.Tensor, boxes: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Copies of ``images`` (B, 3, H, W) with image b's box ``boxes[b]`` = (top, left, height,
    width) set to ``fill`` (0 = the normalization mean, grey). Boxes are clipped to the image."""
    b, _, h, w = images.shape
    boxes = torch.as_tensor(boxes, dtype=torch.long, device=images.device).view(b, 4)
    top, left = boxes[:, 0].view(b, 1, 1), boxes[:, 1].view(b, 1, 1)
    bottom, right = top + boxes[:, 2].view(b, 1, 1), left + boxes[:, 3].view(b, 1, 1)
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)  # (B, H, W)
    value = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    return torch.where(inside.unsqueeze(1), value, images)


def random_boxes(
    boxes: torch.Tensor, image_hw: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """Boxes (B, 4) of the same sizes as ``boxes`` at uniformly random positions inside the image,
    drawn from ``generator`` (so a seed fixes them)."""
    boxes = torch.as_tensor(boxes, dtype=torch.long).view(-1, 4).cpu()
    h, w = image_hw
    out = boxes.clone()
    for i, (_, _, bh, bw) in enumerate(boxes.tolist()):
        bh, bw = min(bh, h), min(bw, w)
        out[i, 0] = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
        out[i, 1] = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
        out[i, 2], out[i, 3] = bh, bw
    return out


def default_layers(network: Network, layers: Sequence[str] | None) -> list[str]:
    """``layers``, or the paper's pair: the last conv layer (layer 5) and the last fully connected
    one (layer 7)."""
    if layers is not None:
        return list(layers)
    return [network.spatial_layers()[-1], *network.vector_layers()[-1:]]


@torch.no_grad()
def sign_differences(
    model: nn.Module | Network,
    images: torch.Tensor,
    boxes: torch.Tensor,
    layers: Sequence[str] | None = None,
    fill: float = 0.0,
) -> dict[str, torch.Tensor]:
    """sign(x_i - x~_i) per layer: (B, D) int8 in {-1, 0, 1}, x~ masked by :func:`mask_boxes`.
    Originals and masked copies go through the model as one batch of 2B."""
    network = as_network(model)
    b = images.shape[0]
    with evaluating(network):
        batch = torch.cat([images, mask_boxes(images, boxes, fill)])
        acts, _ = network.features_and_logits(batch, default_layers(network, layers))
    return {name: torch.sign(flat(a[:b]) - flat(a[b:])).to(torch.int8).cpu() for name, a in acts.items()}


def pairwise_hamming(signs: torch.Tensor) -> torch.Tensor:
    """Fraction of differing entries for every unordered pair i < j of rows of ``signs`` (n, D):
    returns (n (n - 1) / 2,) float64, pairs in row-major order of the upper triangle."""
    n, d = signs.shape
    if n < 2:
        raise ValueError("need at least two images to compare")
    i, j = torch.triu_indices(n, n, offset=1)
    return (signs[i] != signs[j]).double().sum(dim=1) / d


def _stats(per_pair: torch.Tensor) -> Delta:
    # Population std: the pairs are all the pairs there are, not a sample of them.
    std = float(per_pair.std(unbiased=False)) if per_pair.numel() > 1 else 0.0
    return Delta(float(per_pair.mean()), std, int(per_pair.numel()))


def delta(signs: torch.Tensor) -> Delta:
    """Table 1's Delta from the sign vectors (n, D) of one layer; see the module docstring."""
    return _stats(pairwise_hamming(signs))


def correspondence(
    model: nn.Module | Network,
    images: torch.Tensor,
    boxes: torch.Tensor,
    layers: Sequence[str] | None = None,
    fill: float = 0.0,
) -> dict[str, Delta]:
    """Delta per layer for one part: ``boxes`` (n, 4) (top, left, height, width) gives that part in
    each of the n images (n, 3, H, W)."""
    signs = sign_differences(model, images, boxes, layers, fill)
    return {name: delta(s) for name, s in signs.items()}


def random_correspondence(
    model: nn.Module | Network,
    images: torch.Tensor,
    boxes: torch.Tensor,
    *,
    draws: int = 5,
    seed: int = 0,
    layers: Sequence[str] | None = None,
    fill: float = 0.0,
) -> dict[str, Delta]:
    """The random-mask row: ``draws`` independent sets of random boxes (same sizes as ``boxes``);
    the pair fractions of all draws are pooled into one mean and std."""
    layers = default_layers(as_network(model), layers)
    gen = torch.Generator().manual_seed(seed)
    hw = (images.shape[-2], images.shape[-1])
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for _ in range(draws):
        signs = sign_differences(model, images, random_boxes(boxes, hw, gen), layers, fill)
        for name, s in signs.items():
            pooled[name].append(pairwise_hamming(s))
    return {name: _stats(torch.cat(parts)) for name, parts in pooled.items()}
