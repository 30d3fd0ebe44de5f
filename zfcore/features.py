"""Activations of chosen layers *and* the class scores from one forward pass.

``ZFNet.forward_features`` stops at the deepest requested layer, which is what the atlas wants. The
analyses (occlusion, invariance, correspondence) need the activations and the softmax of the same
pass, so this runs the whole network once and keeps both instead of doing two passes per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from .model import ZFNet


@contextmanager
def evaluating(model: ZFNet) -> Iterator[ZFNet]:
    """Put ``model`` in eval mode (dropout off) for the block and restore its mode afterwards, so an
    analysis never leaves a caller's training model switched."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def features_and_logits(
    model: ZFNet, images: torch.Tensor, layers: Iterable[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One full forward pass: (activations by layer name, logits).

    images: (B, 3, H, W). Conv activations are (B, C, H', W'), fc activations (B, F), both post-ReLU
    as in :meth:`ZFNet.forward_features`; logits are (B, num_classes). Call it in eval mode.
    """
    wanted = set(layers)
    unknown = wanted - set(model.layer_names)
    if unknown:
        raise KeyError(f"unknown layers {sorted(unknown)}; this model has {model.layer_names}")
    out: dict[str, torch.Tensor] = {}
    x = images
    for seq, prefix in ((model.features, "conv"), (model.classifier, "fc")):
        for name, module in seq.named_children():
            x = module(x)
            if name.startswith("relu") and f"{prefix}{name[4:]}" in wanted:
                out[f"{prefix}{name[4:]}"] = x
    return out, x


def flat(activation: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D): a layer's activation as one feature vector per image (the paper's x^l)."""
    return activation.reshape(activation.shape[0], -1)
