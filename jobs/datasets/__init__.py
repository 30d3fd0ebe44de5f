"""Image sources for jobs: the procedural set, an ImageFolder tree and Parquet, local or on S3.

Reading decodes, resizes the short side and center-crops to a square RGB uint8 image; an image that
cannot be read is skipped, logged and reported in the batch. :func:`open_dataset` gives the source a
spec's ``dataset`` describes.
"""

from __future__ import annotations

from jobs.datasets.base import Batch, ImageSource, shard_ranges
from jobs.datasets.decode import decode_image
from jobs.datasets.imagefolder import ImageFolderSource
from jobs.datasets.parquet import ParquetSource
from jobs.datasets.procedural import ProceduralSource
from jobs.specs.base import DatasetSpec
from zfcore.network import Preprocess

__all__ = [
    "Batch", "ImageFolderSource", "ImageSource", "ParquetSource", "ProceduralSource", "decode_image",
    "open_dataset", "shard_ranges",
]


def open_dataset(
    spec: DatasetSpec, image_size: int | Preprocess, endpoint_url: str | None = None
) -> ImageSource:
    """The image source a dataset spec describes, producing square images of ``image_size``, or
    of a preprocessing's size with the short side resized to its ``resize`` first."""
    if isinstance(image_size, int):
        size, resize = image_size, None
    else:
        size, resize = image_size.image_size, image_size.resize
    if spec.format == "procedural":
        n = min(spec.num_images, spec.limit) if spec.limit else spec.num_images
        return ProceduralSource(n, size, spec.seed)  # drawn at the size: nothing to resize
    if spec.uri is None:
        raise ValueError(f"format {spec.format!r} needs a uri")
    resize = resize if resize and resize != size else None
    if spec.format == "imagefolder":
        return ImageFolderSource(spec.uri, size, endpoint_url, spec.limit, resize=resize)
    return ParquetSource(
        spec.uri,
        size,
        image_column=spec.image_column,
        label_column=spec.label_column,
        id_column=spec.id_column,
        endpoint_url=endpoint_url,
        limit=spec.limit,
        resize=resize,
    )
