"""Feature invariance to translation, scale and rotation (Zeiler & Fergus, section 4.4, Fig. 5).

Each image is transformed by every value of a sweep (vertical shift in pixels, scale factor, or
rotation in degrees) and, per layer, the Euclidean distance between the feature vector of the
transformed and of the original image is recorded, with the true-class probability.

Raw distances are not comparable across layers: a conv1 vector has ~10^4 entries of one scale, an
fc7 vector a few hundred of another. Next to the paper's raw distance each result therefore also
carries the *relative* distance ||f(T x) - f(x)|| / ||f(x)||, which is what "layer A is more
invariant than layer B" should be read from.

Pixels the transform brings in from outside the image are filled with the normalization mean (0 in
input space), the grey the occlusion analysis uses too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from ..network import Network, as_network, evaluating, flat

Kind = Literal["translate", "scale", "rotate"]
KINDS: tuple[str, ...] = ("translate", "scale", "rotate")
#: The value of each sweep that leaves an image unchanged.
IDENTITY: dict[str, float] = {"translate": 0.0, "scale": 1.0, "rotate": 0.0}


@dataclass(frozen=True)
class InvarianceResult:
    """One sweep over B images and V values; every tensor is (B, V), float32 unless noted."""

    kind: str
    values: torch.Tensor  # (V,) float64: pixels (translate), factor (scale) or degrees (rotate)
    layers: tuple[str, ...]
    distance: dict[str, torch.Tensor]  # ||f(T x) - f(x)||_2 per layer
    relative_distance: dict[str, torch.Tensor]  # distance / ||f(x)||_2 (0 where f(x) is all zero)
    true_prob: torch.Tensor  # softmax probability of the true class on T x
    top_class: torch.Tensor  # int64: most probable class on T x


def transform(images: torch.Tensor, kind: str, value: float, fill: float = 0.0) -> torch.Tensor:
    """Apply one transform to a batch. images: (B, 3, H, W) normalized -> same shape.

    translate: shift down by ``value`` pixels (negative: up); scale: zoom by ``value`` about the
    centre (>1 enlarges); rotate: ``value`` degrees counter-clockwise about the centre. Bilinear
    resampling, except that whole-pixel shifts are done by copying rows, exactly.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown transform {kind!r}; known: {KINDS}")
    if kind == "translate" and float(value).is_integer():
        return _shift_rows(images, int(value), fill)
    translate = [0.0, float(value)] if kind == "translate" else [0.0, 0.0]
    scale = float(value) if kind == "scale" else 1.0
    if scale <= 0:
        raise ValueError("scale factor must be > 0")
    # affine()'s angle turns clockwise; negate it so positive values turn counter-clockwise, the
    # convention of torchvision's rotate() and of torch.rot90.
    angle = -float(value) if kind == "rotate" else 0.0
    return TF.affine(
        images, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
        interpolation=TF.InterpolationMode.BILINEAR, fill=fill,
    )


def _shift_rows(images: torch.Tensor, dy: int, fill: float) -> torch.Tensor:
    # affine() resamples through grid_sample, which leaves ~1e-7 errors even on whole-pixel shifts;
    # copying rows keeps the original's pixels bit-exact, so a distance measures the shift only.
    out = torch.full_like(images, fill)
    h = images.shape[-2]
    if dy >= 0:
        out[..., dy:, :] = images[..., : max(h - dy, 0), :]
    else:
        out[..., : h + dy, :] = images[..., -dy:, :]
    return out


@torch.no_grad()
def invariance_sweep(
    model: nn.Module | Network,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    kind: str,
    values: Sequence[float],
    *,
    layers: Sequence[str] | None = None,
    fill: float = 0.0,
    batch_size: int = 128,
) -> InvarianceResult:
    """Sweep ``kind`` over ``values`` for every image. images: (B, 3, H, W) normalized; labels (B,).

    All (image, value) pairs are pushed through the model in batches of ``batch_size`` transformed
    images; the originals go through once.
    """
    if not values:
        raise ValueError("a sweep needs at least one value")
    network = as_network(model)
    if layers is None:  # the paper's Fig. 5 pair: the first layer and the last fully connected one
        layers = list(dict.fromkeys([network.layer_names[0], *network.vector_layers()[-1:]]))
    labels = torch.as_tensor(labels, dtype=torch.long, device=images.device).view(-1)
    b, v = images.shape[0], len(values)
    with evaluating(network):
        base, _ = network.features_and_logits(images, layers)
        base_vec = {name: flat(a) for name, a in base.items()}
        # Pairs in value-major order: transformed batches are built per value with one call each.
        transformed = torch.cat([transform(images, kind, val, fill) for val in values])  # (V*B, ...)
        pair_image = torch.arange(b, device=images.device).repeat(v)
        dist: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        true_prob, top_class = [], []
        for start in range(0, v * b, batch_size):
            batch = transformed[start : start + batch_size]
            own = pair_image[start : start + batch_size]
            acts, logits = network.features_and_logits(batch, layers)
            for name in layers:
                dist[name].append((flat(acts[name]) - base_vec[name][own]).norm(dim=1))
            prob = logits.softmax(dim=1)
            true_prob.append(prob.gather(1, labels[own].view(-1, 1)).squeeze(1))
            top_class.append(prob.argmax(dim=1))

    def grid(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts).view(v, b).T.contiguous().cpu()  # value-major -> (B, V)

    distance = {name: grid(dist[name]).float() for name in layers}
    norms = {name: base_vec[name].norm(dim=1).float().cpu() for name in layers}
    relative = {
        name: torch.where(n[:, None] > 0, distance[name] / n[:, None].clamp_min(1e-12), 0.0)
        for name, n in norms.items()
    }
    return InvarianceResult(
        kind=kind,
        values=torch.tensor([float(x) for x in values], dtype=torch.float64),
        layers=tuple(layers),
        distance=distance,
        relative_distance=relative,
        true_prob=grid(true_prob).float(),
        top_class=grid(top_class),
    )
