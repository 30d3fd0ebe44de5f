"""WebDataset tar shards: samples grouped by key, labels from .cls or .json, ids, truncated and
stale shards, index sidecars, natural shards, and S3 reads that never GET per image."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from jobs.datasets import WebDatasetSource, open_dataset
from jobs.datasets.webdataset import SIDECAR_SUFFIX, split_key, write_sidecars
from jobs.specs.base import DatasetSpec
from tests.fixtures.counting_s3 import CountingS3, counting_s3  # noqa: F401


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def samples(start: int, count: int, ext: str = "jpg") -> list[tuple[str, bytes]]:
    out = []
    for i in range(start, start + count):
        out += [(f"s{i:04d}.{ext}", jpeg((20 * i % 256, 0, 100))), (f"s{i:04d}.cls", str(i % 3).encode())]
    return out


def spec(uri: str, **fields) -> DatasetSpec:
    return DatasetSpec(format="webdataset", uri=uri, **fields)


def test_split_key_as_the_webdataset_library() -> None:
    assert split_key("n01/n01_10026.JPEG") == ("n01/n01_10026", "jpeg")
    assert split_key("a/b.c.d/x.seg.png") == ("a/b.c.d/x", "seg.png")
    assert split_key("noext") is None and split_key("dir/.hidden.jpg") is None


def test_samples_labels_and_ids(tmp_path: Path) -> None:
    long_dir = "d" * 120  # longer than a plain tar header holds: GNU long names / pax paths
    first = [
        *samples(0, 3),
        ("meta-only.json", b'{"label": 1}'),  # no image: not a sample
        ("up.JPEG", jpeg((0, 200, 0))), ("up.json", json.dumps({"label": 2, "id": "custom/up"}).encode()),
        ("broken.jpg", jpeg((1, 1, 1))[:150]), ("broken.cls", b"1"),
        ("nolabel.png", b"\x89PNG not really"),
    ]
    second = [
        (f"{long_dir}/x.jpg", jpeg((0, 0, 250))), (f"{long_dir}/x.cls", b"0"),
        ("y.webp.jpg", jpeg((9, 9, 9))), ("y.webp.cls", b"2"),
    ]
    (tmp_path / "a-000.tar").write_bytes(tar_bytes(first))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a-001.tar").write_bytes(tar_bytes(second, tarfile.PAX_FORMAT))
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_dataset(spec(str(tmp_path)), 16)
    assert isinstance(source, WebDatasetSource)
    assert source.ids() == ["s0000", "s0001", "s0002", "custom/up", "broken", "nolabel", f"{long_dir}/x", "y"]
    assert source.labels.tolist() == [0, 1, 2, 2, 1, -1, 0, 2]
    assert source.class_names == ["0", "1", "2"]
    batch = source.read(range(len(source)))
    assert batch.indices.tolist() == [0, 1, 2, 3, 6, 7]
    assert dict(batch.skipped)["broken"].startswith("OSError")
    assert dict(batch.skipped)["nolabel"] == "no label (.cls, or 'label' in .json)"
    assert batch.images[3, 8, 8, 1] > 150 and batch.images[4, 8, 8, 2] > 200  # up.JPEG, the long name
    assert source.natural_shards(100) == [range(0, 8)] and source.natural_shards(4) == [
        range(0, 3), range(3, 6), range(6, 8)
    ]
    clone = pickle.loads(pickle.dumps(source))
    assert np.array_equal(clone.read([6]).images, batch.images[4:5])
    assert clone.fingerprint() == source.fingerprint()
    # The same shards named by a prefix of the folder's files, or one shard alone.
    assert open_dataset(spec(str(tmp_path / "a-")), 16).ids()[:3] == ["s0000", "s0001", "s0002"]
    assert open_dataset(spec(str(tmp_path / "sub" / "a-001.tar")), 16).ids() == [f"{long_dir}/x", "y"]
    assert open_dataset(spec(str(tmp_path), limit=2), 16).ids() == ["s0000", "s0001"]


def test_json_labels_by_field_and_class_names(tmp_path: Path) -> None:
    members = []
    for i, name in enumerate(["moth", "ant", "zebra", "ant"]):
        meta = {"cat": name, "key": f"img-{i}", "label": 7}
        members += [(f"{i:03d}.jpg", jpeg((50 * i, 0, 0))), (f"{i:03d}.json", json.dumps(meta).encode())]
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    source = open_dataset(spec(str(tmp_path), label_column="cat", id_column="key"), 16)
    assert source.class_names == ["ant", "moth", "zebra"] and source.labels.tolist() == [1, 0, 2, 0]
    assert source.ids() == ["img-0", "img-1", "img-2", "img-3"]
    with pytest.raises(ValueError, match="has no 'nope'"):
        open_dataset(spec(str(tmp_path), id_column="nope"), 16)


def test_bad_layouts_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no .tar shards"):
        WebDatasetSource(str(tmp_path), 16)
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match="compressed shards"):
        WebDatasetSource(str(tmp_path), 16)
    (tmp_path / "a.tar").write_bytes(tar_bytes(samples(0, 2)))
    (tmp_path / "b.tar").write_bytes(tar_bytes(samples(1, 2)))
    with pytest.raises(ValueError, match="image id 's0001' occurs twice"):
        WebDatasetSource(str(tmp_path), 16)


def test_truncated_shard_is_reported_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    whole = tar_bytes(samples(0, 6))
    (tmp_path / "a.tar").write_bytes(tar_bytes(samples(10, 2)))
    # Cut inside the data of sample 3's image: samples 0-2 are fine, 3 is skipped, 4-5 are unknown.
    offset = whole.index(jpeg((60, 0, 100)))
    (tmp_path / "b.tar").write_bytes(whole[: offset + 100])
    source = open_dataset(spec(str(tmp_path)), 16)
    assert source.ids() == ["s0010", "s0011", "s0000", "s0001", "s0002", "s0003"]
    assert "truncated" in source.shard_problems["b.tar"] and "b.tar" in caplog.text
    batch = source.read(range(len(source)))
    assert batch.indices.tolist() == [0, 1, 2, 3, 4]
    assert batch.skipped == [("s0003", "shard b.tar is truncated: it ends at byte "
                                        f"{offset + 100}, inside this image")]
    # Cut between samples: one entry stands for the lost rest, skipped with the reason.
    (tmp_path / "b.tar").write_bytes(whole[: whole.index(b"s0004.jpg")])
    source = open_dataset(spec(str(tmp_path)), 16)
    lost = source.ids()[-1]
    assert lost.startswith("b.tar#truncated@") and len(source) == 2 + 4 + 1
    batch = source.read(range(len(source)))
    assert len(batch.indices) == 6 and batch.skipped[0][0] == lost
    assert "the images after this point are lost" in batch.skipped[0][1]


def test_sidecars_index_without_reading_shards_and_report_truncation(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(tar_bytes(samples(0, 5)))
    (tmp_path / "b.tar").write_bytes(tar_bytes(samples(5, 5)))
    streamed = open_dataset(spec(str(tmp_path)), 16)
    assert sorted(write_sidecars(str(tmp_path))) == ["a.tar" + SIDECAR_SUFFIX, "b.tar" + SIDECAR_SUFFIX]
    assert write_sidecars(str(tmp_path)) == []  # already usable: nothing to do
    indexed = open_dataset(spec(str(tmp_path)), 16)
    assert indexed.ids() == streamed.ids() and indexed.fingerprint() == streamed.fingerprint()
    assert np.array_equal(indexed.read(range(10)).images, streamed.read(range(10)).images)
    # Built for other fields: not used (the shards are read instead), same result.
    assert open_dataset(spec(str(tmp_path), label_column="other"), 16).ids() == streamed.ids()
    # The shard lost its tail after it was indexed: the sidecar knows every image that is gone.
    whole = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[: whole.index(b"s0007.jpg") + 600])
    cut = open_dataset(spec(str(tmp_path)), 16)
    assert cut.ids() == streamed.ids()
    batch = cut.read(range(10))
    assert batch.indices.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert [i for i, _ in batch.skipped] == ["s0007", "s0008", "s0009"]
    assert all("shard b.tar is truncated" in r for _, r in batch.skipped)
    # A shard larger than its sidecar says was rewritten: the sidecar is stale and ignored.
    (tmp_path / "b.tar").write_bytes(tar_bytes(samples(5, 6)))
    assert len(open_dataset(spec(str(tmp_path)), 16)) == 11


@pytest.mark.s3
def test_s3_shards_read_without_a_request_per_image(counting_s3: CountingS3, tmp_path: Path) -> None:  # noqa: F811
    client = boto3.client("s3", endpoint_url=counting_s3.url)
    bucket = "wds-counting"
    client.create_bucket(Bucket=bucket)
    local = tmp_path / "local"
    local.mkdir()
    for n in range(3):
        data = tar_bytes(samples(40 * n, 40))
        (local / f"train-{n:03d}.tar").write_bytes(data)
        client.put_object(Bucket=bucket, Key=f"wds/train-{n:03d}.tar", Body=data)
    counting_s3.reset()
    remote = open_dataset(spec(f"s3://{bucket}/wds/train-"), 24, endpoint_url=counting_s3.url)
    ref = open_dataset(spec(str(local)), 24)
    assert remote.ids() == ref.ids() and len(remote) == 120
    assert counting_s3.counts["GET"] <= 3 * 2 + 2  # a LIST and one or two streamed reads a shard
    counting_s3.reset()
    batches = [remote.read(s) for s in remote.natural_shards(40)]
    assert counting_s3.counts["GET"] <= 3 * 2  # each shard's bytes in one ranged read (plus a HEAD)
    local_batches = [ref.read(s) for s in ref.natural_shards(40)]
    for a, b in zip(batches, local_batches, strict=True):
        assert np.array_equal(a.images, b.images) and a.labels.tolist() == b.labels.tolist()
    # With sidecars, opening reads one small object per shard and, to check the shard is unchanged,
    # one small range of it: the LIST, then two GETs (and a HEAD) a shard, whatever its size.
    write_sidecars(f"s3://{bucket}/wds", counting_s3.url)
    counting_s3.reset()
    indexed = open_dataset(spec(f"s3://{bucket}/wds"), 24, endpoint_url=counting_s3.url)
    assert indexed.ids() == ref.ids() and counting_s3.counts["GET"] == 1 + 2 * 3
    assert pickle.loads(pickle.dumps(indexed)).read([119]).labels.tolist() == [119 % 3]
