"""The atlas job end to end on the session's two-node loopback Ray cluster (3 fake GPUs)."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from jobs.atlas.tables import FEATURES_SCHEMA, PROJECTIONS_SCHEMA, part_key
from jobs.datasets import shard_ranges
from jobs.kinds import parse_spec
from jobs.results.query import AtlasReader
from jobs.runner import run_spec
from jobs.store import committed_runs, open_store
from tests.fixtures.counting_fs import CountingFileSystem
from zfcore.data import ProceduralDataset, to_tensor
from zfcore.receptive import receptive_box
from zfcore.scan import scan_batches

pytestmark = pytest.mark.ray

# The full test projects conv1, conv2 and conv5 (both nodes, all three GPUs); the others fewer.
LAYERS = ["conv1", "conv2", "conv5"]
FAST_LAYERS = ["conv1", "conv5"]
IMAGES = 480
SHARD = 40
BATCH = 32


def atlas_spec(checkpoint: str, output: str, run_id: str, layers: list[str] | None = None, **extra) -> object:
    return parse_spec({
        "kind": "atlas", "name": "test-atlas", "run_id": run_id, "seed": 0,
        "model": {"arch": "zfnet-small", "checkpoint": checkpoint},
        "dataset": {"format": "procedural", "num_images": IMAGES, "seed": 1},
        "output": output,
        "resources": {"workers": 8, "batch_size": BATCH},
        "shard_size": SHARD,
        **({"layers": layers} if layers else {}),
        **extra,
    })


def reference_rows(model, layers: list[str]) -> dict[tuple[str, int, int], tuple[int, int, int, float]]:
    """The atlas's top-9 from one process of plain zfcore, batched exactly as the job batches."""
    data = ProceduralDataset(IMAGES, 64, seed=1)
    batches = []
    for shard in shard_ranges(IMAGES, SHARD):
        for i in range(shard.start, shard.stop, BATCH):
            idx = list(range(i, min(i + BATCH, shard.stop)))
            images, _ = data.batch(idx)
            batches.append((to_tensor(images), torch.tensor(idx)))
    results = scan_batches(model, batches, layers, 9).results()
    out = {}
    for layer, top in results.items():
        ys, xs = top.positions_yx()
        for c in range(top.values.shape[0]):
            for r in range(9):
                out[(layer, c, r)] = (int(top.image_index[c, r]), int(ys[c, r]), int(xs[c, r]),
                                      float(top.values[c, r]))
    return out


@pytest.fixture(scope="module")
def cluster_atlas(ray_cluster, trained_small, tmp_path_factory):
    model, _, checkpoint = trained_small
    out = tmp_path_factory.mktemp("atlas-store")
    manifest = run_spec(atlas_spec(checkpoint, str(out), "e2e", layers=LAYERS), quiet=True)
    return manifest, open_store(str(out)), model


def test_one_worker_per_gpu_each_on_its_own_gpu(cluster_atlas, ray_cluster):
    manifest, _, _ = cluster_atlas
    workers = manifest["workers"]
    assert len(workers) == ray_cluster.gpus == 3
    slots = {(w["node_id"], tuple(w["gpu_ids"])) for w in workers}
    assert len(slots) == 3 and all(len(w["gpu_ids"]) == 1 for w in workers)
    assert len({w["node_id"] for w in workers}) == 2  # both nodes took part
    assert all(w["shards"] >= 1 for w in workers)
    assert sum(w["shards"] for w in workers) == IMAGES // SHARD
    assert manifest["images_scanned"] == IMAGES and manifest["images_skipped"] == 0


