import pytest
import torch

from tests.zfcore.analysis_data import held_out
from zfcore.analyses.occlusion import occlude, occlusion_sensitivity, pixel_map, square_offsets, strongest_map
from zfcore.data import to_tensor
from zfcore.deconv import project
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
