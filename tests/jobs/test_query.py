"""jobs.results.query on synthetic atlases (exact rows) in both store backends, and the bytes a one-channel
query really reads from a large atlas whose features table has several row groups."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.results.query import (
    AtlasReader,
    QueryError,
    UnknownChannelError,
    UnknownLayerError,
    UnknownRunError,
    list_runs,
)
from jobs.store import Store, begin_run, open_store
from tests.fixtures.counting_fs import CountingFileSystem
from tests.fixtures.synthetic_atlas import synthetic_rows, write_atlas

# A "large" atlas: 5 layers x 256 channels x top-9, cut into row groups of 32 channels each (how
# the atlas writer should cut features.parquet so readers can skip what they do not need).
BIG_LAYERS = {f"conv{i}": 256 for i in range(1, 6)}
BIG_ROW_GROUP = 9 * 32


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/artifacts", endpoint)


def test_channel_layers_and_tiles(store):
    rows = synthetic_rows("a1")
    write_atlas(store, "a1", rows)
    reader = AtlasReader(store, "a1")
    assert [(i.name, i.channels, i.k) for i in reader.layers()] == [("conv1", 4, 9), ("conv5", 6, 9)]
    assert reader.layer("conv5").summary_key == "atlas/a1/summary/conv5.png"

    got = reader.channel("conv5", 3).to_pylist()
    expected = [r for r in rows if r["layer"] == "conv5" and r["channel"] == 3]
    assert [r["rank"] for r in got] == list(range(9))
    assert [r["image_id"] for r in got] == [r["image_id"] for r in expected]
    assert got[0]["activation"] == pytest.approx(expected[0]["activation"])
    assert store.exists(got[0]["patch_key"]) and store.exists(got[0]["projection_grid_key"])

    tiles = reader.tiles("conv5", offset=2, limit=3).to_pylist()
    assert [t["channel"] for t in tiles] == [2, 3, 4]
    assert reader.tiles("conv5", offset=5, limit=10).num_rows == 1
    assert reader.tiles("conv5", offset=6, limit=10).num_rows == 0
    assert reader.projections("conv1", 2).num_rows == 9


def test_unknown_things_are_query_errors(store):
    write_atlas(store, "a2", synthetic_rows("a2"), images=False)
    with pytest.raises(UnknownRunError, match="no committed atlas run 'nope'"):
        AtlasReader(store, "nope")
    with pytest.raises(QueryError, match=r"'\.\.'"):
        AtlasReader(store, "..")
    reader = AtlasReader(store, "a2")
    with pytest.raises(UnknownLayerError, match="has no layer 'conv3'.*conv1, conv5"):
        reader.channel("conv3", 0)
    with pytest.raises(UnknownChannelError, match=r"channels 0\.\.3, not 4"):
        reader.channel("conv1", 4)
    with pytest.raises(UnknownChannelError):
        reader.channel("conv1", -1)


def test_uncommitted_runs_are_invisible(store):
    run = begin_run(store, "atlas", "half")
    try:
        run.put_bytes("features.parquet", b"not yet")
        with pytest.raises(UnknownRunError):
            AtlasReader(store, "half")
        assert list_runs(store, "atlas") == []
    finally:  # uncommitted on purpose: only its lease (and the thread renewing it) ends here
        if run.lease is not None:
            run.lease.release()


def test_list_runs_filters_by_kind_and_time(tmp_path):
    store = open_store(str(tmp_path))
    write_atlas(store, "old", synthetic_rows("old"), images=False)
    begin_run(store, "train", "t1").commit({"name": "t1"})
    assert [r["run_id"] for r in list_runs(store)] == ["old", "t1"]
    assert [r["run_id"] for r in list_runs(store, "atlas")] == ["old"]
    summary = list_runs(store, "atlas")[0]
    assert summary["layers"] == ["conv1", "conv5"] and summary["model_arch"] == "zfnet-small"
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert list_runs(store, since=future) == []
    with pytest.raises(QueryError):
        list_runs(store, "../atlas")


def test_export_layer_is_self_contained(tmp_path):
    store = open_store(str(tmp_path / "store"))
    write_atlas(store, "ex", synthetic_rows("ex"))
    out = open_store(str(tmp_path / "export"))
    result = AtlasReader(store, "ex").export_layer("conv1", out)
    table = pq.read_table(tmp_path / "export" / "features.parquet")
    assert result.rows == table.num_rows == 4 * 9
    assert set(table.column("layer").to_pylist()) == {"conv1"}
    for name in ("patch_key", "projection_key", "patch_grid_key", "projection_grid_key"):
        for key in set(table.column(name).to_pylist()):
            assert key.startswith("images/conv1/") and (tmp_path / "export" / key).is_file()
    assert (tmp_path / "export" / "summary" / "conv1.png").is_file()
    assert (tmp_path / "export" / "projections" / "conv1" / "part-00000.parquet").is_file()
    assert not (tmp_path / "export" / "images" / "conv5").exists()


def test_one_channel_reads_a_small_fraction_of_a_large_table(store):
    rows = synthetic_rows("big", BIG_LAYERS, num_images=100_000)
    write_atlas(store, "big", rows, images=False, row_group_size=BIG_ROW_GROUP)
    size = next(o.size for o in store.list_objects("atlas/big/") if o.key.endswith("features.parquet"))
    meta = pq.ParquetFile(io.BytesIO(store.get_bytes("atlas/big/features.parquet"))).metadata
    assert meta.num_row_groups == len(rows) // BIG_ROW_GROUP == 40

    inner, _ = store.arrow_filesystem()
    counter = CountingFileSystem(inner)
    reader = AtlasReader(store, "big", filesystem=pafs.PyFileSystem(counter))

    # Cold: the footer (schema + row-group statistics) once, then the matching row group only.
    got = reader.channel("conv3", 100)
    assert got.num_rows == 9 and set(got.column("channel").to_pylist()) == {100}
    cold_bytes, cold_reads = counter.bytes_read, counter.reads
    assert cold_bytes < 0.5 * size, (cold_bytes, size)

    # Warm (what the API does with its cached reader): one ranged read of one row group's chunks.
    counter.bytes_read = counter.reads = 0
    assert reader.channel("conv4", 7).num_rows == 9
    one_channel = counter.bytes_read
    assert counter.reads == 1
    assert one_channel < 0.05 * size, (one_channel, size)

    # The whole table through the same reader, for comparison.
    counter.bytes_read = counter.reads = 0
    assert reader.scan(None, reader.features.schema.names).num_rows == len(rows)
    whole = counter.bytes_read
    assert whole > 15 * one_channel
    print(f"\n{type(inner).__name__}: table {size} B; cold one-channel query {cold_bytes} B in "
          f"{cold_reads} reads; warm {one_channel} B in 1 read; whole table scan {whole} B")

    # Channel counts come from row-group statistics: no data read at all.
    counter.bytes_read = counter.reads = 0
    assert [i.channels for i in reader.layers()] == [256] * 5
    assert counter.bytes_read == 0
