import pytest
import torch
import torchvision
from torch import nn

from tests.zfcore.analysis_data import held_out
from zfcore.analyses.occlusion import occlude, occlusion_sensitivity, pixel_map, square_offsets, strongest_map
from zfcore.analyses.windowed import WindowedPrefix, windowed
from zfcore.data import to_tensor
from zfcore.deconv import project
from zfcore.network import as_network
from zfcore.zfnet import build

pytestmark = pytest.mark.usefixtures("one_thread")


def test_square_offsets_step_and_cover_the_edge():
    assert square_offsets(64, 16, 4).tolist() == list(range(0, 49, 4))
    # 10 px, square 4, stride 4: 0, 4, then one flush with the edge so pixels 8-9 are covered.
    assert square_offsets(10, 4, 4).tolist() == [0, 4, 6]
    assert square_offsets(5, 5, 3).tolist() == [0]
    with pytest.raises(ValueError):
        square_offsets(8, 9, 1)


def test_occlude_sets_exactly_each_square():
    image = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6) + 1  # (C=2, H=5, W=6)
    out = occlude(image, torch.tensor([0, 3]), torch.tensor([1, 4]), 2, fill=(-1.0, -2.0))
    assert out.shape == (2, 2, 5, 6)
    expected = image.clone().repeat(2, 1, 1, 1)
    expected[0, 0, 0:2, 1:3], expected[0, 1, 0:2, 1:3] = -1, -2
    expected[1, 0, 3:5, 4:6], expected[1, 1, 3:5, 4:6] = -1, -2
    assert torch.equal(out, expected)


def test_pixel_map_averages_covering_squares():
    # 6 px wide row of squares of size 4 at lefts 0 and 2: pixels 2-3 are covered by both.
    values = torch.tensor([[1.0, 3.0]])
    out = pixel_map(values, torch.tensor([0]), torch.tensor([0, 2]), 4, (4, 6))
    assert out[0].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert torch.equal(out[3], out[0])


def test_strongest_map_is_the_largest_spatial_maximum():
    acts = torch.zeros(3, 2, 2)
    acts[0] = 1.0  # largest sum, small peak
    acts[2, 1, 1] = 2.0  # largest peak
    assert strongest_map(acts) == 2
    assert strongest_map(torch.tensor([0.5, 3.0, 1.0])) == 1


def _one_forward_per_position(model, image, label, layer, channel, size, stride):
    """The naive reference: clone, grey out, one forward each (written without zfcore.analyses.occlusion)."""
    rows = []
    for top in square_offsets(image.shape[1], size, stride).tolist():
        row = []
        for left in square_offsets(image.shape[2], size, stride).tolist():
            x = image.clone()
            x[:, top : top + size, left : left + size] = 0.0
            x = x.unsqueeze(0)
            with torch.no_grad():
                act = model.forward_features(x, [layer])[layer][0, channel].sum()
                prob = model(x).softmax(dim=1)[0]
            row.append((float(act), float(prob[label]), int(prob.argmax())))
        rows.append(row)
    return rows


