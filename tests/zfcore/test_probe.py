import math

import pytest
import torch

from tests.zfcore.analysis_data import held_out, stack
from zfcore.analyses.probe import (
    ProbeScore,
    extract_features,
    fit_linear_svm,
    fit_softmax,
    per_class_split,
    pooled_grid,
    probe_layers,
    random_init,
    summarize,
)
from zfcore.zfnet import build

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n_per_class: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 4
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=gen)
    return x * 50 + 7, y  # off-scale on purpose: the probes standardize


@pytest.mark.parametrize("fit", [fit_softmax, fit_linear_svm])
def test_linear_probes_separate_separable_blobs(fit):
    x, y = _blobs(20, 4, 10, seed=0)
    probe = fit(x, y, 4)
    assert probe.weight.shape == (4, 10) and probe.bias.shape == (4,)
    assert float((probe.predict(x) == y).float().mean()) == 1.0
    xt, yt = _blobs(20, 4, 10, seed=0)
    assert float((probe.predict(xt) == yt).float().mean()) == 1.0


def test_svm_margin_on_a_one_dimensional_problem():
    # Two points per class at -1 and +1 (after standardizing): the squared-hinge SVM with large C
    # puts the boundary at 0 and pushes the scores to the margin, +-1.
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1])
    probe = fit_linear_svm(x, y, 2, c=1e4)
    scores = probe.scores(torch.tensor([[-1.0], [0.0], [1.0]]))
    assert scores[1].abs().max() < 1e-3  # boundary midway
    assert scores[2, 1] == pytest.approx(1.0, abs=1e-2) and scores[0, 0] == pytest.approx(1.0, abs=1e-2)


def test_per_class_split_draws_n_per_class_disjoint():
    labels = torch.tensor([0] * 6 + [1] * 8 + [2] * 5)
    train, test = per_class_split(labels, 3, torch.Generator().manual_seed(1), n_test=2)
    assert torch.bincount(labels[train]).tolist() == [3, 3, 3]
    assert torch.bincount(labels[test]).tolist() == [2, 2, 2]
    assert not set(train.tolist()) & set(test.tolist())
    with pytest.raises(ValueError):
        per_class_split(labels, 5, torch.Generator())


def test_summarize_is_mean_and_population_std_over_folds():
    scores = [ProbeScore("fc7", "svm", f, a, 10, 10) for f, a in enumerate([0.5, 0.7])]
    scores.append(ProbeScore("conv5", "svm", 0, 0.4, 10, 10))
    (fc7, conv5) = summarize(scores)
    assert (fc7.layer, fc7.folds) == ("fc7", 2) and math.isclose(fc7.mean, 0.6) and math.isclose(fc7.std, 0.1)
    assert (conv5.mean, conv5.std, conv5.folds) == (0.4, 0.0, 1)


def test_random_init_is_seeded_and_leaves_the_global_rng(trained_small):
    model = trained_small[0]
    state = torch.random.get_rng_state()
    a, b = random_init(model, 3), random_init(model, 3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.features.conv1.weight, b.features.conv1.weight)
    assert not torch.equal(a.features.conv1.weight, model.features.conv1.weight)


def test_trained_features_beat_random_init_and_rise_with_depth(trained_small):
    """Tables 4/5 and 7 in direction: frozen trained features beat the same architecture at random
    init, and deep layers beat shallow ones."""
    model = trained_small[0]
    dataset = held_out(300)
    images, labels, _ = stack([dataset[i] for i in range(len(dataset))])
    layers = ("conv2", "conv5", "fc7")
    common = dict(n_train=10, folds=2, n_test=15, seed=0)
    trained = summarize(probe_layers(extract_features(model, images, layers), labels, 10, **common))
    base = summarize(probe_layers(extract_features(random_init(model), images, layers), labels, 10, **common))
    acc = {(s.layer, s.classifier): s.mean for s in trained}
    chance = {(s.layer, s.classifier): s.mean for s in base}
    for clf in ("softmax", "svm"):
        assert acc["fc7", clf] > chance["fc7", clf] + 0.3, (acc, chance)
        assert acc["conv5", clf] > chance["conv5", clf] + 0.3, (acc, chance)
        assert acc["fc7", clf] > acc["conv2", clf] + 0.1, acc
    assert all(s.folds == 2 for s in trained + base)


def test_extract_features_pools_conv_maps_to_a_grid():
    model = random_init(build("zfnet-small"), seed=0)
    images = torch.randn(5, 3, 64, 64)
    full = extract_features(model, images, ["conv1", "fc7"], batch_size=2)
    pooled = extract_features(model, images, ["conv1", "fc7"], grid=2)
    assert full["conv1"].shape == (5, 32 * 30 * 30) and pooled["conv1"].shape == (5, 32 * 4)
    torch.testing.assert_close(full["fc7"], pooled["fc7"])


def test_pooled_grid_caps_the_feature_length():
    assert pooled_grid(32, 30, 32768) is None  # 28800 values fit
    assert pooled_grid(96, 110, 32768) == 18  # the paper's conv1: 96 * 18^2 = 31104
    assert pooled_grid(10_000, 3, 100) == 1
    model = random_init(build("zfnet-small"), seed=0)
    feats = extract_features(model, torch.randn(2, 3, 64, 64), ["conv1", "conv5"], grid={"conv1": 3})
    assert feats["conv1"].shape == (2, 32 * 9) and feats["conv5"].shape == (2, 64 * 3 * 3)
