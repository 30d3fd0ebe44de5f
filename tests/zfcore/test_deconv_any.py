"""The deconvnet of any ReLU network (zfcore.deconv on torchvision models and odd small nets),
against a reference written here independently: a copy of the network whose every nn.ReLU module
is swapped for a rectifying one and whose functional relu is patched, then plain autograd."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from zfcore.deconv import DeconvError, deconvolve, inspect, project
from zfcore.network import Network, Preprocess, as_network, attach
from zfcore.zfnet import build

SIZE = 64  # every model below runs at 64 px; float64 keeps the comparison at 1e-5 meaningful


class _RefRectify(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


class _RefReLU(nn.Module):
    def forward(self, x):
        return _RefRectify.apply(x)


def _swap_relus(module: nn.Module) -> None:
    swapped: dict[int, nn.Module] = {}  # one replacement per ReLU object, so a reused ReLU stays reused
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(module, name, swapped.setdefault(id(child), _RefReLU()))
        else:
            _swap_relus(child)


def reference(model: nn.Module, x: torch.Tensor, layer: str, channels, positions) -> torch.Tensor:
    """Autograd of the chosen activations with every ReLU rectifying the gradient."""
    ref = copy.deepcopy(model).eval()
    _swap_relus(ref)
    out: dict[str, torch.Tensor] = {}
    handle = ref.get_submodule(layer).register_forward_hook(lambda m, i, o: out.setdefault("a", o))
    x = x.detach().clone().requires_grad_(True)

    def relu(t, inplace=False):
        return _RefRectify.apply(t)

    try:
        with mock.patch.object(F, "relu", relu), mock.patch.object(torch, "relu", relu):
            ref(x)
    finally:
        handle.remove()
    acts = out["a"]
    signal = torch.zeros_like(acts)
    for b, c in enumerate(channels):
        if acts.ndim == 4:
            y, xx = positions[b]
            signal[b, c, y, xx] = acts[b, c, y, xx].detach()
        else:
            signal[b, c] = acts[b, c].detach()
    (grad,) = torch.autograd.grad(acts, x, grad_outputs=signal)
    return grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return tvm.get_model(name, weights=None, num_classes=10).double().eval()


def _strongest(model: nn.Module, x: torch.Tensor, layer: str, channels: list[int]) -> list[tuple]:
    """Each image's strongest position in its channel (where a projection is worth comparing)."""
    acts = as_network(model).features(x, [layer])[layer]
    if acts.ndim != 4:
        return [(0, 0)] * len(channels)
    out = []
    for b, c in enumerate(channels):
        flat = int(acts[b, c].flatten().argmax())
        out.append((flat // acts.shape[-1], flat % acts.shape[-1]))
    return out


CASES = {
    "alexnet": ["features.1", "features.7", "features.11", "classifier.5"],
    "vgg16": ["features.8", "features.22", "features.29"],
    "resnet18": ["layer1", "layer2.0.bn1", "layer3", "layer4", "avgpool"],
    "resnet50": ["layer1", "layer3.2", "layer4"],
    "densenet121": [
        "features.denseblock1", "features.transition2", "features.denseblock3.denselayer5", "features",
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_project_equals_the_independent_reference(name: str) -> None:
    torch.set_num_threads(2)
    model = _model(name)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for layer in CASES[name]:
        channels = [1, 3]
        positions = _strongest(model, x, layer, channels)
        out = deconvolve(model, x, layer, channels, positions)
        ref = reference(model, x, layer, channels, positions)
        assert out.projections.shape == x.shape
        assert float(ref.abs().max()) > 0, (name, layer)  # a projection worth comparing
        assert rel_err(out.projections, ref) <= 1e-5, (name, layer, rel_err(out.projections, ref))


class OddNet(nn.Module):
    """An in-place ReLU, one ReLU module used twice, a functional relu, a residual sum, a
    concatenation, a grouped dilated conv, eval BatchNorm and an average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu_inplace = nn.ReLU(inplace=True)
        self.shared = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        x = self.relu_inplace(self.bn(self.conv1(x)))
        y = self.shared(self.conv2(x))
        x = self.shared(x + y)  # the same ReLU module a second time
        x = self.pool(torch.cat([x, F.relu(y)], dim=1))
        x = self.avg(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def _odd() -> OddNet:
    torch.manual_seed(0)
    net = OddNet().double().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    attach(Network(net, None, Preprocess(32)))  # its fc fixes the input size: 32 px
    return net


def test_odd_relus_and_graph_ops() -> None:
    net = _odd()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    names = set(as_network(net).layer_names)
    assert {"conv1", "bn", "relu_inplace", "conv2", "pool", "conv3", "avg"} <= names
    assert "shared" not in as_network(net).layer_names  # called twice: no single activation
    for layer in ["relu_inplace", "conv2", "pool", "avg"]:
        channels = [0, 2, 5]
        positions = _strongest(net, x, layer, channels)
        out = project(net, x, layer, channels, positions)
        assert rel_err(out, reference(net, x, layer, channels, positions)) <= 1e-10, layer
    report = inspect(net, "avg", 32)
    assert report.rectified == 4 and not report.gradient_through


def test_zfnet_graph_path_equals_its_tape() -> None:
    torch.manual_seed(0)
    model = build("zfnet-small").double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for layer, relus, norms in [("conv1", 1, 0), ("conv3", 3, 2), ("conv5", 5, 2), ("fc7", 7, 2)]:
        tape = deconvolve(model, x, layer, [0, 1], method="chain")
        graph = deconvolve(model, x, layer, [0, 1], method="graph")
        assert torch.equal(graph.positions, tape.positions)
        assert rel_err(graph.projections, tape.projections) <= 1e-10, layer
        assert torch.equal(deconvolve(model, x, layer, [0, 1]).projections, tape.projections)  # auto: tape
        report = inspect(model, layer, 64)
        seen = (report.rectified, report.normalizations_skipped, report.gradient_through)
        assert seen == (relus, norms, set())


class SignNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.out = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.out(torch.sign(self.conv(x)))


class SiLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.SiLU()
        self.out = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.out(self.act(self.conv(x)))


def test_activations_without_a_rule_and_ops_without_a_gradient() -> None:
    report = inspect(SiLUNet().eval(), "out", 16)
    assert report.gradient_through == {"silu"} and report.rectified == 0
    with pytest.raises(DeconvError, match="cannot invert sign"):
        inspect(SignNet().eval(), "out", 16)


def test_nothing_is_left_behind_after_an_error() -> None:
    net = SignNet().eval()
    with pytest.raises(DeconvError):
        project(net, torch.randn(1, 3, 16, 16), "out", [0])
    # The mode is gone: sign and relu behave as plain torch ops again, and no hook remains.
    t = torch.tensor([-2.0, 3.0], requires_grad=True)
    torch.relu(t).sum().backward()
    assert t.grad.tolist() == [0.0, 1.0] and torch.sign(t).tolist() == [-1.0, 1.0]
    for m in net.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
    with pytest.raises(KeyError, match="did you mean 'conv'"):
        project(net, torch.randn(1, 3, 16, 16), "convv", [0])