def test_batched_occlusion_equals_one_forward_per_position(trained_small):
    model = trained_small[0]
    sample = held_out(1)[0]
    image = to_tensor(sample.image)[0]
    # batch_size 37 does not divide the 13 x 13 = 169 positions: the ragged last batch is covered.
    result = occlusion_sensitivity(
        model, image, sample.label, layer="conv5", size=16, stride=4, batch_size=37
    )
    reference = torch.tensor(
        _one_forward_per_position(model, image, sample.label, "conv5", result.channel, 16, 4),
        dtype=torch.float64,
    )
    torch.testing.assert_close(result.activation.double(), reference[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.true_prob.double(), reference[..., 1], rtol=1e-5, atol=1e-5)
    assert torch.equal(result.top_class, reference[..., 2].long())
    single = occlusion_sensitivity(model, image, sample.label, layer="conv5", size=16, stride=4, batch_size=1)
    torch.testing.assert_close(single.true_prob, result.true_prob, rtol=1e-5, atol=1e-5)


def test_occluding_the_object_hurts_more_than_occluding_background(trained_small):
    """Fig. 7's point: the classifier relies on the object, not the context."""
    model = trained_small[0]
    size, gaps, object_probs = 16, [], []
    dataset = held_out(12)
    for i in range(len(dataset)):
        sample = dataset[i]
        r = occlusion_sensitivity(model, to_tensor(sample.image)[0], sample.label, size=size, stride=4)
        if r.base_top_class != sample.label:
            continue  # only images the model gets right say what it relies on
        top, left, h, w = sample.box
        t, lf = r.tops[:, None], r.lefts[None, :]
        on_object = (t >= top) & (t + size <= top + h) & (lf >= left) & (lf + size <= left + w)
        off_object = (t + size <= top) | (t >= top + h) | (lf + size <= left) | (lf >= left + w)
        if not on_object.any() or not off_object.any():
            continue
        gaps.append(float(r.true_prob[off_object].mean() - r.true_prob[on_object].mean()))
        object_probs.append(float(r.true_prob[on_object].mean()))
    assert len(gaps) >= 6
    assert sum(g > 0 for g in gaps) >= 0.8 * len(gaps), gaps
    assert sum(gaps) / len(gaps) > 0.1, gaps


def test_projection_is_the_deconv_of_the_strongest_map(trained_small):
    model = trained_small[0]
    sample = held_out(2)[1]
    image = to_tensor(sample.image)[0]
    r = occlusion_sensitivity(model, image, sample.label, layer="conv5", size=24, stride=20)
    with torch.no_grad():
        acts = model.forward_features(image.unsqueeze(0), ["conv5"])["conv5"][0]
    assert r.channel == strongest_map(acts)
    assert r.base_activation == pytest.approx(float(acts[r.channel].sum()), rel=1e-5)
    torch.testing.assert_close(r.projection, project(model, image.unsqueeze(0), "conv5", [r.channel])[0])
    assert r.projection.shape == image.shape


def test_fc_layer_and_training_mode_is_restored():
    torch.manual_seed(0)
    model = build("zfnet-small").train()
    image = torch.randn(3, 64, 64)
    r = occlusion_sensitivity(model, image, 3, layer="fc7", size=32, stride=32)
    assert model.training
    assert r.activation.shape == r.true_prob.shape == (2, 2)
    assert torch.all((r.true_prob >= 0) & (r.true_prob <= 1))


class _OddNet(nn.Module):
    """Not a chain: a dilated, padded, strided first conv, eval BatchNorm, a padded pool, a 1x1
    stride-2 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2, padding=1)
        self.c = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(self.pool(torch.relu(self.bn(self.a(x)))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("size,stride", [(16, 4), (7, 3), (1, 9), (5, 5), (64, 8)])
@pytest.mark.parametrize("net,layer,side", [
    ("zfnet-small", None, 64), ("zfnet-small", "conv1", 64), ("zfnet-small", "conv2", 64),
    ("resnet18", None, 64), ("odd", "c", 33),
])
def test_windowed_first_layers_equal_plain_forward_passes(net, layer, side, size, stride):
    """Recomputing the first layers only around each square (zfcore.analyses.windowed) changes no
    result: on a chain (ZFNet: conv/ReLU/pool/LRN, also when the asked layer is inside that
    prefix), on torchvision's ResNet (its first conv), on an odd net (dilation, BN, padded pool)."""
    torch.manual_seed(0)
    model = {"zfnet-small": lambda: build("zfnet-small"), "odd": _OddNet,
             "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=10)}[net]().eval()
    image = torch.randn(3, side, side)
    size = min(size, side)
    kw = {"size": size, "stride": stride, "batch_size": 32, **({"layer": layer} if layer else {})}
    fast = occlusion_sensitivity(model, image, 1, window=True, **kw)
    plain = occlusion_sensitivity(model, image, 1, window=False, **kw)
    scale = float(plain.activation.abs().max()) or 1.0
    assert float((fast.activation - plain.activation).abs().max()) <= 1e-5 * scale
    assert torch.allclose(fast.true_prob, plain.true_prob, atol=1e-6)
    assert torch.equal(fast.top_class, plain.top_class)
    network = as_network(model)
    prefix = WindowedPrefix.plan(network, image.unsqueeze(0), size, network.layer_module(fast.layer))
    assert prefix is not None  # something was windowed
    if net == "zfnet-small" and size <= 16 and layer is None:
        assert [type(lay.module).__name__ for lay in prefix.layers][:4] == [
            "Conv2d", "ReLU", "MaxPool2d", "LocalResponseNorm"]


def test_windowing_leaves_no_patched_forward_even_after_an_error():
    model = build("zfnet-small").eval()
    network = as_network(model)
    image = torch.randn(1, 3, 64, 64)
    prefix = WindowedPrefix.plan(network, image, 16, network.layer_module("conv5"))
    modules = [layer.module for layer in prefix.layers]
    with pytest.raises(RuntimeError, match="boom"), windowed(prefix, {"batch": image}):
        assert all("forward" in m.__dict__ for m in modules)
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in modules)
    with torch.no_grad():  # and the modules compute as before
        assert torch.equal(model(image), model(image.clone()))
