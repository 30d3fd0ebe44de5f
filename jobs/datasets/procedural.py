"""zfcore's procedural dataset as an image source (drawn from the seed, no files)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

from jobs.datasets.base import Batch, ImageSource, content_hash
from zfcore.data import CLASS_NAMES, ProceduralDataset


class ProceduralSource(ImageSource):
    """zfcore's procedural dataset; images are drawn at ``image_size`` (no resize)."""

    def __init__(self, num_images: int, image_size: int, seed: int = 0) -> None:
        self.data = ProceduralDataset(num_images, image_size, seed)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.data)

    def image_id(self, index: int) -> str:
        return self.data.image_id(index)

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    def object_box(self, index: int) -> tuple[int, int, int, int]:
        """The object's (top, left, height, width) in image ``index``."""
        return self.data[index].box

    def read(self, indices: Sequence[int], pool: Executor | None = None) -> Batch:
        # Each image depends only on (seed, index): drawing them in threads changes nothing.
        wanted = self._check(indices)
        samples = list(pool.map(self.data.__getitem__, wanted)) if pool else [self.data[i] for i in wanted]
        return self._batch([(i, s.image, s.label) for i, s in zip(wanted, samples, strict=True)], [])

    def fingerprint(self) -> str:
        d = self.data
        # The first image's pixels too: a change to the generator changes the dataset.
        return content_hash(
            ["procedural", str(d.num_images), str(d.image_size), str(d.seed), d[0].image.tobytes().hex()]
        )
