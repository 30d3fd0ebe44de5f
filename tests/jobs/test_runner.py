"""run_spec: dispatch by kind, commit once, no-op on a committed run, nothing visible on failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from jobs import kinds
from jobs.analyses.probe.spec import ProbeSpec
from jobs.kinds import parse_spec
from jobs.runner import run_location, run_spec
from jobs.specs.base import SpecError
from jobs.specs.kind import JobKind
from jobs.specs.loading import spec_run_id
from jobs.store import RunWriter, committed_runs, open_store
from zfatlas_cli.main import main

CALLS: list[str] = []
SCHEMA = pa.schema([pa.field("i", pa.int64(), nullable=False)])


def fake_runner(spec: ProbeSpec, run: RunWriter, *, quiet: bool) -> dict[str, Any]:
    CALLS.append(run.run_id)
    for i in range(4):
        if spec.seed == 13 and i == 2:
            raise RuntimeError("worker lost")
        run.put_png(f"img/{i}.png", np.full((4, 4, 3), i, np.uint8))
    run.write_table("t.parquet", pa.table({"i": [1, 2]}), SCHEMA)
    return {"images_seen": 4, "images_skipped": 0, "timings": {"scan_s": 0.5}}


@pytest.fixture(autouse=True)
def fake_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    CALLS.clear()
    monkeypatch.setitem(kinds.KINDS, "probe", JobKind("probe", ProbeSpec, fake_runner))


def _spec(tmp_path: Path, **fields: Any) -> ProbeSpec:
    return parse_spec({"kind": "probe", "name": "p", "output": str(tmp_path / "store"), **fields})


def test_runs_commits_and_then_noops(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    manifest = run_spec(spec, quiet=True)
    assert manifest["status"] == "committed" and manifest["kind"] == "probe" and manifest["name"] == "p"
    assert manifest["run_id"] == spec_run_id(spec) and manifest["images_seen"] == 4
    assert manifest["spec"] == spec.model_dump(mode="json")
    assert manifest["timings"]["scan_s"] == 0.5 and manifest["timings"]["total_s"] >= 0
    assert len(manifest["files"]) == 5

    assert run_spec(spec) == manifest
    assert [spec_run_id(spec)] == CALLS  # the second call did not run the job
    store = open_store(spec.output)
    assert [r["run_id"] for r in committed_runs(store, "probe")] == [spec_run_id(spec)]
    assert run_location(spec) == str(tmp_path / "store" / "probe" / spec_run_id(spec))


def test_failed_runner_leaves_nothing_and_rerun_commits_once(tmp_path: Path) -> None:
    spec = _spec(tmp_path, seed=13, run_id="fixed")
    with pytest.raises(RuntimeError, match="worker lost"):
        run_spec(spec)
    store = open_store(spec.output)
    # Its two files are removed with the failure, and its lease released.
    assert committed_runs(store) == [] and store.list_keys("probe/fixed") == []

    fixed = spec.model_copy(update={"seed": 0})  # same run id: the retry runs afresh
    manifest = run_spec(fixed)
    assert sorted(f["key"] for f in manifest["files"]) == [f"img/{i}.png" for i in range(4)] + ["t.parquet"]
    assert store.list_keys("probe/fixed/") == sorted(
        [f"probe/fixed/img/{i}.png" for i in range(4)]
        + ["probe/fixed/manifest.json", "probe/fixed/t.parquet"]
    )
    assert len(committed_runs(store)) == 1


def resuming_runner(spec: Any, run: RunWriter, *, quiet: bool) -> dict[str, Any]:
    CALLS.append(run.run_id)
    found = run.store.exists(run.key("checkpoints/epoch-0001.pt"))
    run.put_bytes("checkpoints/epoch-0001.pt", b"state")
    if len(CALLS) == 1:
        raise RuntimeError("crashed after the first checkpoint")
    return {"found_checkpoint": found}


def test_resumable_kind_gets_its_leftovers_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = kinds.KINDS["train"]
    assert train.resumable
    monkeypatch.setitem(kinds.KINDS, "train", JobKind("train", train.spec, resuming_runner, resumable=True))
    spec = parse_spec({"kind": "train", "name": "t", "output": str(tmp_path), "run_id": "t1"})
    with pytest.raises(RuntimeError, match="crashed"):
        run_spec(spec)
    assert run_spec(spec)["found_checkpoint"] is True
    assert len(CALLS) == 2


def test_output_override_is_used_and_recorded(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    other = tmp_path / "elsewhere"
    manifest = run_spec(spec, output=str(other))
    assert manifest["spec"]["output"] == str(other)
    assert committed_runs(open_store(str(other)))[0]["run_id"] == spec_run_id(spec)
    assert not (tmp_path / "store").exists()
    with pytest.raises(SpecError, match="output: unsupported URI scheme"):
        run_spec(spec, output="ftp://x/y")


def test_one_table_of_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["train", "atlas", "occlusion", "invariance", "correspondence", "probe"]
    assert list(kinds.KINDS) == names
    for name, kind in kinds.KINDS.items():
        assert kind.name == name and kind.spec.model_fields["kind"].default == name
    assert [name for name, kind in kinds.KINDS.items() if kind.resumable] == ["train"]
    spec = parse_spec({"kind": "train", "name": "t", "output": str(tmp_path)})
    monkeypatch.delitem(kinds.KINDS, "train")  # as in a build without the trainer
    with pytest.raises(SpecError, match="kind: unknown kind 'train'"):
        run_spec(spec)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_run_prints_the_run_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec_path = tmp_path / "probe.yaml"
    spec_path.write_text("kind: probe\nname: cli\n")
    out_dir = tmp_path / "out"
    code = main(["run", str(spec_path), "--output", str(out_dir), "--set", "folds=3", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    run_dir = Path(out.strip())
    assert run_dir.parent == out_dir / "probe" and (run_dir / "manifest.json").is_file()
    assert main(["run", str(spec_path), "--output", str(out_dir), "--set", "folds=3"]) == 0
    assert capsys.readouterr().out == out and len(CALLS) == 1

    monkeypatch.delitem(kinds.KINDS, "train")  # a kind this version could not run
    spec_path.write_text("kind: train\nname: cli\n")
    assert main(["run", str(spec_path), "--output", str(out_dir)]) == 2
    assert "unknown kind 'train'" in capsys.readouterr().err


@pytest.mark.s3
def test_cli_run_into_s3(s3_endpoint: str, s3_bucket: str, tmp_path: Path, capsys) -> None:
    spec_path = tmp_path / "probe.yaml"
    spec_path.write_text(f"kind: probe\nname: s3\nendpoint_url: {s3_endpoint}\n")
    assert main(["run", str(spec_path), "--output", f"s3://{s3_bucket}/runs"]) == 0
    location = capsys.readouterr().out.strip()
    assert location.startswith(f"s3://{s3_bucket}/runs/probe/s3-")
    runs = committed_runs(open_store(f"s3://{s3_bucket}/runs", s3_endpoint))
    assert len(runs) == 1 and len(runs[0]["files"]) == 5

    assert main(["run", str(spec_path), "--output", "s3://missing-bucket-x/runs"]) == 1
    assert "missing-bucket-x" in capsys.readouterr().err
