"""The command as a user meets it: ``--version``, ``python -m zfatlas_cli``, quiet output, ``--json``
that parses, the environment defaults of ``--store`` and ``serve``, one-line ``jobs status``, a
submit of a committed run that submits nothing, and the README's spec kept equal to the example."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from jobs.store import open_store
from tests.fixtures.synthetic_atlas import synthetic_rows, write_atlas
from zfatlas_cli.main import main

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "zfatlas_cli"]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_python_dash_m():
    done = cli("--version")
    assert done.returncode == 0 and re.fullmatch(r"zfatlas \d+\.\d+\.\d+.*\n", done.stdout), done
    helped = cli("--help")
    assert helped.returncode == 0 and "feature atlases" in helped.stdout and "examples:" in helped.stdout
    run_help = cli("run", "--help")
    assert "(default: 0)" in run_help.stdout or "default: stop at once" in run_help.stdout
    assert "zfatlas run examples/atlas-small.yaml" in run_help.stdout


def test_usage_errors_read_like_every_other_failure():
    done = cli("runs", "list", "--since")
    assert done.returncode == 2 and done.stderr.startswith("zfatlas: ") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_every_option_has_help():
    from zfatlas_cli.main import _subparsers, build_parser

    parser = build_parser()
    for child in [parser, *_subparsers(parser)]:
        for action in child._actions:
            if action.help is None and not action.__class__.__name__.startswith("_SubParsers"):
                pytest.fail(f"{child.prog}: {action.dest} has no help")


@pytest.mark.ray
def test_a_quiet_run_prints_its_location_and_nothing_else_and_json_parses(ray_cluster, tmp_path):
    spec = {
        "kind": "atlas", "name": "quiet", "model": {"arch": "zfnet-small"},
        "dataset": {"format": "procedural", "num_images": 24, "seed": 5},
        "layers": ["conv1"], "k": 2, "shard_size": 24, "output": str(tmp_path / "store"),
        "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8},
    }
    path = tmp_path / "quiet.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {"RAY_ADDRESS": ray_cluster.address}
    done = cli("run", str(path), "--quiet", env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [location] = done.stdout.splitlines()
    assert Path(location).is_dir() and location.startswith(str(tmp_path / "store" / "atlas"))
    # Quiet: no log records with timestamps, nothing Ray says about itself, no ANSI escapes.
    for stream in (done.stdout, done.stderr):
        assert not TIMESTAMP.search(stream), stream
        assert "Ray" not in stream and "Uploading" not in stream and "\x1b" not in stream, stream
    again = cli("run", str(path), "--json", env=env, timeout=600)  # committed: nothing is run
    doc = json.loads(again.stdout)
    assert again.returncode == 0 and doc["uri"] == location and doc["kind"] == "atlas"
    assert doc["layers"] == ["conv1"] and doc["images"] == 24


@pytest.fixture
def atlas_store(tmp_path) -> Path:
    root = tmp_path / "store"
    write_atlas(open_store(str(root)), "one", synthetic_rows("one", {"conv1": 3}, k=2, seed=1), k=2,
                images=False)
    return root


def test_store_defaults_from_the_environment_and_json_outputs(atlas_store, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./artifacts here: only the variable can find the store
    monkeypatch.setenv("ZFATLAS_STORE", str(atlas_store))
    code, out, err = run_main(capsys, "runs", "list", "--json")
    assert code == 0, err
    [run] = [json.loads(line) for line in out.splitlines()]
    assert run["run_id"] == "one" and run["layers"] == ["conv1"]
    code, out, _ = run_main(capsys, "runs", "list")
    assert code == 0 and out.splitlines()[1].split()[-1] == "conv1"  # layers comma-joined, no list
    code, out, _ = run_main(capsys, "atlas", "show", "one", "--layer", "conv1", "--channel", "1", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["rank"] for r in rows] == [0, 1] and {r["channel"] for r in rows} == {1}
    monkeypatch.delenv("ZFATLAS_STORE")
    monkeypatch.setenv("ZFATLAS_API_STORE", str(atlas_store))  # the server's variable is the fallback
    code, out, _ = run_main(capsys, "runs", "list", "--json")
    assert code == 0 and json.loads(out)["run_id"] == "one"
    monkeypatch.delenv("ZFATLAS_API_STORE")
    code, _, err = run_main(capsys, "runs", "list")
    assert code == 2 and "artifacts" in err  # ./artifacts is not there: said, not an empty list


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_honours_the_api_environment(atlas_store):
    port = _free_port()
    env = {**os.environ, "ZFATLAS_API_STORE": str(atlas_store), "ZFATLAS_API_HOST": "127.0.0.1",
           "ZFATLAS_API_PORT": str(port)}
    env.pop("ZFATLAS_STORE", None)
    server = subprocess.Popen([*CLI, "serve"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                runs = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=2).raise_for_status().json()
                break
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "zfatlas serve did not answer on ZFATLAS_API_PORT"
                time.sleep(0.3)
        assert [r["run_id"] for r in runs["items"]] == ["one"]
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)


def test_submit_of_a_committed_run_submits_nothing(atlas_store, tmp_path):
    spec = {"kind": "atlas", "name": "committed", "run_id": "one", "model": {"arch": "zfnet-small"},
            "dataset": {"format": "procedural", "num_images": 8}, "layers": ["conv1"], "k": 2,
            "output": str(atlas_store)}
    path = tmp_path / "committed.yaml"
    path.write_text(yaml.safe_dump(spec))
    # Nothing listens on this address: reaching for the cluster would fail the command.
    done = cli("submit", str(path), "--address", f"http://127.0.0.1:{_free_port()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(atlas_store / "atlas" / "one")
    assert "already committed: nothing submitted" in done.stderr


@pytest.mark.ray
def test_jobs_status_is_one_line(ray_cluster):
    from jobs.submission.ray_jobs import jobs_client

    client = jobs_client(ray_cluster.dashboard_url)
    job_id = client.submit_job(entrypoint="python -c 'print(1)'")
    deadline = time.monotonic() + 120
    while client.get_job_status(job_id) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    done = cli("jobs", "status", job_id, "--address", ray_cluster.dashboard_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{job_id} SUCCEEDED\n"


def test_the_readmes_atlas_spec_is_the_example_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"An atlas spec, in full \(`examples/atlas-small.yaml`\):\n\n```yaml\n(.*?)```",
                      readme, re.S)
    assert block is not None, "the README lost its 'An atlas spec, in full' block"
    assert block.group(1) == (ROOT / "examples" / "atlas-small.yaml").read_text(encoding="utf-8")
