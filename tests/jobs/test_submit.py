"""``zfatlas submit`` and ``zfatlas jobs`` against the loopback cluster's Ray Jobs API: a small atlas
runs to completion as a submitted job, and a bad spec never reaches the cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.kinds import parse_spec
from jobs.runner import ray_submission_id
from jobs.specs.loading import spec_run_id
from jobs.store import open_store, read_manifest
from jobs.store.provenance import code_version
from jobs.submission.ray_jobs import job_info, jobs_client, list_jobs
from jobs.submission.submit import prepare
from zfatlas_cli.main import main

ATLAS = {
    "kind": "atlas",
    "name": "submitted-atlas",
    "model": {"arch": "zfnet-small"},
    "dataset": {"format": "procedural", "num_images": 100, "seed": 1},
    "layers": ["conv1"],
    "shard_size": 50,
    "resources": {"workers": 1, "batch_size": 50},
}


def zfatlas(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process, with this session's environment (Ray's auth mode and token
    location, the test S3 credentials) minus RAY_ADDRESS, which must not redirect the Jobs API."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run(
        [sys.executable, "-m", "zfatlas_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_the_submission_id_is_read_from_the_job_config_ray_sets(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_submission_id() is None
    config = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc", "zfatlas_run_id": "r"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    assert ray_submission_id() == "raysubmit_abc"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{not json")
    assert ray_submission_id() is None


def test_prepare_pins_the_run_id_and_resolves_local_paths_on_the_submitting_side(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec({**ATLAS, "model": {"arch": "zfnet-small", "checkpoint": "models/m.pt"}})
    job = prepare(spec, output="out")
    assert job.run_id == spec_run_id(spec)  # the id `zfatlas run` gives the same spec
    assert job.output == str(tmp_path / "out")
    assert job.model.checkpoint == str(tmp_path / "models" / "m.pt")
    assert prepare(spec, output="s3://bucket/atlases").output == "s3://bucket/atlases"


@pytest.mark.ray
def test_a_bad_spec_is_refused_before_anything_is_submitted(ray_cluster, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**ATLAS, "k": 0, "layers": ["conv9"]}))
    before = len(list_jobs(jobs_client(ray_cluster.dashboard_url), zfatlas_only=False))
    result = zfatlas("submit", str(bad), "--address", ray_cluster.dashboard_url)
    assert result.returncode == 2, result.stderr
    assert "layers.0: unknown layer 'conv9'" in result.stderr and "k: " in result.stderr
    assert result.stdout == ""
    assert len(list_jobs(jobs_client(ray_cluster.dashboard_url), zfatlas_only=False)) == before
    # An unknown job is an error, not a traceback.
    assert main(["jobs", "status", "no-such-job", "--address", ray_cluster.dashboard_url]) == 1


@pytest.mark.ray
def test_zfatlas_submit_runs_an_atlas_to_completion_and_the_run_and_job_name_each_other(
    ray_cluster, trained_small, tmp_path
):
    _, _, checkpoint = trained_small
    spec_file, out = tmp_path / "atlas.yaml", tmp_path / "store"
    spec_file.write_text(
        yaml.safe_dump({**ATLAS, "model": {"arch": "zfnet-small", "checkpoint": checkpoint}})
    )

    submitted = zfatlas(
        "submit", str(spec_file), "--address", ray_cluster.dashboard_url, "--output", str(out)
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id and "\n" not in job_id

    client = jobs_client(ray_cluster.dashboard_url)
    deadline = time.monotonic() + 240
    while not (job := job_info(client, job_id)).finished:
        assert time.monotonic() < deadline, "the submitted job did not finish"
        time.sleep(2)

    status = zfatlas("jobs", "status", job_id, "--address", ray_cluster.dashboard_url)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[0] == f"{job_id} SUCCEEDED"
    logs = zfatlas("jobs", "logs", job_id, "--address", ray_cluster.dashboard_url)
    assert "zfatlas -v run spec.yaml" in logs.stdout and "committed atlas/" in logs.stdout

    run_id = job.run_id
    assert run_id == spec_run_id(parse_spec(yaml.safe_load(spec_file.read_text())))
    assert job.kind == "atlas" and job.metadata["zfatlas_name"] == "submitted-atlas"
    manifest = read_manifest(open_store(str(out)), "atlas", run_id)
    assert manifest["ray_job_id"] == job_id
    # The shipped code is no checkout; the manifest still names the submitting checkout's commit.
    assert manifest["code_version"]["git_sha"] == code_version()["git_sha"]
    assert manifest["layers"] == ["conv1"] and manifest["images_scanned"] == 100
    assert manifest["spec"]["model"]["checkpoint"] == checkpoint
