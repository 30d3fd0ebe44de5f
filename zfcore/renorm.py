"""Filter-RMS renormalization (paper section 3).

Any conv filter whose RMS exceeds a fixed radius is rescaled to that radius. The paper calls it
crucial for conv1, where a few filters otherwise grow to dominate. Apply after every optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_RADIUS = 0.1  # the paper's 1e-1


def filter_rms(weight: torch.Tensor) -> torch.Tensor:
    """RMS of each filter of a conv weight (out, in, kh, kw) -> (out,)."""
    return weight.detach().float().pow(2).mean(dim=(1, 2, 3)).sqrt()


@torch.no_grad()
def renormalize_filters(model: nn.Module, radius: float = DEFAULT_RADIUS) -> int:
    """Rescale, in place, every conv filter of ``model`` whose RMS exceeds ``radius``.

    Returns how many filters were rescaled (useful as a training metric).
    """
    if radius <= 0:
        raise ValueError("radius must be positive")
    rescaled = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            rms = filter_rms(module.weight)
            over = rms > radius
            if over.any():
                scale = torch.where(over, radius / rms.clamp_min(1e-12), torch.ones_like(rms))
                module.weight.mul_(scale.to(module.weight.dtype).view(-1, 1, 1, 1))
                rescaled += int(over.sum())
    return rescaled


def fraction_at_radius(conv: nn.Conv2d, radius: float = DEFAULT_RADIUS, rtol: float = 1e-3) -> float:
    """Fraction of a conv layer's filters whose RMS sits at the radius (the 'dominating' ones the
    renormalization keeps in check)."""
    rms = filter_rms(conv.weight)
    return float((rms >= radius * (1 - rtol)).float().mean())