def test_atlas_equals_single_process_reference(cluster_atlas):
    manifest, store, model = cluster_atlas
    table = pq.read_table(io.BytesIO(store.get_bytes("atlas/e2e/features.parquet")))
    assert table.schema.equals(FEATURES_SCHEMA)
    expected = reference_rows(model, manifest["layers"])
    assert len(expected) == 9 * (32 + 64 + 64)
    # A channel that never fired keeps one row, rank 0, marked dead; the others their top 9.
    dead = {(layer, c) for (layer, c, r), (_, _, _, v) in expected.items() if r == 0 and not v > 0}
    assert table.num_rows == len(expected) - 8 * len(dead)
    assert {(r["layer"], r["channel"]) for r in table.to_pylist() if r["dead"]} == dead
    assert sum(manifest["dead_channels"].values()) == len(dead)
    for row in table.to_pylist():
        index, y, x, value = expected[(row["layer"], row["channel"], row["rank"])]
        assert (row["image_index"], row["y"], row["x"]) == (index, y, x)
        assert row["image_id"] == f"proc-{index:08d}"
        assert row["activation"] == pytest.approx(value, rel=1e-4, abs=1e-5)
        box = receptive_box(model, row["layer"], y, x, 64)
        assert (row["box_top"], row["box_left"], row["box_height"], row["box_width"]) == (
            box.top, box.left, box.height, box.width)
    labels = ProceduralDataset(IMAGES, 64, seed=1)
    assert all(r["label"] == labels.label(r["image_index"]) for r in table.to_pylist()[:50])


def test_images_and_raw_projections_are_written(cluster_atlas):
    manifest, store, _ = cluster_atlas
    rows = pq.read_table(io.BytesIO(store.get_bytes("atlas/e2e/features.parquet"))).to_pylist()
    row = next(r for r in rows if r["layer"] == "conv2" and r["channel"] == 5 and r["rank"] == 0)
    # A handful of objects: features, per layer a summary and the parts of its images and
    # projections tables (a part per GROUPS_PER_PART groups of channels, in channel order).
    keys = [k.removeprefix("atlas/e2e/") for k in store.list_keys("atlas/e2e/")]
    layers = manifest["layers"]
    parts = manifest["parts"]
    assert sorted(keys) == sorted(["features.parquet", "manifest.json"] + [
        f"summary/{layer}.png" for layer in layers] + [
        part_key(kind, layer, n) for layer in layers for kind in ("images", "projections")
        for n in range(len(parts[layer]))
    ])
    assert manifest["format"] == 3 and manifest["objects_written"] == len(keys) - 1
    for layer in layers:  # consecutive channel ranges covering the layer
        ranges = parts[layer]
        assert ranges[0][0] == 0 and all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:], strict=False))
    assert len(parts["conv2"]) > 1
    # The store is a folder of the head node's machine: the second node's workers sent their parts
    # (the test's two raylets share one disk, but a real second machine would not).
    sent = sum(w["parts_sent"] for w in manifest["workers"])
    assert 0 < sent < sum(w["parts"] for w in manifest["workers"]) == sum(len(r) for r in parts.values())
    reader = AtlasReader(store, "e2e")
    patch = np.asarray(Image.open(io.BytesIO(reader.png("conv2", 5, "patch", 0))))
    assert patch.shape == (row["box_height"], row["box_width"], 3)
    # The patch is exactly the pixels the model saw under the receptive box.
    image = ProceduralDataset(IMAGES, 64, seed=1)[row["image_index"]].image
    box = (slice(row["box_top"], row["box_top"] + row["box_height"]),
           slice(row["box_left"], row["box_left"] + row["box_width"]))
    assert np.array_equal(patch, image[box])
    projection = Image.open(io.BytesIO(reader.png("conv2", 5, "projection", 0)))
    assert projection.size == (row["box_width"], row["box_height"])
    assert Image.open(io.BytesIO(reader.png("conv2", 5, "patch_grid"))).size[0] > 3 * row["box_width"]
    # Raw projections: a layer's parts read as one dataset, filterable by channel.
    fs, base = store.arrow_filesystem()
    proj = ds.dataset(f"{base}/atlas/e2e/projections/conv2", filesystem=fs, format="parquet")
    assert proj.schema.equals(PROJECTIONS_SCHEMA)
    raw = pq.ParquetFile(fs.open_input_file(f"{base}/atlas/e2e/{part_key('projections', 'conv2', 0)}"))
    assert raw.num_row_groups > 1
    one = proj.to_table(filter=(ds.field("layer") == "conv2") & (ds.field("channel") == 5)).to_pylist()
    assert sorted(r["rank"] for r in one) == list(range(9))
    top = next(r for r in one if r["rank"] == 0)
    arr = np.asarray(top["values"], np.float32).reshape(3, top["box_height"], top["box_width"])
    assert np.abs(arr).max() > 0


