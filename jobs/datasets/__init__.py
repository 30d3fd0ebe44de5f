"""Image sources for jobs: the procedural set, an ImageFolder tree, Parquet (also Hugging Face's
layout) and WebDataset tar shards, local or on S3.

Reading decodes, resizes the short side and center-crops to a square RGB uint8 image; an image that
cannot be read is skipped, logged and reported in the batch. :func:`open_dataset` gives the source a
spec's ``dataset`` describes; :class:`Prefetcher` reads a scan's batches ahead and decodes them in
a pool of threads; :func:`jobs.datasets.pack.pack` rewrites any source as WebDataset or Parquet.
"""

from __future__ import annotations

from jobs.datasets.base import Batch, Encoded, ImageSource, pack_units, shard_ranges
from jobs.datasets.decode import decode_image
from jobs.datasets.imagefolder import ImageFolderSource
from jobs.datasets.parquet import ParquetSource
from jobs.datasets.prefetch import Prefetcher, prefetch
from jobs.datasets.procedural import ProceduralSource
from jobs.datasets.webdataset import WebDatasetSource
from jobs.specs.base import DatasetSpec
from zfcore.network import Preprocess

__all__ = [
    "Batch", "Encoded", "ImageFolderSource", "ImageSource", "ParquetSource", "Prefetcher", "ProceduralSource",
    "WebDatasetSource", "decode_image", "open_dataset", "pack_units", "prefetch", "shard_ranges",
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
    if spec.format == "webdataset":
        return WebDatasetSource(
            spec.uri,
            size,
            label_field=spec.label_column,
            id_field=spec.id_column,
            endpoint_url=endpoint_url,
            limit=spec.limit,
            resize=resize,
        )
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
