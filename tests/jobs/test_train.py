"""The train job on the session's two-node loopback Ray cluster (3 fake GPUs): data-parallel
training into S3, the checkpoint used by the atlas job, and resuming after worker and job deaths."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from ray.util.state import list_actors

from jobs.kinds import parse_spec
from jobs.networks import load_model
from jobs.runner import run_spec
from jobs.specs.loading import spec_run_id
from jobs.store import Store, committed_runs, open_store
from jobs.train.checkpoints import LATEST
from jobs.train.data import split_indices
from jobs.train.evolution import EVOLUTION_SCHEMA
from jobs.train.metrics import LAYERS_SCHEMA, METRICS_SCHEMA
from zfcore.data import ProceduralDataset, to_tensor
from zfcore.training import evaluate

pytestmark = pytest.mark.ray

IMAGES = 400  # 360 to train on: 180 per worker, 6 steps of 32 per epoch


def train_spec(output: str, name: str, **fields: Any):
    return parse_spec({
        "kind": "train", "name": name, "seed": 0, "output": output,
        "model": {"arch": "zfnet-small"},
        "dataset": {"format": "procedural", "num_images": IMAGES, "seed": 0},
        # No augmentation and a high rate: the loss visibly drops within a few steps.
        "lr": 0.05, "augment": False, "evolution_epochs": [1, 3], "evolution_channels": 2, "probe_images": 16,
        "resources": {"workers": 2, "batch_size": 32},
        **fields,
    })


def table(store: Store, key: str):
    return pq.read_table(io.BytesIO(store.get_bytes(key)))


def train_loss(checkpoint: str | None, endpoint: str | None = None) -> float:
    """Loss of a checkpoint (None: the seeded initial weights) on the run's training images."""
    spec = parse_spec({"kind": "train", "name": "x", "model": {"checkpoint": checkpoint}})
    model, _ = load_model(spec.model, seed=0, endpoint_url=endpoint)
    train = split_indices(IMAGES, 0.1, 1, seed=0).train
    images, labels = ProceduralDataset(IMAGES, 64, seed=0).batch(train.tolist())
    return evaluate(model, to_tensor(images), torch.from_numpy(labels))["loss"]


def kill_a_worker_after(cluster, store: Store, run_prefix: str, epoch: int, timeout: float = 120) -> int:
    """SIGKILL one training worker as soon as the run's latest checkpoint is at ``epoch`` or later
    (any worker: one death fails the whole group). Returns its pid."""
    deadline = time.time() + timeout
    pids: list[int] = []
    while time.time() < deadline:
        if not pids:  # looked up while training runs, so the kill follows the checkpoint at once
            alive = list_actors(address=cluster.dashboard_url,
                                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            pids = [int(a["pid"]) for a in alive]
        pointer = f"{run_prefix}/{LATEST}"
        if pids and store.exists(pointer) and store.get_json(pointer)["epoch"] >= epoch:
            os.kill(pids[-1], signal.SIGKILL)
            return pids[-1]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} with a live worker within {timeout}s")


