"""The decoded images that can still be in the top-k, kept from the scan for the projection phase.

Projecting the winners needs their images again. Reading them again costs a second decode of
every winning image (on the procedural set or JPEGs, about as much as the projections' compute), so
a worker keeps the decoded pixels of the images its trackers still hold while it scans: after
each batch the images that entered a top-k are kept and the ones that left every top-k are
dropped. At most ``k × channels`` distinct images can be held (3,168 for zfnet-small's conv1-5,
12,384 for ZFNet's), and a byte budget caps it below that on large inputs. A group whose images
another worker scanned, or that did not fit, reads its missing images as before; decoding is
deterministic, so a kept image is the same bytes as one read again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from jobs.datasets.base import Batch
from zfcore.topk import TopKTracker

#: Kept pixels per worker, at most (1 GiB: ZFNet's 12,384 winners at 224 px would be 1.9 GB).
MAX_BYTES = 1 << 30


def tracked_images(tracker: TopKTracker) -> set[int]:
    """Every image index in any of the tracker's top-k lists."""
    state = tracker.state_dict()["state"]
    held = torch.cat([index.flatten() for _, index, _ in state.values()])
    return {int(i) for i in held.unique().tolist() if i >= 0}


class WinnerImages:
    """Decoded images (H, W, 3) uint8 and labels by dataset index, for the indices still held."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.images: dict[int, np.ndarray] = {}
        self.labels: dict[int, int] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def offer(self, batch: Batch, held: set[int]) -> None:
        """Keep the images of ``batch`` whose index is in ``held`` (while the budget allows)."""
        for n, index in enumerate(batch.indices.tolist()):
            if index in held and index not in self.images:
                image = np.array(batch.images[n])  # a copy: the batch's array is not kept alive
                if self.bytes + image.nbytes > self.max_bytes:
                    continue
                self.images[index], self.labels[index] = image, int(batch.labels[n])
                self.bytes += image.nbytes

    def keep_only(self, held: set[int]) -> None:
        for index in [i for i in self.images if i not in held]:
            self.bytes -= self.images.pop(index).nbytes
            del self.labels[index]

    def read(self, indices: Sequence[int], read: Callable[[list[int]], Batch]) -> Batch:
        """The batch ``read(indices)`` would give (``indices`` sorted): kept images from memory,
        the others through ``read``."""
        missing = [i for i in indices if i not in self.images]
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        if not missing:
            fresh = Batch(np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
        else:
            fresh = read(missing)
        if len(missing) == len(indices):
            return fresh
        at = {int(i): n for n, i in enumerate(fresh.indices.tolist())}
        order = [i for i in indices if i in self.images or i in at]
        images = np.stack([self.images[i] if i in self.images else fresh.images[at[i]] for i in order])
        labels = [self.labels[i] if i in self.images else fresh.labels[at[i]] for i in order]
        return Batch(images, np.array(labels, np.int64), np.array(order, np.int64), list(fresh.skipped))
