"""Packing a dataset into WebDataset shards or Hugging Face-style Parquet, locally and to moto S3:
read back in the same order, with the same ids and pixels, the corrupt image skipped the same way;
deterministic bytes; the CLI's exit codes."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.datasets import ImageSource, open_dataset
from jobs.datasets.pack import extension, pack
from jobs.specs.base import DatasetSpec
from zfatlas_cli.main import main


def _image(colour: tuple[int, int, int], fmt: str, size: tuple[int, int] = (48, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


FOLDER = {
    "bird/z.jpg": _image((0, 200, 0), "JPEG"),
    "cat/a.jpg": _image((200, 0, 0), "JPEG"),
    "cat/a.png": _image((0, 0, 200), "PNG"),  # same stem as a.jpg: ids must stay apart
    "cat/b.v2.jpeg": _image((90, 90, 0), "JPEG", (30, 60)),  # a dot in the stem
    "cat/broken.jpg": _image((1, 2, 3), "JPEG")[:150],
    "dog/deep/x.webp": _image((10, 20, 200), "WEBP"),
}


@pytest.fixture
def folder(tmp_path: Path) -> ImageSource:
    for rel, data in FOLDER.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)
    return open_dataset(DatasetSpec(format="imagefolder", uri=str(tmp_path / "src")), 24)


def _same_dataset(packed: ImageSource, original: ImageSource) -> None:
    assert packed.ids() == original.ids() == sorted(FOLDER)
    assert packed.class_names == original.class_names == ["bird", "cat", "dog"]
    a, b = packed.read(range(len(packed))), original.read(range(len(original)))
    assert np.array_equal(a.images, b.images)
    assert a.labels.tolist() == b.labels.tolist() and a.indices.tolist() == b.indices.tolist()
    assert a.skipped == b.skipped and [i for i, _ in a.skipped] == ["cat/broken.jpg"]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_pack_local_reads_back_the_same(folder: ImageSource, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"out-{fmt}"
    result = pack(folder, str(out), fmt, shard_size=4, row_group_size=2)
    assert result.images == len(FOLDER) and result.missing == []
    assert result.bytes == sum(len(v) for v in FOLDER.values())
    packed = open_dataset(DatasetSpec(format=fmt, uri=str(out)), 24)
    _same_dataset(packed, folder)
    if fmt == "webdataset":
        assert sorted(p.name for p in out.iterdir()) == [
            "shard-000000.tar", "shard-000000.tar.zfatlas-index", "shard-000001.tar",
            "shard-000001.tar.zfatlas-index",
        ]
        assert packed.natural_shards(10) == [range(0, 6)] and packed.natural_shards(4) == [
            range(0, 4), range(4, 6)
        ]
    else:
        assert sorted(p.name for p in out.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
        assert packed.natural_shards(3) == [range(0, 2), range(2, 4), range(4, 6)]
        # Hugging Face's own reader sees its layout: an Image feature and the class names.
        datasets = pytest.importorskip("datasets")
        features = datasets.Features.from_arrow_schema(pq.read_schema(out / "part-000000.parquet"))
        assert isinstance(features["image"], datasets.Image)
        assert features["label"].names == ["bird", "cat", "dog"]
    # The same input packs to the same bytes; a non-empty output is refused unless overwritten.
    again = tmp_path / f"again-{fmt}"
    pack(folder, str(again), fmt, shard_size=4, row_group_size=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in again.iterdir()
    }
    with pytest.raises(ValueError, match="already holds"):
        pack(folder, str(out), fmt)
    pack(folder, str(out), fmt, shard_size=100, overwrite=True)
    assert len(open_dataset(DatasetSpec(format=fmt, uri=str(out)), 24).natural_shards(100)) == 1


def test_pack_between_packed_formats_keeps_ids(folder: ImageSource, tmp_path: Path) -> None:
    pack(folder, str(tmp_path / "wds"), "webdataset", shard_size=3)
    wds = open_dataset(DatasetSpec(format="webdataset", uri=str(tmp_path / "wds")), 24)
    pack(wds, str(tmp_path / "pq"), "parquet")
    _same_dataset(open_dataset(DatasetSpec(format="parquet", uri=str(tmp_path / "pq")), 24), folder)
    with pytest.raises(ValueError, match="no encoded images"):
        pack(open_dataset(DatasetSpec(num_images=4), 16), str(tmp_path / "p"), "parquet")


def test_extension_is_the_original_or_sniffed() -> None:
    assert extension("cat/a.JPG", b"") == "jpg" and extension("part.parquet:3", FOLDER["cat/a.png"]) == "png"
    assert extension("x", FOLDER["dog/deep/x.webp"]) == "webp" and extension("x", b"????") == "jpg"


@pytest.mark.s3
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_pack_s3_to_s3(
    s3_endpoint: str, s3_bucket: str, folder: ImageSource, fmt: str, tmp_path: Path
) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for rel, data in FOLDER.items():
        client.put_object(Bucket=s3_bucket, Key=f"src/{rel}", Body=data)
    remote_src = open_dataset(DatasetSpec(format="imagefolder", uri=f"s3://{s3_bucket}/src"), 24, s3_endpoint)
    pack(remote_src, f"s3://{s3_bucket}/packed", fmt, shard_size=4, endpoint_url=s3_endpoint)
    packed = open_dataset(DatasetSpec(format=fmt, uri=f"s3://{s3_bucket}/packed"), 24, s3_endpoint)
    _same_dataset(packed, folder)
    # Byte for byte what a local pack of the same images writes.
    pack(folder, str(tmp_path / "local"), fmt, shard_size=4)
    for path in (tmp_path / "local").iterdir():
        body = client.get_object(Bucket=s3_bucket, Key=f"packed/{path.name}")["Body"].read()
        assert body == path.read_bytes(), path.name


def test_cli_pack_and_index(folder: ImageSource, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = str(tmp_path / "src"), str(tmp_path / "cli")
    assert main(["dataset", "pack", src, out, "--format", "webdataset", "--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "packed 6 images" in printed and "format: webdataset" in printed
    assert main(["dataset", "pack", src, out, "--format", "webdataset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zfatlas: ") and "already holds" in err and "--overwrite" in err
    for p in Path(out).glob("*.zfatlas-index"):
        p.unlink()
    assert main(["dataset", "index", out]) == 0
    assert "wrote 2 index sidecars" in capsys.readouterr().out
    _same_dataset(open_dataset(DatasetSpec(format="webdataset", uri=out), 24), folder)
    for argv in (["dataset", "pack", str(tmp_path / "nope"), out + "2", "--format", "parquet"],
                 ["dataset", "pack", src, "s3://Bad_Bucket/x", "--format", "parquet"],
                 ["dataset", "pack", src, out + "3", "--format", "parquet", "--shard-size", "0"],
                 ["dataset", "index", str(tmp_path / "src")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("zfatlas: "), err