def test_every_object_the_manifest_names_exists_and_every_image_has_its_row(cluster_atlas):
    manifest, store, _ = cluster_atlas
    keys = set(store.list_keys("atlas/e2e/"))
    named = [f"atlas/e2e/{k}" for k in manifest["tables"].values()] + list(manifest["summaries"].values())
    assert named and all(key in keys for key in named)
    assert {f"atlas/e2e/{f['key']}" for f in manifest["files"]} == keys - {"atlas/e2e/manifest.json"}
    rows = pq.read_table(io.BytesIO(store.get_bytes("atlas/e2e/features.parquet"))).to_pylist()
    live = {(r["layer"], r["channel"], r["rank"]) for r in rows if not r["dead"]}
    fs, base = store.arrow_filesystem()
    for kind in ("images", "projections"):
        found = set()
        for layer in manifest["layers"]:
            t = ds.dataset(f"{base}/atlas/e2e/{kind}/{layer}", filesystem=fs, format="parquet").to_table(
                columns=["layer", "channel", "rank"])
            found |= set(zip(*(t.column(c).to_pylist() for c in ("layer", "channel", "rank")), strict=True))
        assert found == live, kind  # one image row per live feature row, none for dead channels


def assert_one_channel_reads_one_row_group(store, run_id: str, layer: str) -> None:
    """Serving one channel's images reads that channel's row group of the images table part that
    holds it and nothing else of it once the footer is known (besides the channel's rows of the
    features table): counted bytes, on whichever backend ``store`` is."""
    reader = AtlasReader(store, run_id)
    first_part = reader.manifest["parts"][layer][0]
    table = reader.table_key("images", layer, first_part[0])
    data = store.get_bytes(f"atlas/{run_id}/{table}")
    size = len(data)
    local = pq.ParquetFile(io.BytesIO(data))
    meta = local.metadata
    assert meta.num_row_groups >= 4
    last = meta.num_row_groups - 1
    group_bytes = sum(meta.row_group(last).column(c).total_compressed_size for c in range(meta.num_columns))
    far = local.read_row_group(last).column("channel").to_pylist()[0]

    inner, _ = store.arrow_filesystem()
    counter = CountingFileSystem(inner)
    reader = AtlasReader(store, run_id, filesystem=pafs.PyFileSystem(counter))
    first = local.read_row_group(0).column("channel").to_pylist()[0]
    reader.png(layer, first, "patch", 0)  # cold: the footer, then the first row group
    assert counter.bytes_read < size / 2, (counter.bytes_read, size)
    counter.reset()
    reader.png(layer, far, "projection_grid")  # warm: the last row group's column chunks only
    [image_bytes] = [n for path, n in counter.bytes_by_path.items() if path.endswith(table)]
    assert 0 < image_bytes <= group_bytes + 1024, (counter.bytes_by_path, group_bytes)
    assert image_bytes < size / meta.num_row_groups * 2


def test_a_one_channel_image_read_is_one_row_group(cluster_atlas):
    _, store, _ = cluster_atlas
    assert_one_channel_reads_one_row_group(store, "e2e", "conv2")


