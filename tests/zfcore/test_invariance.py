import pytest
import torch

from tests.zfcore.analysis_data import held_out, stack
from zfcore.analyses.invariance import IDENTITY, KINDS, invariance_sweep, transform

pytestmark = pytest.mark.usefixtures("one_thread")


def test_identity_values_leave_images_unchanged():
    x = torch.randn(2, 3, 16, 16)
    for kind in KINDS:
        assert torch.equal(transform(x, kind, IDENTITY[kind]), x)


def test_translate_shifts_rows_down_and_fills_grey():
    x = torch.randn(1, 3, 10, 10)
    y = transform(x, "translate", 3)
    assert torch.equal(y[..., 3:, :], x[..., :-3, :])
    assert torch.equal(y[..., :3, :], torch.zeros(1, 3, 3, 10))
    assert torch.equal(transform(x, "translate", -2)[..., :-2, :], x[..., 2:, :])
    assert torch.equal(transform(x, "translate", 12), torch.zeros_like(x))
    # Fractional shifts resample: half a pixel down is the mean of neighbouring rows.
    half = transform(x, "translate", 0.5)
    torch.testing.assert_close(half[..., 1:, :], (x[..., 1:, :] + x[..., :-1, :]) / 2)


def test_rotate_is_counter_clockwise_and_scale_zooms_about_the_centre():
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(transform(x, "rotate", 90), torch.rot90(x, 1, dims=(2, 3)))
    # Doubling the size puts the (odd-sized) image's centre pixel where it was.
    torch.testing.assert_close(transform(x, "scale", 2.0)[..., 4, 4], x[..., 4, 4])
    with pytest.raises(ValueError):
        transform(x, "shear", 1.0)


def test_sweep_distances_are_feature_distances(trained_small):
    model = trained_small[0]
    images, labels, _ = stack([held_out(3)[i] for i in range(3)])
    r = invariance_sweep(model, images, labels, "translate", [0, 5], layers=("conv1", "fc7"), batch_size=4)
    assert r.values.tolist() == [0.0, 5.0]
    for name in ("conv1", "fc7"):
        assert r.distance[name].shape == (3, 2)
        # Zero shift: identical images; only float noise of a different batch composition remains.
        assert torch.all(r.relative_distance[name][:, 0] < 1e-5)
    with torch.no_grad():
        base = model.forward_features(images, ["fc7"])["fc7"]
        moved = model.forward_features(transform(images, "translate", 5), ["fc7"])["fc7"]
        prob = model(transform(images, "translate", 5)).softmax(dim=1)
    expected = (moved - base).norm(dim=1)
    torch.testing.assert_close(r.distance["fc7"][:, 1], expected, rtol=1e-5, atol=1e-6)
    relative = expected / base.norm(dim=1)
    torch.testing.assert_close(r.relative_distance["fc7"][:, 1], relative, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.true_prob[:, 1], prob[torch.arange(3), labels], rtol=1e-5, atol=1e-6)
    assert torch.equal(r.top_class[:, 1], prob.argmax(dim=1))


def test_small_translations_move_conv1_more_than_fc7(trained_small):
    """Fig. 5: deeper layers are more invariant. Distances are relative to the original feature
    vector's norm, ||f(Tx) - f(x)|| / ||f(x)||, so layers of different size and scale compare."""
    model = trained_small[0]
    dataset = held_out(8)
    images, labels, _ = stack([dataset[i] for i in range(len(dataset))])
    shifts = [-4, -2, -1, 1, 2, 4]
    r = invariance_sweep(model, images, labels, "translate", shifts, layers=("conv1", "fc7"))
    conv1 = r.relative_distance["conv1"].mean(dim=0)
    fc7 = r.relative_distance["fc7"].mean(dim=0)
    assert torch.all(conv1 > fc7), (conv1, fc7)
    assert float(conv1.mean()) > 2 * float(fc7.mean()), (conv1, fc7)
    # The class survives small shifts.
    assert float(r.true_prob.mean()) > 0.7