def run_in_thread(spec) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["manifest"] = run_spec(spec, quiet=True)
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_two_workers_train_into_s3_and_the_atlas_loads_the_checkpoint(ray_cluster, s3_bucket, s3_endpoint):
    output = f"s3://{s3_bucket}/runs"
    spec = train_spec(output, "e2e", epochs=3, endpoint_url=s3_endpoint)
    manifest = run_spec(spec, quiet=True)
    store = open_store(output, s3_endpoint)
    prefix = f"train/{spec_run_id(spec)}"

    # Two workers, each on its own fake GPU, CPU math over gloo.
    assert manifest["backend"] == "gloo" and len(manifest["workers"]) == 2
    assert all(len(w["gpu_ids"]) == 1 and w["device"] == "cpu" for w in manifest["workers"])
    assert len({(w["node_id"], w["gpu_ids"][0]) for w in manifest["workers"]}) == 2
    assert manifest["steps"] == 3 * manifest["steps_per_epoch"] == 18 and manifest["steps_run"] == 18
    assert manifest["restores"] == [] and manifest["resumed_from_epoch"] == 0

    # Checkpoints in S3, the final one referenced by the manifest.
    assert manifest["checkpoints"] == [f"{prefix}/checkpoints/{n}" for n in ("epoch-0001.pt", "epoch-0002.pt",
                                                                              "final.pt")]
    assert manifest["checkpoint_uri"] == f"{output}/{prefix}/checkpoints/final.pt"
    assert store.exists(manifest["checkpoint"])

    # The loss went down.
    assert train_loss(manifest["checkpoint_uri"], s3_endpoint) < train_loss(None) - 0.01
    metrics = table(store, f"{prefix}/metrics.parquet")
    assert metrics.schema.equals(METRICS_SCHEMA)
    assert metrics.column("epoch").to_pylist() == [1, 2, 3]
    assert metrics.column("step").to_pylist() == [6, 12, 18]
    assert metrics.column("filters_rescaled")[0].as_py() > 0  # He-initialized conv1 starts above 0.1
    assert all(0 <= v <= 1 for v in metrics.column("conv1_at_radius").to_pylist())
    assert all(0 <= v < 0.05 for v in metrics.column("dead_channels").to_pylist())
    assert all(v > 0 for v in metrics.column("images_per_s").to_pylist())
    assert metrics.column("images").to_pylist() == [360] * 3
    assert table(store, f"{prefix}/layers.parquet").schema.equals(LAYERS_SCHEMA)
    evolution = table(store, f"{prefix}/evolution.parquet")
    assert evolution.schema.equals(EVOLUTION_SCHEMA) and evolution.num_rows == 2 * 5 * 2
    assert store.exists(f"{prefix}/evolution/conv1/0000/strip.png")
    assert store.exists(f"{prefix}/evolution/conv5.png")

    # The atlas job loads the final checkpoint straight from S3.
    atlas = run_spec(parse_spec({
        "kind": "atlas", "name": "from-train", "model": {"arch": "zfnet-small",
                                                          "checkpoint": manifest["checkpoint_uri"]},
        "dataset": {"format": "procedural", "num_images": 24, "seed": 1}, "output": output,
        "endpoint_url": s3_endpoint, "layers": ["conv1"], "k": 2,
        "resources": {"workers": 1, "batch_size": 24},
    }), quiet=True)
    assert atlas["model_fingerprint"] == manifest["model_fingerprint"]
    assert atlas["features_rows"] == 2 * 32


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, tmp_path):
    spec = train_spec(str(tmp_path), "fault", epochs=4, max_failures=1, evolution_epochs=[4])
    store = open_store(str(tmp_path))
    thread, out = run_in_thread(spec)
    kill_a_worker_after(ray_cluster, store, f"train/{spec_run_id(spec)}", epoch=1)
    thread.join(timeout=300)
    assert "manifest" in out, out.get("error")
    manifest = out["manifest"]
    assert manifest["worker_restarts"] == 1 and manifest["resumed_from_epoch"] == 0
    restored = manifest["restored_from_epoch"]
    assert 1 <= restored < 4
    # Resumed, not restarted: the steps add up to one run's, and the last group ran only the rest.
    assert manifest["steps"] == 4 * manifest["steps_per_epoch"] == 24
    assert manifest["steps_run"] == (4 - restored) * manifest["steps_per_epoch"]
    metrics = table(store, f"train/{manifest['run_id']}/metrics.parquet")
    assert metrics.column("epoch").to_pylist() == [1, 2, 3, 4]
    assert metrics.column("step").to_pylist() == [6, 12, 18, 24]


def test_rerun_after_a_crash_resumes_instead_of_starting_over(ray_cluster, tmp_path):
    spec = train_spec(str(tmp_path), "crash", epochs=3, max_failures=0, evolution_epochs=[1, 2, 3])
    store = open_store(str(tmp_path))
    prefix = f"train/{spec_run_id(spec)}"
    thread, out = run_in_thread(spec)
    kill_a_worker_after(ray_cluster, store, prefix, epoch=1)
    thread.join(timeout=300)
    assert "error" in out and committed_runs(store) == []  # the job died: nothing committed
    crashed_at = store.get_json(f"{prefix}/{LATEST}")["epoch"]
    assert 1 <= crashed_at < 3

    manifest = run_spec(spec, quiet=True)
    assert manifest["resumed_from_epoch"] == crashed_at == manifest["restored_from_epoch"]
    assert manifest["steps"] == 18 and manifest["steps_run"] == (3 - crashed_at) * 6
    metrics = table(store, f"{prefix}/metrics.parquet")
    assert metrics.column("epoch").to_pylist() == [1, 2, 3]
    # The strips hold every snapshot epoch, including those taken before the crash.
    evolution = table(store, f"{prefix}/evolution.parquet")
    assert sorted(set(evolution.column("epoch").to_pylist())) == [1, 2, 3]
    assert [r["run_id"] for r in committed_runs(store, "train")] == [spec_run_id(spec)]
