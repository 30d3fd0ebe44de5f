import pytest
import torch

from zfcore.zfnet import VARIANTS, ZFNet, build, count_parameters, feature_map_sizes


def test_paper_parameter_count_and_map_sizes():
    model = ZFNet(num_classes=1000)
    assert count_parameters(model) == 62_357_608
    assert feature_map_sizes(model.config) == {
        "input": 224, "conv1": 110, "pool1": 55, "conv2": 26, "pool2": 13,
        "conv3": 13, "conv4": 13, "conv5": 13, "pool5": 6,
    }


def test_paper_forward_shapes_match_fig3():
    model = ZFNet().eval()
    with torch.no_grad():
        acts = model.forward_features(torch.randn(1, 3, 224, 224), model.layer_names)
    assert {k: tuple(v.shape[1:]) for k, v in acts.items()} == {
        "conv1": (96, 110, 110), "conv2": (256, 26, 26), "conv3": (384, 13, 13),
        "conv4": (384, 13, 13), "conv5": (256, 13, 13), "fc6": (4096,), "fc7": (4096,),
    }


def test_table3_wide_variant_parameter_count():
    assert count_parameters(build("table3-wide")) == 107_627_624


def test_every_variant_builds_and_runs_at_its_size():
    for name, config in VARIANTS.items():
        if config.image_size > 64:
            continue  # the 224px variants are checked by count above; keep this fast
        model = build(name).eval()
        out = model(torch.randn(2, 3, config.image_size, config.image_size))
        assert out.shape == (2, config.num_classes)


def test_removed_layers_keep_the_other_names():
    model = build("table3-no-conv3-4-fc6-7")
    assert model.layer_names == ["conv1", "conv2", "conv5"]
    assert hasattr(model.features, "conv5") and not hasattr(model.features, "conv3")


def test_layers_are_named_modules_that_can_be_hooked():
    model = build("zfnet-small").eval()
    seen = {}
    handles = [model.activation_module(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in model.layer_names]
    try:
        x = torch.randn(2, 3, 64, 64)
        model(x)
        direct = model.forward_features(x, model.layer_names)
    finally:
        for h in handles:
            h.remove()
    for name in model.layer_names:
        assert torch.equal(seen[name], direct[name])
    names = dict(model.named_modules())
    for expected in ["features.relu1", "features.pool1", "features.norm1", "features.pool5",
                     "classifier.fc6", "classifier.drop7", "classifier.fc8"]:
        assert expected in names


def test_forward_features_rejects_unknown_layers():
    with pytest.raises(KeyError, match="conv9"):
        build("zfnet-small").forward_features(torch.randn(1, 3, 64, 64), ["conv9"])
