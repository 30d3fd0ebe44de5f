"""The winners' images kept from the scan: what a projection reads from them is exactly what reading
the dataset again gives, partial hits included; the budget holds; only images still in a top-k
are kept."""

from __future__ import annotations

import numpy as np
import torch

from jobs.atlas.winners import WinnerImages, tracked_images
from jobs.datasets import open_dataset
from jobs.specs.base import DatasetSpec
from zfcore.topk import TopKTracker

SIZE = 32


def _source():
    return open_dataset(DatasetSpec(format="procedural", num_images=40, seed=7), SIZE)


def test_kept_images_read_exactly_as_the_dataset_gives_them():
    source = _source()
    kept = WinnerImages()
    kept.offer(source.read(list(range(0, 20))), held={1, 3, 5, 18})
    wanted = [1, 2, 3, 18, 30]
    calls = []

    def read(indices):
        calls.append(list(indices))
        return source.read(indices)

    got, plain = kept.read(wanted, read), source.read(wanted)
    assert calls == [[2, 30]]  # only the images not kept are read again
    assert got.indices.tolist() == plain.indices.tolist() == wanted
    assert np.array_equal(got.images, plain.images) and np.array_equal(got.labels, plain.labels)
    assert (kept.hits, kept.misses) == (3, 2)
    assert kept.read([1, 3], read).images.tobytes() == source.read([1, 3]).images.tobytes()
    assert calls == [[2, 30]]  # all kept: nothing read


def test_the_budget_and_the_held_set_bound_what_is_kept():
    source = _source()
    one = source.read([0]).images[0].nbytes
    kept = WinnerImages(max_bytes=2 * one)
    kept.offer(source.read(list(range(10))), held={0, 1, 2, 3})
    assert sorted(kept.images) == [0, 1] and kept.bytes == 2 * one  # the budget: two images
    kept.keep_only({1, 7})
    assert sorted(kept.images) == [1] and kept.bytes == one


def test_tracked_images_are_those_in_any_top_k():
    tracker = TopKTracker({"a": (2, 1, 1), "b": (1, 2, 2)}, k=2)
    tracker.update({"a": torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]]),
                    "b": torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]], [[[5.0, 0.0], [0.0, 0.0]]],
                                       [[[0.0, 0.0], [0.0, 0.5]]]])},
                   torch.tensor([10, 11, 12]))
    # a: channel 0 keeps 12, 10; channel 1 keeps 11, 10; b keeps 11, 10.
    assert tracked_images(tracker) == {10, 11, 12}
    assert tracked_images(TopKTracker({"a": (2, 1, 1)}, k=3)) == set()  # empty slots are no image
