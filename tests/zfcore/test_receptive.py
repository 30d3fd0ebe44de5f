import torch

from zfcore.receptive import Box, crop, receptive_box, receptive_boxes
from zfcore.zfnet import build


def brute_force_boxes(model, layer: str, size: int) -> dict[tuple[int, int], Box]:
    """Perturb each input pixel and see which activations of ``layer`` move. Positive weights and
    a positive input make every path live, so the moved set is the whole receptive field."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.rand_like(m.weight) * 0.1 + 0.01)
                m.bias.zero_()
    base_img = torch.full((1, 3, size, size), 0.5)
    with torch.no_grad():
        base = model.forward_features(base_img, [layer])[layer][0].sum(0)  # (H', W')
        moved: dict[tuple[int, int], list[tuple[int, int]]] = {}
        pixels = [(y, x) for y in range(size) for x in range(size)]
        for start in range(0, len(pixels), 256):
            chunk = pixels[start : start + 256]
            imgs = base_img.repeat(len(chunk), 1, 1, 1)
            for i, (y, x) in enumerate(chunk):
                imgs[i, :, y, x] = 50.0
            acts = model.forward_features(imgs, [layer])[layer].sum(1)
            changed = (acts - base).abs() > 1e-6
            for i, pix in enumerate(chunk):
                for p in changed[i].nonzero().tolist():
                    moved.setdefault(tuple(p), []).append(pix)
    boxes = {}
    for p, pix in moved.items():
        ys, xs = [a for a, _ in pix], [b for _, b in pix]
        boxes[p] = Box(min(ys), min(xs), max(ys) - min(ys) + 1, max(xs) - min(xs) + 1)
    return boxes


def test_boxes_match_brute_force_on_conv1_and_conv2():
    torch.manual_seed(0)
    model = build("zfnet-small").eval()
    for layer in ["conv1", "conv2"]:
        brute = brute_force_boxes(model, layer, 64)
        assert brute, layer
        for (y, x), box in brute.items():
            assert receptive_box(model, layer, y, x, 64) == box, (layer, y, x)


def test_paper_conv1_box_and_clipping():
    model = build("zfnet")
    # conv1: 7x7 stride 2 pad 1 -> position (10, 20) sees rows 19..25, cols 39..45.
    assert receptive_box(model, "conv1", 10, 20, 224) == Box(19, 39, 7, 7)
    assert receptive_box(model, "conv1", 0, 0, 224) == Box(0, 0, 6, 6)  # clipped by padding
    deep = receptive_box(model, "conv5", 6, 6, 224)
    assert deep.height > 100 and deep.top >= 0 and deep.top + deep.height <= 224
    assert receptive_box(model, "fc7", 0, 0, 224) == Box(0, 0, 224, 224)
    many = receptive_boxes(model, "conv1", [[10, 20], [0, 0]], 224)
    assert many.tolist() == [[19, 39, 7, 7], [0, 0, 6, 6]]


def test_crop_layouts():
    import numpy as np

    img = np.arange(10 * 10 * 3).reshape(10, 10, 3)
    assert crop(img, Box(2, 3, 4, 5)).shape == (4, 5, 3)
    t = torch.zeros(3, 10, 10)
    assert crop(t, Box(2, 3, 4, 5)).shape == (3, 4, 5)


def test_a_net_whose_fc_layers_fit_one_size_has_its_conv_fields_at_any_size():
    # zfnet-small's fc6 is sized for 64 px; at 224 px its conv layers still run and have fields.
    from zfcore.network import as_network

    network = as_network(build("zfnet-small").eval())
    assert list(network.layers(224)) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert "fc6" in network.layers(64)
    box = receptive_box(network, "conv5", 6, 6, 224)
    assert box.height == box.width and 64 < box.height < 224