def test_export_writes_the_pngs_the_api_serves(cluster_atlas, tmp_path):
    _, store, _ = cluster_atlas
    reader = AtlasReader(store, "e2e")
    result = reader.export_layer("conv2", open_store(str(tmp_path / "export")))
    exported = pq.read_table(tmp_path / "export" / "features.parquet").to_pylist()
    assert result.rows == len(exported) > 0
    checked = 0
    for row in exported:
        if row["dead"]:
            continue
        for kind in ("patch", "projection"):
            got = (tmp_path / "export" / row[f"{kind}_key"]).read_bytes()
            assert got == reader.png("conv2", row["channel"], kind, row["rank"])
            checked += 1
        grid = (tmp_path / "export" / row["projection_grid_key"]).read_bytes()
        assert grid == reader.png("conv2", row["channel"], "projection_grid")
    assert checked == 2 * sum(not r["dead"] for r in exported)


def test_a_format_2_atlas_reads_as_before(cluster_atlas, tmp_path):
    """Format 2 (one images and one projections table per layer, before the parts): the
    same atlas with each layer's parts joined into one file, row group for row group, reads the
    same images, projections and export as the format-3 original."""
    manifest, store, _ = cluster_atlas
    root = Path(store.uri_of("")).resolve()
    old = tmp_path / "old"
    shutil.copytree(root / "atlas" / "e2e", old / "atlas" / "e2e")
    run = old / "atlas" / "e2e"
    for layer, ranges in manifest["parts"].items():
        for kind in ("images", "projections"):
            parts = [run / part_key(kind, layer, n) for n in range(len(ranges))]
            schema = pq.ParquetFile(parts[0]).schema_arrow
            with pq.ParquetWriter(run / kind / f"{layer}.parquet", schema) as w:
                for path in parts:
                    f = pq.ParquetFile(path)
                    for g in range(f.num_row_groups):
                        w.write_table(f.read_row_group(g))
            shutil.rmtree(run / kind / layer)
    old_manifest = {k: v for k, v in manifest.items() if k != "parts"}
    old_manifest["format"] = 2
    old_manifest["tables"] = {"features": "features.parquet", **{
        f"{kind}/{layer}": f"{kind}/{layer}.parquet" for layer in manifest["layers"]
        for kind in ("images", "projections")}}
    (run / "manifest.json").write_text(json.dumps(old_manifest))
    new, former = AtlasReader(store, "e2e"), AtlasReader(open_store(str(old)), "e2e")
    assert former.format == 2
    for layer in manifest["layers"]:
        for channel in (0, manifest["parts"][layer][-1][0]):
            if new.channel(layer, channel, ["dead"]).column("dead")[0].as_py():
                continue
            assert former.png(layer, channel, "projection_grid") == new.png(layer, channel, "projection_grid")
            assert former.png(layer, channel, "patch", 0) == new.png(layer, channel, "patch", 0)
            assert former.projections(layer, channel).equals(new.projections(layer, channel))
    a, b = former.export_layer("conv2", open_store(str(tmp_path / "a"))), new.export_layer(
        "conv2", open_store(str(tmp_path / "b")))
    assert a.rows == b.rows and (tmp_path / "a" / "projections" / "conv2" / "part-00000.parquet").is_file()


