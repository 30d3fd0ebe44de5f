import torch
from torch import nn

from zfcore.renorm import filter_rms, fraction_at_radius, renormalize_filters


def test_filters_over_radius_are_rescaled_and_others_untouched():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
        conv.weight[0].mul_(0.001)  # well under the radius
    before = conv.weight.detach().clone()
    rms_before = filter_rms(before)
    n = renormalize_filters(nn.Sequential(conv), radius=0.1)
    rms = filter_rms(conv.weight)
    over = rms_before > 0.1
    assert n == int(over.sum()) and n >= 3
    assert torch.allclose(rms[over], torch.full_like(rms[over], 0.1), rtol=1e-5)
    assert torch.equal(conv.weight[~over], before[~over])
    # Direction is kept: only the scale changes.
    cos = nn.functional.cosine_similarity(conv.weight.flatten(1), before.flatten(1))
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)
    assert fraction_at_radius(conv) == n / 4


def test_linear_layers_are_not_renormalized():
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight.fill_(5.0)
    assert renormalize_filters(lin) == 0
    assert float(lin.weight.mean()) == 5.0
