import random

import pytest
import torch

from zfcore.topk import TopKTracker

SHAPES = {"conv1": (6, 5, 5), "conv2": (4, 3, 3), "fc6": (8, 1, 1)}


def batches(n_images: int, seed: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_images, 7):
        b = min(7, n_images - start)
        acts = {
            # Quantized values so ties (incl. all-zero dead channels) are common.
            "conv1": torch.randint(0, 4, (b, 6, 5, 5), generator=g).float(),
            "conv2": torch.rand(b, 4, 3, 3, generator=g).relu(),
            "fc6": torch.randint(0, 3, (b, 8), generator=g).float(),
        }
        acts["conv1"][:, 0] = 0.0  # a dead channel: every image ties at 0
        out.append((acts, torch.arange(start, start + b)))
    return out


def brute_force(data, k: int) -> dict[str, list[list[tuple]]]:
    """Sort every (value, image, position) candidate per channel by the documented order."""
    result = {}
    for name, (c, _h, _w) in SHAPES.items():
        per_channel = []
        for ch in range(c):
            cands = []
            for acts, idx in data:
                flat = acts[name].reshape(acts[name].shape[0], c, -1)[:, ch]
                for row, image in enumerate(idx.tolist()):
                    v = float(flat[row].max())
                    p = int((flat[row] == flat[row].max()).nonzero()[0])
                    cands.append((-v, image, p))
            per_channel.append([(-v, i, p) for v, i, p in sorted(cands)[:k]])
        result[name] = per_channel
    return result


def as_lists(tracker: TopKTracker) -> dict[str, list[list[tuple]]]:
    out = {}
    for name, r in tracker.results().items():
        out[name] = [
            list(zip(r.values[c].tolist(), r.image_index[c].tolist(), r.position[c].tolist(), strict=True))
            for c in range(r.values.shape[0])
        ]
    return out


@pytest.mark.parametrize("k", [1, 9])
def test_single_pass_equals_brute_force_with_ties(k):
    data = batches(60, seed=0)
    tracker = TopKTracker(SHAPES, k)
    for acts, idx in data:
        tracker.update(acts, idx)
    assert as_lists(tracker) == brute_force(data, k)
    # The dead channel ranks by image index: images 0..k-1, all at position 0.
    assert as_lists(tracker)["conv1"][0] == [(0.0, i, 0) for i in range(k)]


@pytest.mark.parametrize("seed", range(5))
def test_merge_of_random_shards_equals_single_pass(seed):
    data = batches(80, seed=seed)
    single = TopKTracker(SHAPES, 9)
    for acts, idx in data:
        single.update(acts, idx)
    rng = random.Random(seed)
    shuffled = data[:]
    rng.shuffle(shuffled)
    cuts = sorted(rng.sample(range(1, len(shuffled)), 3))
    shards = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]
    trackers = []
    for shard in shards:
        t = TopKTracker(SHAPES, 9)
        for acts, idx in shard:
            t.update(acts, idx)
        trackers.append(TopKTracker.from_state_dict(t.state_dict()))  # as if sent between actors
    rng.shuffle(trackers)
    merged = trackers[0]
    for t in trackers[1:]:
        merged.merge(t)
    assert as_lists(merged) == as_lists(single)


def test_fewer_images_than_k_leaves_empty_slots_last():
    tracker = TopKTracker({"fc6": (2, 1, 1)}, 9)
    tracker.update({"fc6": torch.tensor([[1.0, 2.0], [3.0, 0.5]])}, torch.tensor([10, 11]))
    r = tracker.results()["fc6"]
    assert r.image_index[0, :3].tolist() == [11, 10, -1]
    assert r.values[0, 2] == float("-inf")


def test_memory_does_not_grow_with_images():
    tracker = TopKTracker(SHAPES, 9)
    sizes = []
    for i, (acts, idx) in enumerate(batches(200, seed=1)):
        tracker.update(acts, idx)
        if i in (1, 25):
            sizes.append(sum(t.numel() for s in tracker._state.values() for t in s))
    assert sizes[0] == sizes[1] == 9 * (6 + 4 + 8) * 3


def test_bad_inputs():
    with pytest.raises(ValueError, match="k must be"):
        TopKTracker(SHAPES, 0)
    tracker = TopKTracker(SHAPES, 3)
    with pytest.raises(ValueError, match="5x5"):
        tracker.update({"conv1": torch.zeros(2, 6, 4, 4)}, torch.arange(2))
    with pytest.raises(ValueError, match="same layers"):
        tracker.merge(TopKTracker({"conv1": (6, 5, 5)}, 3))