def test_fault_a_killed_worker_changes_nothing(cluster_atlas, trained_small, tmp_path):
    manifest, store, _ = cluster_atlas
    _, _, checkpoint = trained_small
    spec = atlas_spec(checkpoint, str(tmp_path), "fault", layers=FAST_LAYERS, shard_size=SHARD // 4)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(manifest=run_spec(spec, quiet=True)))
    thread.start()
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        try:
            victim = ray.get_actor("zfatlas-atlas-fault-1")
        except ValueError:
            time.sleep(0.2)
    assert victim is not None, "the job's workers never appeared"
    ray.get(victim.info.remote())  # loaded: from now on it is scanning shards
    time.sleep(0.3)
    ray.kill(victim, no_restart=True)
    thread.join(timeout=600)
    assert "manifest" in result, "the job did not finish after losing a worker"
    assert result["manifest"]["workers_lost"] == 1
    faulty_store = open_store(str(tmp_path))
    faulty = pq.read_table(io.BytesIO(faulty_store.get_bytes("atlas/fault/features.parquet")))
    clean = pq.read_table(io.BytesIO(store.get_bytes("atlas/e2e/features.parquet")))
    keys = ["layer", "channel", "rank", "image_index", "y", "x", "label"]
    clean = clean.filter(pc.is_in(clean.column("layer"), pa.array(FAST_LAYERS)))
    assert faulty.num_rows == clean.num_rows
    assert faulty.select(keys).to_pylist() == clean.select(keys).to_pylist()


def test_results_land_in_s3_too(ray_cluster, trained_small, s3_bucket, s3_endpoint):
    _, _, checkpoint = trained_small
    bucket_uri, endpoint = f"s3://{s3_bucket}", s3_endpoint
    spec = atlas_spec(checkpoint, f"{bucket_uri}/atlases", "s3run", layers=FAST_LAYERS,
                      endpoint_url=endpoint)
    manifest = run_spec(spec, quiet=True)
    store = open_store(f"{bucket_uri}/atlases", endpoint)
    assert [r["run_id"] for r in committed_runs(store, "atlas")] == ["s3run"]
    table = pq.read_table(io.BytesIO(store.get_bytes("atlas/s3run/features.parquet")))
    dead = sum(table.column("dead").to_pylist())
    assert table.num_rows == 9 * (32 + 64 - dead) + dead == manifest["features_rows"]
    assert store.exists(f"atlas/s3run/{part_key('images', 'conv1', 0)}")
    assert sum(w["parts_sent"] for w in manifest["workers"]) == 0  # every worker reaches S3 itself
    assert AtlasReader(store, "s3run").png("conv1", 0, "projection_grid").startswith(b"\x89PNG")
    assert_one_channel_reads_one_row_group(store, "s3run", "conv5")


def test_same_spec_twice_is_one_committed_run(cluster_atlas, trained_small):
    manifest, store, _ = cluster_atlas
    _, _, checkpoint = trained_small
    again = run_spec(atlas_spec(checkpoint, store.uri_of(""), "e2e", layers=LAYERS), quiet=True)
    assert again["committed_at"] == manifest["committed_at"]
    assert [r["run_id"] for r in committed_runs(store, "atlas")] == ["e2e"]


def test_fc_layer_atlas_of_a_randomly_initialized_model(ray_cluster, tmp_path):
    spec = parse_spec({
        "kind": "atlas", "name": "init", "model": {"arch": "zfnet-small"},
        "dataset": {"format": "procedural", "num_images": 20, "seed": 3}, "output": str(tmp_path),
        "layers": ["fc7"], "k": 3, "resources": {"workers": 1, "batch_size": 8},
    })
    manifest = run_spec(spec, quiet=True)
    table = pq.read_table(tmp_path / "atlas" / manifest["run_id"] / "features.parquet")
    dead = sum(table.column("dead").to_pylist())
    assert table.num_rows == 3 * (256 - dead) + dead  # a unit that never fired: one row, no images
    assert 0 < dead < 256 and dead == manifest["dead_channels"]["fc7"]
    assert set(table.column("y").to_pylist()) == {0}
    # fc units see the whole image.
    assert set(table.column("box_height").to_pylist()) == {64}


def test_cli_run_starts_a_local_ray_when_no_address_is_set(tmp_path):
    """What `make demo` and a laptop user do: `zfatlas run` with no RAY_ADDRESS."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cli = Path(sys.executable).with_name("zfatlas")
    proc = subprocess.run(
        [str(cli), "run", "examples/atlas-small.yaml", "--quiet", "--output", str(tmp_path),
         "--set", "dataset.num_images=40", "--set", "layers=[conv1]", "--set", "shard_size=20"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = committed_runs(open_store(str(tmp_path)), "atlas")
    assert len(runs) == 1
    assert str(tmp_path) in proc.stdout
    table = pq.read_table(tmp_path / "atlas" / runs[0]["run_id"] / "features.parquet")
    dead = sum(table.column("dead").to_pylist())
    assert table.num_rows == 9 * (32 - dead) + dead
