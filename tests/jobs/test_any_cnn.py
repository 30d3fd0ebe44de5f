"""Every job kind on networks that are not ZFNet: torchvision's ResNet-18 trained and atlased from
the examples on the loopback cluster (S3 in between), a diff of two ResNet atlases, each analysis
on the ResNet, a user's own model shipped with ``zfatlas submit --py-module``, and the bad inputs
that must fail in one line before any worker starts."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs.kinds import load_spec
from jobs.results.diff import diff_atlases
from jobs.results.query import AtlasReader
from jobs.runner import run_spec
from jobs.store import open_store, read_manifest
from jobs.submission.ray_jobs import job_info, jobs_client
from tests.fixtures.atlases import RESNET_LAYERS
from tests.jobs.test_submit import zfatlas
from zfcore import architectures

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
USERNET = ROOT / "tests" / "fixtures" / "usernet_pkg" / "usernet"


def test_resnet_trains_from_its_example_into_s3_and_atlases_from_the_checkpoint(resnet_runs, s3_endpoint):
    train = resnet_runs.train
    assert train["spec"]["model"]["arch"] == "torchvision:resnet18" and train["epochs"] == 2
    assert train["checkpoint_uri"].startswith("s3://") and len(train["checkpoints"]) == 2
    assert train["num_classes"] == 10
    store = open_store(resnet_runs.store)
    reader = AtlasReader(store, resnet_runs.final)
    manifest = reader.manifest
    assert (
        manifest["layers"] == RESNET_LAYERS
        and manifest["model_fingerprint"]
        != read_manifest(store, "atlas", resnet_runs.early)["model_fingerprint"]
    )
    # Through the graph path: every ReLU rectified, nothing passed through by its gradient.
    assert {v["method"] for v in manifest["deconvnet"].values()} == {"graph"}
    assert all(v["relus_rectified"] > 0 and not v["gradient_through"] for v in manifest["deconvnet"].values())
    channels = {info.name: info.channels for info in reader.layers()}
    assert channels == {"layer1": 64, "layer4": 512}
    arch = architectures.get("torchvision:resnet18").at(64)
    rows = reader.channel("layer4", 7).to_pylist()
    assert len(rows) == 4 and [r["rank"] for r in rows] == list(range(4))
    info = arch.layer("layer4")
    assert all(0 <= r["y"] < info.height and 0 <= r["x"] < info.width for r in rows)
    assert all(r["box_height"] > 1 and r["box_top"] + r["box_height"] <= 64 for r in rows)
    raw = reader.projections("layer4", 7).to_pylist()
    assert len(raw) == 4 and max(abs(v) for v in raw[0]["values"]) > 0
    assert reader.png("layer4", 7, "projection_grid")[:4] == b"\x89PNG"
    assert store.exists(reader.layer("layer4").summary_key)


def test_a_diff_of_two_resnet_atlases(resnet_runs):
    store = open_store(resnet_runs.store)
    diff = diff_atlases(AtlasReader(store, resnet_runs.early), AtlasReader(store, resnet_runs.final))
    table = diff.table
    assert set(table.column("layer").to_pylist()) == set(RESNET_LAYERS)
    assert table.num_rows == 64 + 512
    shared = np.array(table.column("shared_topk").to_pylist())
    assert shared.min() >= 0 and shared.max() <= 4 and shared.mean() < 4  # training moved something


@pytest.mark.parametrize(
    ("example", "overrides"),
    [
        ("occlusion-small.yaml", ["layer=layer3", "images=2", "patch=16", "stride=16"]),
        (
            "invariance-small.yaml",
            [
                "layers=[layer2,avgpool]",
                "images=2",
                "scales=[0.8,1.0]",
                "rotations=[0,90]",
                "translations=[0,8]",
            ],
        ),
        ("correspondence-small.yaml", ["layers=[layer4,avgpool]", "random_masks=2"]),
        (
            "probe-small.yaml",
            [
                "layers=[layer2,avgpool]",
                "probe_dataset.num_images=160",
                "folds=1",
                "train_per_class=[5]",
                "classifiers=[softmax]",
                "max_iter=10",
            ],
        ),
    ],
)
def test_each_analysis_runs_on_the_resnet(resnet_runs, s3_endpoint, tmp_path, example, overrides):
    spec = load_spec(
        EXAMPLES / example,
        [
            "model.arch=torchvision:resnet18",
            "model.preprocess.image_size=64",
            f"model.checkpoint={resnet_runs.train['checkpoint_uri']}",
            f"endpoint_url={s3_endpoint}",
            f"output={tmp_path}",
            "resources.workers=2",
            *overrides,
        ],
    )
    manifest = run_spec(spec, quiet=True)
    assert manifest["status"] == "committed" and manifest["spec"]["model"]["arch"] == "torchvision:resnet18"
    for key in manifest["tables"].values():
        table = pq.read_table(
            io.BytesIO(open_store(str(tmp_path)).get_bytes(f"{spec.kind}/{manifest['run_id']}/{key}"))
        )
        assert table.num_rows > 0, key


def test_a_users_own_model_submitted_with_its_package(ray_cluster, tmp_path):
    spec_file, out = tmp_path / "atlas.yaml", tmp_path / "store"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "kind": "atlas",
                "name": "usernet",
                "model": {"arch": "usernet:build", "preprocess": {"image_size": 48}},
                "dataset": {"format": "procedural", "num_images": 60, "seed": 1},
                "layers": ["stem", "block", "head", "gap"],
                "shard_size": 30,
                "resources": {"workers": 2, "batch_size": 30},
            }
        )
    )
    # Without its package the spec does not validate (the factory cannot be imported): nothing submitted.
    refused = zfatlas("submit", str(spec_file), "--address", ray_cluster.dashboard_url)
    assert refused.returncode == 2 and "model.arch: cannot import 'usernet'" in refused.stderr
    submitted = zfatlas(
        "submit",
        str(spec_file),
        "--address",
        ray_cluster.dashboard_url,
        "--output",
        str(out),
        "--py-module",
        str(USERNET),
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    client = jobs_client(ray_cluster.dashboard_url)
    deadline = time.monotonic() + 240
    while not (job := job_info(client, job_id)).finished:
        assert time.monotonic() < deadline
        time.sleep(2)
    assert job.status == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    manifest = read_manifest(open_store(str(out)), "atlas", job.run_id)
    # Down from gap: the in-place ReLU, the same module again, then a functional relu.
    assert [manifest["deconvnet"][n]["relus_rectified"] for n in ("stem", "block", "gap")] == [0, 1, 3]
    reader = AtlasReader(open_store(str(out)), job.run_id)
    assert {i.name: i.channels for i in reader.layers()} == {"stem": 16, "block": 16, "head": 32, "gap": 32}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env_path = str(USERNET.parent)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {env_path!r}); "
            "from zfatlas_cli.main import main; sys.exit(main(sys.argv[1:]))",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_bad_inputs_fail_in_one_line_before_any_worker_starts(tmp_path):
    # A checkpoint of another architecture: exit 1, naming keys, before workers (none is started:
    # the run's folder holds nothing).
    alexnet = tmp_path / "alexnet.pt"
    torch.save(architectures.get("torchvision:alexnet").build(10).state_dict(), alexnet)
    spec = tmp_path / "a.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "atlas",
                "name": "wrong",
                "model": {
                    "arch": "torchvision:resnet18",
                    "checkpoint": str(alexnet),
                    "preprocess": {"image_size": 64},
                },
                "dataset": {"format": "procedural", "num_images": 20},
                "layers": ["layer1"],
                "output": str(tmp_path / "o"),
            }
        )
    )
    result = _run("run", str(spec))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("zfatlas: ") and "is not a torchvision:resnet18 checkpoint" in lines[-1]
    assert "Traceback" not in result.stderr, result.stderr
    assert "keys are missing (bn1.bias, bn1.running_mean" in lines[-1]
    assert not list((tmp_path / "o").rglob("*.png"))
    # A layer path that does not exist: exit 2 at validation, with the closest real path.
    result = _run("validate", str(spec), "--set", "layers=[layer2.0.conv3]")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "layers.0: unknown layer 'layer2.0.conv3' (did you mean 'layer2.0.conv2'?)"
    )
    # An op the deconvnet cannot invert: exit 1 before workers, naming it.
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "atlas",
                "name": "sign",
                "model": {"arch": "usernet:build_sign", "preprocess": {"image_size": 32}},
                "dataset": {"format": "procedural", "num_images": 20},
                "layers": ["out"],
                "output": str(tmp_path / "o2"),
            }
        )
    )
    result = _run("run", str(spec))
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == "zfatlas: the deconvnet cannot invert sign: it has no gradient"
    )
