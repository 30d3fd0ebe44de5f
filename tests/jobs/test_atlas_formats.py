"""An atlas over WebDataset shards (and Parquet) packed from an ImageFolder equals the atlas over the
ImageFolder itself: same rows, image ids, indices, labels, activations and skips, on the session's
loopback Ray cluster."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.datasets import open_dataset
from jobs.datasets.pack import pack
from jobs.kinds import parse_spec
from jobs.runner import run_spec
from jobs.specs.base import DatasetSpec
from jobs.store import open_store

pytestmark = pytest.mark.ray

COMPARED = ["layer", "channel", "rank", "image_id", "image_index", "label", "y", "x", "box_top", "box_left",
            "box_height", "box_width"]


def _folder(root: Path) -> None:
    rng = np.random.default_rng(3)
    for i in range(36):
        h, w = rng.integers(64, 110, size=2)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 40 * (i % 6))], -1)
        noise = rng.integers(0, 60, size=(h, w, 3))
        path = root / f"class{i % 3}" / f"img{i:03d}.{'png' if i % 7 == 0 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(
            buf, format="PNG" if i % 7 == 0 else "JPEG", quality=90)
        path.write_bytes(buf.getvalue()[:200] if i == 10 else buf.getvalue())  # one truncated image


def _atlas(dataset: dict, out: Path, run_id: str) -> tuple[dict, list[dict]]:
    spec = parse_spec({
        "kind": "atlas", "name": "formats", "run_id": run_id, "seed": 0,
        "model": {"arch": "zfnet-small"}, "dataset": dataset, "output": str(out),
        "layers": ["conv1", "conv2"], "k": 4, "shard_size": 10, "resources": {"workers": 2, "batch_size": 8},
    })
    manifest = run_spec(spec, quiet=True)
    table = pq.read_table(io.BytesIO(open_store(str(out)).get_bytes(f"atlas/{run_id}/features.parquet")))
    rows = sorted(table.select(COMPARED + ["activation"]).to_pylist(),
                  key=lambda r: (r["layer"], r["channel"], r["rank"]))
    return manifest, rows


def test_atlas_over_packed_formats_equals_imagefolder(ray_cluster, tmp_path: Path) -> None:
    _folder(tmp_path / "folder")
    source = open_dataset(DatasetSpec(format="imagefolder", uri=str(tmp_path / "folder")), 64)
    pack(source, str(tmp_path / "wds"), "webdataset", shard_size=12)
    pack(source, str(tmp_path / "pq"), "parquet", shard_size=12, row_group_size=5)
    folder = {"format": "imagefolder", "uri": str(tmp_path / "folder")}
    ref_manifest, ref = _atlas(folder, tmp_path / "o", "imagefolder")
    assert ref_manifest["images_skipped"] == 1 and ref_manifest["images_scanned"] == 35
    for fmt, where in (("webdataset", "wds"), ("parquet", "pq")):
        manifest, rows = _atlas({"format": fmt, "uri": str(tmp_path / where)}, tmp_path / "o", fmt)
        assert manifest["images_total"] == ref_manifest["images_total"] == 36
        assert manifest["skipped"] == ref_manifest["skipped"]
        assert len(rows) == len(ref) > 0
        for a, b in zip(rows, ref, strict=True):
            assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
            assert a["activation"] == pytest.approx(b["activation"], rel=1e-6, abs=1e-7)
