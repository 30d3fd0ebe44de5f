"""Dataset readers: procedural, ImageFolder and Parquet (also as Hugging Face writes it), local and
through the moto S3 server; decoding (16-bit and float images); shards of work."""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.datasets import (
    ImageFolderSource,
    ParquetSource,
    decode_image,
    open_dataset,
    pack_units,
    shard_ranges,
)
from jobs.datasets.decode import decode_or_reason
from jobs.specs.base import DatasetSpec
from zfcore.data import ProceduralDataset


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png_grey(size: tuple[int, int] = (20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


FOLDER = {
    "cat/a.jpg": _jpeg((200, 0, 0)),
    "cat/b.jpg": _jpeg((190, 10, 0), (30, 60)),
    "cat/broken.jpg": _jpeg((0, 0, 0))[:200],  # truncated: header fine, data cut off
    "dog/x/deep.png": _png_grey(),
    "dog/c.jpeg": _jpeg((0, 0, 200)),
    "dog/notes.txt": b"not an image",
    "README.md": b"ignored: not in a class folder",
}


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_decode_resizes_short_side_and_center_crops() -> None:
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # white middle third: all that is left after the center crop
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 2:-2].min() > 200


def test_procedural_matches_zfcore() -> None:
    source = open_dataset(DatasetSpec(num_images=50, seed=3, limit=20), image_size=32)
    assert len(source) == 20 and source.ids()[:2] == ["proc-00000000", "proc-00000001"]
    batch = source.read([4, 2])
    ref = ProceduralDataset(50, 32, 3)
    assert np.array_equal(batch.images[0], ref[4].image) and batch.labels.tolist() == [
        ref.label(4),
        ref.label(2),
    ]
    assert batch.indices.tolist() == [4, 2] and batch.skipped == []
    assert source.object_box(4) == ref[4].box
    assert source.class_names[0] == "disk"
    assert (
        source.fingerprint() == open_dataset(DatasetSpec(num_images=50, seed=3, limit=20), 32).fingerprint()
    )
    assert (
        source.fingerprint() != open_dataset(DatasetSpec(num_images=50, seed=4, limit=20), 32).fingerprint()
    )
    with pytest.raises(IndexError):
        source.read([20])


def test_imagefolder_skips_corrupt_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_tree(tmp_path, FOLDER)
    source = open_dataset(DatasetSpec(format="imagefolder", uri=str(tmp_path)), image_size=24)
    assert source.class_names == ["cat", "dog"]
    assert source.ids() == ["cat/a.jpg", "cat/b.jpg", "cat/broken.jpg", "dog/c.jpeg", "dog/x/deep.png"]
    batch = source.read(range(len(source)))
    assert batch.images.shape == (4, 24, 24, 3)
    assert batch.indices.tolist() == [0, 1, 3, 4] and batch.labels.tolist() == [0, 0, 1, 1]
    assert len(batch.skipped) == 1 and batch.skipped[0][0] == "cat/broken.jpg"
    assert "broken.jpg" in caplog.text
    assert batch.images[0, 12, 12, 0] > 150 and batch.images[2, 12, 12, 2] > 150  # red cat, blue dog
    assert np.all(batch.images[3] == 128)  # greyscale converted to RGB
    # Only the bad image is lost, whatever batch it lands in; an all-bad batch is empty, not an error.
    only_bad = source.read([2])
    assert only_bad.images.shape == (0, 24, 24, 3) and len(only_bad.skipped) == 1

    clone = pickle.loads(pickle.dumps(source))
    assert np.array_equal(clone.read([0]).images, batch.images[:1])
    assert clone.fingerprint() == source.fingerprint()
    assert open_dataset(DatasetSpec(format="imagefolder", uri=f"file://{tmp_path}", limit=2), 24).ids() == [
        "cat/a.jpg",
        "cat/b.jpg",
    ]
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSource(str(tmp_path / "cat"), 24)


def _parquet_table(n: int, string_labels: bool = False) -> pa.Table:
    images = [_jpeg((10 * i, 0, 0)) for i in range(n)]
    images[3] = b"garbage"
    labels: list = [i % 3 for i in range(n)]
    labels[5] = None
    if string_labels:
        labels = [None if v is None else ["zebra", "ant", "moth"][v] for v in labels]
    return pa.table({"img": pa.array(images, pa.binary()), "y": labels, "key": [f"k{i}" for i in range(n)]})


def test_parquet_reader(tmp_path: Path) -> None:
    pq.write_table(_parquet_table(10), tmp_path / "part-0.parquet", row_group_size=4)
    pq.write_table(_parquet_table(6), tmp_path / "part-1.parquet", row_group_size=2)
    spec = DatasetSpec(format="parquet", uri=str(tmp_path), image_column="img", label_column="y")
    source = open_dataset(spec, image_size=16)
    assert len(source) == 16 and source.ids()[:2] == ["part-0.parquet:0", "part-0.parquet:1"]
    assert source.image_id(10) == "part-1.parquet:0"
    assert source.class_names == ["0", "1", "2"]
    batch = source.read([0, 3, 5, 11, 14])
    assert batch.indices.tolist() == [0, 11, 14]
    assert batch.labels.tolist() == [0, 1, 1]
    assert [r.split(":")[0] for _, r in batch.skipped] == [
        "UnidentifiedImageError",
        "missing label in column 'y'",
    ]
    assert batch.images.shape == (3, 16, 16, 3)
    # Row groups are read on demand, not the whole file: only the groups touched are cached.
    assert len(source.__dict__["_cache"]["groups"]) <= ParquetSource._CACHE_GROUPS

    single = open_dataset(
        DatasetSpec(
            format="parquet",
            uri=str(tmp_path / "part-1.parquet"),
            image_column="img",
            label_column="y",
            id_column="key",
        ),
        16,
    )
    assert single.ids() == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert pickle.loads(pickle.dumps(single)).read([4]).labels.tolist() == [1]
    with pytest.raises(ValueError, match="no column 'image'"):
        open_dataset(DatasetSpec(format="parquet", uri=str(tmp_path)), 16)


def test_parquet_string_labels_and_hf_struct_images(tmp_path: Path) -> None:
    table = _parquet_table(6, string_labels=True)
    structs = pa.array([{"bytes": b, "path": None} for b in table.column("img").to_pylist()])
    pq.write_table(table.set_column(0, "image", structs), tmp_path / "d.parquet")
    source = open_dataset(
        DatasetSpec(format="parquet", uri=str(tmp_path / "d.parquet"), label_column="y"), 16
    )
    assert source.class_names == ["ant", "moth", "zebra"]
    batch = source.read(range(6))
    assert batch.indices.tolist() == [0, 1, 2, 4]
    assert batch.labels.tolist() == [2, 0, 1, 0]


def test_shard_ranges_are_deterministic_and_cover_everything() -> None:
    shards = shard_ranges(1030, 512)
    assert shards == [range(0, 512), range(512, 1024), range(1024, 1030)]
    assert shard_ranges(1030, 512) == shards and shard_ranges(0, 8) == []
    assert [i for s in shard_ranges(97, 10) for i in s] == list(range(97))
    assert list(shards) == [shards[0], shards[1], shards[-1]] and shards[1:] == [shards[1], shards[2]]
    with pytest.raises(ValueError):
        shard_ranges(10, 0)
    with pytest.raises(IndexError):
        shards[3]


def test_shard_ranges_of_a_huge_dataset_are_never_materialized() -> None:
    # 10^12 images in shards of 100: 10^10 ranges, which as a list would need hundreds of GB.
    shards = shard_ranges(10**12, 100)
    assert len(shards) == 10**10
    assert shards[0] == range(0, 100) and shards[-1] == range(10**12 - 100, 10**12)
    assert next(iter(shards)) == range(0, 100)
    assert min(4, len(shards)) == 4  # what the atlas driver asks of it
    assert sys.getsizeof(shards) < 1000


def test_pack_units_follow_file_boundaries() -> None:
    files = [range(0, 300), range(300, 350), range(350, 400), range(400, 1450), range(1450, 1460)]
    shards = pack_units(files, 500)
    assert shards == [range(0, 400), range(400, 750), range(750, 1100), range(1100, 1450), range(1450, 1460)]
    # Every image once, in order; no shard holds part of two files, small files are joined whole.
    assert [i for s in shards for i in s] == list(range(1460))
    assert pack_units(files, 10_000) == [range(0, 1460)]
    assert pack_units([range(0, 7)], 3) == [range(0, 2), range(2, 4), range(4, 7)]
    assert pack_units([], 5) == []


def _grey16(values: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_by_its_bit_depth(fmt: str) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1))  # 16-bit full range, left to right
    assert Image.open(io.BytesIO(_grey16(ramp, fmt))).mode.startswith("I;16")
    out = decode_image(_grey16(ramp, fmt), 64)
    assert out[:, 0].max() <= 2 and out[:, -1].min() >= 253  # black to white, not all white
    assert 120 <= out[:, 31:33].mean() <= 135 and np.all(out[..., 0] == out[..., 2])
    # 12 bits stored in 16 (a scanner's): its own full scale is 4095, so the ramp still spans it.
    twelve = decode_image(_grey16(ramp / 16, fmt), 64)
    assert twelve[:, -1].min() >= 253 and 120 <= twelve[:, 31:33].mean() <= 135
    # Dark 16-bit content keeps its bit depth's scale: 0..1000 fits in 10 bits, so it maps to 0..249.
    assert decode_image(_grey16(np.full((8, 8), 1000), fmt), 8).max() == round(1000 * 255 / 1023)


