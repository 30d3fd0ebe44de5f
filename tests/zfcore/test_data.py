import numpy as np

from zfcore.data import CLASS_NAMES, ProceduralDataset, to_tensor, to_uint8


def test_procedural_images_are_deterministic_and_balanced():
    a, b = ProceduralDataset(500, 64, seed=3), ProceduralDataset(500, 64, seed=3)
    assert np.array_equal(a[17].image, b[17].image) and a[17].label == b[17].label
    assert not np.array_equal(a[17].image, ProceduralDataset(500, 64, seed=4)[17].image)
    _, labels = a.batch(range(500))
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    assert counts.min() > 25  # every class present in reasonable numbers
    s = a[5]
    top, left, h, w = s.box
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert top >= 0 and top + h <= 64 and left >= 0 and left + w <= 64


def test_tensor_round_trip():
    images, _ = ProceduralDataset(4, 32).batch(range(4))
    t = to_tensor(images)
    assert t.shape == (4, 3, 32, 32)
    assert np.array_equal(to_uint8(t), images)
