import pytest
import torch
import torch.nn.functional as F

from zfcore.deconv import deconvolve, project, project_autograd, unpool_adjoint
from zfcore.zfnet import ConvStage, ZFNet, ZFNetConfig, build


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return build("zfnet-small").eval()


def tiny_net() -> ZFNet:
    """1-channel net on 5x5 images: 1x1 conv (w=2) -> 3x3/2 pool -> 2x2 conv (all ones)."""
    config = ZFNetConfig(
        conv=(ConvStage("conv1", 1, 1, pool=True), ConvStage("conv2", 1, 2)),
        fc=(), num_classes=1, image_size=5, in_channels=1,
    )
    net = ZFNet(config=config).eval()
    with torch.no_grad():
        net.features.conv1.weight.fill_(2.0)
        net.features.conv1.bias.zero_()
        net.features.conv2.weight.fill_(1.0)
        net.features.conv2.bias.zero_()
    return net


def test_golden_overlapping_switches_add():
    # One bright pixel at (2, 2) is the max of all four overlapping 3x3/2 windows, so all four
    # pool outputs share that switch. conv1 = 2, pool = 2 everywhere, conv2 = 4 * 2 = 8.
    # Down: 8 -> conv2^T spreads 8 to the four pool outputs -> unpool adds them: 32 at (2, 2)
    # -> conv1^T: 64. An overwriting unpool (MaxUnpool2d) would give 2 * 8 = 16.
    net = tiny_net()
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    out = deconvolve(net, x, "conv2", [0])
    assert float(out.activations[0]) == 8.0
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 2, 2] = 64.0
    assert torch.equal(out.projections, expected)
    assert torch.equal(project_autograd(net, x, "conv2", [0]), expected)


def test_unpool_is_the_exact_adjoint_of_max_pool():
    torch.manual_seed(1)
    y = torch.randn(3, 4, 13, 13)
    pooled, switches = F.max_pool2d(y, 3, 2, 1, return_indices=True)
    g = torch.randn_like(pooled)
    lhs = (unpool_adjoint(g, switches, y.shape) * y).sum()
    rhs = (g * pooled).sum()
    assert abs(float(lhs - rhs)) <= 1e-4 * float(rhs.abs() + 1)
    # With overlaps some switches are shared, and MaxUnpool2d loses mass there.
    ones = torch.ones_like(pooled)
    unpool_sum = F.max_unpool2d(ones, switches, 3, 2, 1, output_size=y.shape[-2:]).sum()
    assert float(unpool_adjoint(ones, switches, y.shape).sum()) == ones.numel()
    assert float(unpool_sum) < ones.numel()


def test_conv1_projection_is_the_transposed_filter_times_the_value(small):
    # For conv1, <projection, x> = value * (pre-activation - bias): the adjoint identity.
    torch.manual_seed(2)
    x = torch.randn(4, 3, 64, 64)
    out = deconvolve(small, x, "conv1", [0, 5, 9, 31])
    bias = small.features.conv1.bias[[0, 5, 9, 31]]
    lhs = (out.projections * x).flatten(1).sum(1)
    active = out.activations > 0
    assert torch.allclose(lhs[active], (out.activations * (out.activations - bias))[active], rtol=1e-4)


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"])
def test_matches_autograd_with_relu_on_the_signal(small, layer):
    torch.manual_seed(3)
    x = torch.randn(6, 3, 64, 64)
    n = small.forward_features(x[:1], [layer])[layer].shape[1]
    channels = torch.randint(0, n, (6,))
    ours = project(small, x, layer, channels)
    ref = project_autograd(small, x, layer, channels)
    assert ours.shape == x.shape
    assert ours.abs().sum() > 0
    assert rel_err(ours, ref) <= 1e-5


def test_paper_network_matches_autograd_at_224():
    torch.manual_seed(4)
    net = ZFNet().eval()
    x = torch.randn(2, 3, 224, 224)
    for layer in ["conv2", "conv5"]:
        ours = project(net, x, layer, [3, 200])
        assert rel_err(ours, project_autograd(net, x, layer, [3, 200])) <= 1e-5


def test_given_positions_and_strongest_position(small):
    torch.manual_seed(5)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        acts = small.forward_features(x, ["conv2"])["conv2"]
    strongest = deconvolve(small, x, "conv2", [1, 2, 3])
    for b, c in enumerate([1, 2, 3]):
        y, xx = strongest.positions[b].tolist()
        assert float(strongest.activations[b]) == float(acts[b, c].detach().max())
        assert float(acts[b, c, y, xx]) == float(acts[b, c].max())
    given = deconvolve(small, x, "conv2", [1, 2, 3], positions=[(0, 0), (5, 5), (2, 3)])
    assert given.positions.tolist() == [[0, 0], [5, 5], [2, 3]]
    assert float(given.activations[2]) == float(acts[2, 3, 2, 3])
    ref = project_autograd(small, x, "conv2", [1, 2, 3], positions=[(0, 0), (5, 5), (2, 3)])
    assert rel_err(given.projections, ref) <= 1e-5


def test_batched_equals_one_item_at_a_time(small):
    torch.manual_seed(6)
    x = torch.randn(8, 3, 64, 64)
    channels = list(range(8))
    batched = project(small, x, "conv3", channels)
    single = torch.cat([project(small, x[i : i + 1], "conv3", [c]) for i, c in enumerate(channels)])
    assert rel_err(batched, single) <= 1e-6


def test_hooks_are_removed_even_after_an_error(small):
    def hook_count() -> int:
        return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in small.modules())

    before = hook_count()
    with pytest.raises(ValueError, match="channels"):
        project_autograd(small, torch.randn(2, 3, 64, 64), "conv1", [0, 999])
    assert hook_count() == before == 0
    assert not small.training


def test_bad_arguments_are_clear_errors(small):
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="2 images"):
        project(small, x, "conv1", [0])
    with pytest.raises(ValueError, match="positions"):
        project(small, x, "conv1", [0, 1], positions=[(0, 0), (99, 0)])
    with pytest.raises(KeyError, match="conv9"):
        project(small, x, "conv9", [0, 1])
