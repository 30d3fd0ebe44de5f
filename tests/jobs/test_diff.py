"""jobs.results.diff on synthetic atlases whose differences are known exactly, and on two real atlases."""

from __future__ import annotations

import io
import random

import pyarrow.parquet as pq
import pytest

from jobs.results.diff import DIFF_SCHEMA, DiffError, diff_atlases, write_diff
from jobs.results.query import AtlasReader
from jobs.store import Store, open_store
from tests.fixtures.synthetic_atlas import feature_row, synthetic_rows, write_atlas


def _rekey(rows: list[dict], run_id: str) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r)
        for name in ("patch_key", "projection_key", "patch_grid_key", "projection_grid_key"):
            r[name] = r[name].replace("atlas/a/", f"atlas/{run_id}/")
        out.append(r)
    return out


@pytest.fixture
def pair(tmp_path) -> tuple[Store, dict]:
    """Atlas "a" and atlas "b" = a with known changes:
    conv1#0 unchanged; conv1#1 five of nine images replaced and top activation x1.5;
    conv1#2 died (all activations 0); conv5#3 born (0 in a); conv5#4 dead in both."""
    store = open_store(str(tmp_path))
    a = synthetic_rows("a")
    rng = random.Random(5)
    for r in a:
        if (r["layer"], r["channel"]) in (("conv5", 3), ("conv5", 4)):
            r["activation"] = 0.0
    b = _rekey(a, "b")
    for r in b:
        key = (r["layer"], r["channel"])
        if key == ("conv1", 1):
            r["activation"] *= 1.5
            if r["rank"] >= 4:
                r.update(feature_row("b", "conv1", 1, r["rank"], r["activation"], 1000 + r["rank"], rng))
        elif key == ("conv1", 2):
            r["activation"] = 0.0
        elif key == ("conv5", 3):
            r["activation"] = 2.0 - 0.1 * r["rank"]
    write_atlas(store, "a", a, images=False)
    write_atlas(store, "b", b)  # with its images: the diff names their grids
    return store, {(r["layer"], r["channel"]): r for r in a if r["rank"] == 0}


def test_diff_counts_shared_images_changes_deaths_and_births(pair):
    store, top_a = pair
    diff = diff_atlases(AtlasReader(store, "a"), AtlasReader(store, "b"))
    assert diff.table.schema.equals(DIFF_SCHEMA)
    assert diff.layers == ["conv1", "conv5"] and diff.warnings == []
    rows = {(r["layer"], r["channel"]): r for r in diff.table.to_pylist()}
    assert len(rows) == 4 + 6
    same = rows[("conv1", 0)]
    assert (same["status"], same["shared_topk"], same["delta_activation"]) == ("alive", 9, 0.0)
    changed = rows[("conv1", 1)]
    assert changed["status"] == "alive" and changed["shared_topk"] == 4
    assert changed["relative_change"] == pytest.approx(0.5, rel=1e-5)
    assert changed["delta_activation"] == pytest.approx(0.5 * top_a[("conv1", 1)]["activation"], rel=1e-5)
    assert rows[("conv1", 2)]["status"] == "died" and rows[("conv1", 2)]["top_activation_b"] == 0
    born = rows[("conv5", 3)]
    assert born["status"] == "born" and born["relative_change"] is None
    assert born["top_activation_b"] == pytest.approx(2.0)
    assert rows[("conv5", 4)]["status"] == "dead"
    assert diff.counts() == {"died": 1, "born": 1, "alive": 7, "dead": 1}
    assert changed["projection_grid_key_b"] == "atlas/b/images/conv1/0001/projection-grid.png"

    # Ranked most changed first: death, birth, then fewest shared images; dead-in-both last.
    ranked = diff.table.to_pylist()
    assert [r["rank"] for r in ranked] == list(range(1, 11))
    assert [(r["layer"], r["channel"]) for r in ranked[:3]] == [("conv1", 2), ("conv5", 3), ("conv1", 1)]
    assert (ranked[-1]["layer"], ranked[-1]["channel"]) == ("conv5", 4)


def test_diff_of_one_layer_and_written_through_the_store(pair, s3_endpoint, s3_bucket):
    store, _ = pair
    diff = diff_atlases(AtlasReader(store, "a"), AtlasReader(store, "b"), ["conv5"])
    assert diff.layers == ["conv5"] and diff.table.num_rows == 6
    for out in (store, open_store(f"s3://{s3_bucket}/reports", s3_endpoint)):
        where = write_diff(diff, out, "diffs/a--b.parquet")
        assert where.endswith("diffs/a--b.parquet")
        table = pq.read_table(io.BytesIO(out.get_bytes("diffs/a--b.parquet")))
        assert table.schema.remove_metadata().equals(DIFF_SCHEMA)
        assert table.schema.metadata[b"zfatlas.diff.run_a"] == b"a"
        assert table.to_pylist() == diff.table.to_pylist()
    with pytest.raises(ValueError):
        write_diff(diff, store, "../escape.parquet")


def test_incomparable_atlases_are_refused(tmp_path):
    store = open_store(str(tmp_path))
    write_atlas(store, "small", synthetic_rows("small"), images=False)
    write_atlas(store, "other", synthetic_rows("other"), images=False, variant="zfnet")
    write_atlas(store, "wider", synthetic_rows("wider", {"conv1": 5}), images=False)
    write_atlas(store, "deep", synthetic_rows("deep", {"conv2": 4}), images=False)
    small = AtlasReader(store, "small")
    with pytest.raises(DiffError, match="different architectures"):
        diff_atlases(small, AtlasReader(store, "other"))
    with pytest.raises(DiffError, match="layer conv1 has 4 channels in small but 5 in wider"):
        diff_atlases(small, AtlasReader(store, "wider"))
    with pytest.raises(DiffError, match="no layer in common"):
        diff_atlases(small, AtlasReader(store, "deep"))
    with pytest.raises(DiffError, match="not in both"):
        diff_atlases(small, small, ["conv2"])
    narrow = open_store(str(tmp_path))
    write_atlas(narrow, "conv1-only", synthetic_rows("conv1-only", {"conv1": 4}), images=False)
    diff = diff_atlases(small, AtlasReader(narrow, "conv1-only"))
    assert diff.layers == ["conv1"] and "conv5" in diff.warnings[0]


@pytest.mark.ray
def test_diff_of_real_atlases_before_and_after_training(real_atlases):
    store = open_store(real_atlases.store)
    before, after = AtlasReader(store, real_atlases.before), AtlasReader(store, real_atlases.after)
    same = diff_atlases(before, before)
    assert set(same.table.column("shared_topk").to_pylist()) == {9}
    assert set(same.table.column("delta_activation").to_pylist()) == {0.0}
    drift = diff_atlases(before, after)
    assert drift.table.num_rows == 32 + 64 and drift.warnings == []
    shared = drift.table.column("shared_topk").to_pylist()
    assert min(shared) < 9  # training moved some channels' favourite images
    ranks = drift.table.column("rank").to_pylist()
    assert ranks == sorted(ranks)