def test_float_tiff_is_decoded_by_value_range_and_nan_is_skipped() -> None:
    def tiff(values: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(values.astype(np.float32)).save(buf, format="TIFF")
        return buf.getvalue()

    unit = np.tile(np.linspace(0, 1, 32), (32, 1))
    assert Image.open(io.BytesIO(tiff(unit))).mode == "F"
    out = decode_image(tiff(unit), 32)
    assert out[:, 0].max() == 0 and out[:, -1].min() == 255
    wide = decode_image(tiff(unit * 5000 - 1000), 32)  # [-1000, 4000] -> [0, 255]
    assert wide[:, 0].max() == 0 and wide[:, -1].min() == 255
    bad = unit.copy()
    bad[3, 3] = np.nan
    image, reason = decode_or_reason(tiff(bad), 32)
    assert image is None and reason == "ValueError: float image with NaN or infinite values"


def test_hugging_face_parquet_as_datasets_writes_it(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    (tmp_path / "f.png").write_bytes(_png_grey())
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    rows = {
        "image": [{"bytes": _jpeg((200, 0, 0)), "path": "a.jpg"}, {"bytes": b"garbage", "path": "b.jpg"},
                  str(tmp_path / "f.png"), {"bytes": _jpeg((0, 0, 200)), "path": None}],
        "label": [0, 1, 1, -1],
    }
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    schema = pq.read_schema(tmp_path / "train.parquet")
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    assert b"huggingface" in schema.metadata
    source = open_dataset(DatasetSpec(format="parquet", uri=str(tmp_path / "train.parquet")), 16)
    assert source.class_names == ["cat", "dog"]  # the ClassLabel's names, from the metadata
    assert source.ids() == [f"train.parquet:{i}" for i in range(4)]
    batch = source.read(range(4))
    assert batch.indices.tolist() == [0] and batch.labels.tolist() == [0]
    reasons = dict(batch.skipped)
    assert reasons["train.parquet:1"].startswith("UnidentifiedImageError")
    assert reasons["train.parquet:2"].startswith("image not embedded in column 'image' (only its path")
    assert reasons["train.parquet:3"] == "missing label in column 'label'"
    assert batch.images[0, 8, 8, 0] > 150


def test_parquet_natural_shards_follow_row_groups(tmp_path: Path) -> None:
    pq.write_table(_parquet_table(10), tmp_path / "part-0.parquet", row_group_size=4)
    pq.write_table(_parquet_table(6), tmp_path / "part-1.parquet", row_group_size=3)
    spec = DatasetSpec(format="parquet", uri=str(tmp_path), image_column="img", label_column="y")
    source = open_dataset(spec, 16)
    # Row groups: 0-4, 4-8, 8-10 | 10-13, 13-16; whole groups are joined, even across files.
    assert source.natural_shards(8) == [range(0, 8), range(8, 16)]
    assert source.natural_shards(3) == [
        range(0, 2), range(2, 4), range(4, 6), range(6, 8), range(8, 10), range(10, 13), range(13, 16)
    ]
    limited = open_dataset(spec.model_copy(update={"limit": 5}), 16)
    assert limited.natural_shards(100) == [range(0, 5)]
    assert open_dataset(DatasetSpec(num_images=10), 16).natural_shards(4) == shard_ranges(10, 4)


@pytest.mark.s3
def test_s3_imagefolder_and_parquet(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for rel, data in FOLDER.items():
        client.put_object(Bucket=s3_bucket, Key=f"folder/{rel}", Body=data)
    spec = DatasetSpec(format="imagefolder", uri=f"s3://{s3_bucket}/folder")
    source = open_dataset(spec, 24, endpoint_url=s3_endpoint)
    local_dir = tmp_path / "local"
    _write_tree(local_dir, FOLDER)
    local = open_dataset(DatasetSpec(format="imagefolder", uri=str(local_dir)), 24)
    assert source.ids() == local.ids() and source.fingerprint() == local.fingerprint()
    remote_batch, local_batch = source.read(range(5)), local.read(range(5))
    assert np.array_equal(remote_batch.images, local_batch.images)
    assert remote_batch.skipped == local_batch.skipped
    assert pickle.loads(pickle.dumps(source)).read([0]).indices.tolist() == [0]

    buf = io.BytesIO()
    pq.write_table(_parquet_table(8), buf, row_group_size=3)
    client.put_object(Bucket=s3_bucket, Key="tables/a.parquet", Body=buf.getvalue())
    spec = DatasetSpec(format="parquet", uri=f"s3://{s3_bucket}/tables", image_column="img", label_column="y")
    remote = open_dataset(spec, 16, endpoint_url=s3_endpoint)
    batch = remote.read(range(8))
    assert len(remote) == 8 and batch.indices.tolist() == [0, 1, 2, 4, 6, 7]
    assert pickle.loads(pickle.dumps(remote)).read([7]).labels.tolist() == [1]
