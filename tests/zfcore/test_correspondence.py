import itertools
import math

import pytest
import torch

from tests.zfcore.analysis_data import held_out, of_class, stack
from zfcore.analyses.correspondence import (
    correspondence,
    delta,
    mask_boxes,
    pairwise_hamming,
    random_boxes,
    random_correspondence,
)
from zfcore.zfnet import build

pytestmark = pytest.mark.usefixtures("one_thread")

SIGNS = torch.tensor([[1, 0, -1, 1], [1, 1, -1, -1], [1, 0, -1, 1]], dtype=torch.int8)


def test_pairwise_hamming_golden():
    # (0,1) differ at 2 of 4 entries, (0,2) at none, (1,2) at 2: a zero sign is its own value.
    assert pairwise_hamming(SIGNS).tolist() == [0.5, 0.0, 0.5]
    d = delta(SIGNS)
    assert d.pairs == 3
    assert math.isclose(d.mean, 1 / 3)
    assert math.isclose(d.std, math.sqrt(1 / 18))


def test_delta_is_the_papers_sum_over_ordered_pairs_normalized():
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(-1, 2, (5, 40), generator=gen).to(torch.int8)
    n, dim = signs.shape
    paper_sum = sum(int((signs[i] != signs[j]).sum()) for i, j in itertools.permutations(range(n), 2))
    assert math.isclose(delta(signs).mean, paper_sum / (n * (n - 1) * dim))


def test_mask_boxes_and_random_boxes():
    images = torch.ones(2, 3, 6, 8)
    boxes = torch.tensor([[1, 2, 2, 3], [4, 6, 5, 5]])  # the second runs off the image: clipped
    out = mask_boxes(images, boxes, fill=0.0)
    assert out[0].eq(0).sum() == 3 * 2 * 3 and out[0, :, 1:3, 2:5].eq(0).all()
    assert out[1].eq(0).sum() == 3 * 2 * 2 and out[1, :, 4:6, 6:8].eq(0).all()

    sizes = torch.tensor([[0, 0, 3, 4], [0, 0, 6, 2]])
    a = random_boxes(sizes, (6, 8), torch.Generator().manual_seed(3))
    b = random_boxes(sizes, (6, 8), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a[:, 2:], sizes[:, 2:])
    assert (a[:, 0] + a[:, 2] <= 6).all() and (a[:, 1] + a[:, 3] <= 8).all()


def test_identical_images_and_masks_give_zero_delta():
    torch.manual_seed(0)
    model = build("zfnet-small").eval()
    images = torch.randn(1, 3, 64, 64).repeat(4, 1, 1, 1)
    boxes = torch.tensor([[10, 12, 20, 20]]).repeat(4, 1)
    result = correspondence(model, images, boxes, layers=("conv5", "fc7"))
    assert {k: (v.mean, v.std, v.pairs) for k, v in result.items()} == {
        "conv5": (0.0, 0.0, 6),
        "fc7": (0.0, 0.0, 6),
    }


def test_masking_the_object_is_more_consistent_than_random_masks(trained_small):
    """Table 1's direction at layer 5: masking the same part of five images of one class changes
    the features in more consistent directions (lower Delta) than masking random boxes."""
    model = trained_small[0]
    dataset = held_out(400)
    part, rand = [], []
    for label in (0, 3, 4, 8):
        images, _, boxes = stack(of_class(dataset, label, 5))
        part.append(correspondence(model, images, boxes, layers=("conv5",))["conv5"].mean)
        rand.append(random_correspondence(model, images, boxes, draws=4, layers=("conv5",))["conv5"].mean)
    assert sum(part) / len(part) < sum(rand) / len(rand) - 0.02, (part, rand)
    assert all(0 < v < 1 for v in part + rand)
