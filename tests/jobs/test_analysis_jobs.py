"""The four analysis kinds end to end: each from its example spec through ``zfatlas run`` on a local
Ray, checked against zfcore run directly and for the science; one on the loopback cluster (fake
GPUs) writing to S3; bad specs exit 2."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from jobs.analyses.correspondence.tables import CORRESPONDENCE_SCHEMA
from jobs.analyses.invariance.tables import INVARIANCE_DISTANCES_SCHEMA, INVARIANCE_PROBABILITIES_SCHEMA
from jobs.analyses.occlusion.tables import OCCLUSION_IMAGES_SCHEMA, OCCLUSION_POSITIONS_SCHEMA
from jobs.analyses.occlusion.work import fill_value
from jobs.analyses.probe.tables import PROBE_SCORES_SCHEMA, PROBE_TABLE_SCHEMA
from jobs.store import Store, committed_runs, open_store
from zfatlas_cli.main import main
from zfcore.analyses.correspondence import correspondence
from zfcore.analyses.occlusion import occlusion_sensitivity
from zfcore.data import ProceduralDataset, to_tensor

pytestmark = pytest.mark.ray

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def local_ray():
    """A local 2-CPU Ray on loopback, unless this session already has a Ray (then that one)."""
    if ray.is_initialized():
        yield
        return
    # address="local": a new instance even when another Ray on this machine left ray_current_cluster.
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        # Only the Ray started here: a session cluster started meanwhile stays up for its users.
        if ray.is_initialized() and ray.get_runtime_context().gcs_address == ctx.address_info["gcs_address"]:
            ray.shutdown()


def run_example(kind: str, checkpoint: str, out: Path, *overrides: str) -> tuple[dict, Store, str]:
    """``zfatlas run examples/<kind>-small.yaml`` into ``out``; returns (manifest, store, run prefix)."""
    sets = [f"model.checkpoint={checkpoint}", *overrides]
    argv = ["run", str(EXAMPLES / f"{kind}-small.yaml"), "--quiet", "--output", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    store = open_store(str(out))
    (manifest,) = committed_runs(store, kind)
    return manifest, store, f"{kind}/{manifest['run_id']}"


def read_table(store: Store, key: str):
    return pq.read_table(io.BytesIO(store.get_bytes(key)))


def png(store: Store, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.get_bytes(key))))


def test_occlusion_job(local_ray, trained_small, tmp_path):
    model, _, checkpoint = trained_small
    manifest, store, prefix = run_example("occlusion", checkpoint, tmp_path)
    positions = read_table(store, f"{prefix}/positions.parquet")
    images = read_table(store, f"{prefix}/images.parquet")
    assert positions.schema.equals(OCCLUSION_POSITIONS_SCHEMA)
    assert images.schema.equals(OCCLUSION_IMAGES_SCHEMA)
    assert manifest["images_analysed"] == images.num_rows == 4
    assert positions.num_rows == 4 * 13 * 13 == 4 * manifest["positions_per_image"]

    # The job's numbers are zfcore's, for the spec's grey square.
    data = ProceduralDataset(200, 64, seed=1)
    sample = data[2]
    direct = occlusion_sensitivity(model, to_tensor(sample.image)[0], sample.label, layer="conv5", size=16,
                                   stride=4, fill=fill_value("grey"))
    rows = [r for r in positions.to_pylist() if r["image_index"] == 2]
    got = np.array([r["true_prob"] for r in sorted(rows, key=lambda r: (r["row"], r["col"]))])
    np.testing.assert_allclose(got, direct.true_prob.numpy().ravel(), rtol=1e-5, atol=1e-6)
    assert {r["channel"] for r in rows} == {direct.channel}

    # Fig. 7's point, on the job's own summary columns.
    table = images.to_pylist()
    assert all(r["label"] == data.label(r["image_index"]) for r in table)
    on_object = np.mean([r["object_true_prob"] for r in table])
    assert on_object < np.mean([r["background_true_prob"] for r in table])
    means = manifest["mean_true_prob"]
    assert means["object_occluded"] < means["background_occluded"] - 0.05

    first = table[0]
    assert png(store, first["figure_key"]).shape[1] > 1000  # five panels
    assert png(store, first["activation_overlay_key"]).shape == (256, 256, 3)
    assert png(store, first["projection_key"]).shape == (256, 256, 3)


def test_invariance_job(local_ray, trained_small, tmp_path):
    manifest, store, prefix = run_example("invariance", trained_small[2], tmp_path)
    dist = read_table(store, f"{prefix}/distances.parquet")
    prob = read_table(store, f"{prefix}/probabilities.parquet")
    assert dist.schema.equals(INVARIANCE_DISTANCES_SCHEMA)
    assert prob.schema.equals(INVARIANCE_PROBABILITIES_SCHEMA)
    values = {"translate": 9, "scale": 5, "rotate": 8}  # the example's sweeps
    assert prob.num_rows == 3 * sum(values.values()) and dist.num_rows == 2 * prob.num_rows
    assert manifest["transforms"] == list(values) and set(manifest["plots"]) == set(values)

    rows = dist.to_pylist()
    unchanged = {("translate", 0), ("scale", 1), ("rotate", 0)}
    identity = [r for r in rows if (r["transform"], r["value"]) in unchanged]
    assert len(identity) == 3 * 3 * 2 and all(r["relative_distance"] < 1e-5 for r in identity)

    def mean_relative(layer: str) -> float:
        return float(np.mean([r["relative_distance"] for r in rows if r["layer"] == layer
                              and r["transform"] == "translate" and 0 < abs(r["value"]) <= 8]))

    assert mean_relative("conv1") > 2 * mean_relative("fc7")  # Fig. 5: deeper is more invariant
    for kind in values:
        assert png(store, manifest["plots"][kind]).shape[0] > 200


def test_correspondence_job(local_ray, trained_small, tmp_path):
    model, _, checkpoint = trained_small
    manifest, store, prefix = run_example("correspondence", checkpoint, tmp_path)
    table = read_table(store, f"{prefix}/correspondence.parquet")
    assert table.schema.equals(CORRESPONDENCE_SCHEMA)
    rows = table.to_pylist()
    assert [(r["part"], r["layer"]) for r in rows] == [
        (p, layer) for p in ("top-left", "centre", "random") for layer in ("conv5", "fc7")
    ]
    assert all(0 <= r["delta_mean"] <= 1 and r["pairs"] == (3 if not r["random"] else 15) for r in rows)
    assert set(manifest["table1"]) == {"top-left", "centre", "random"}
    assert " ± " in manifest["table1"]["centre"]["conv5"]

    data = ProceduralDataset(200, 64, seed=1)
    images = to_tensor(np.stack([data[i].image for i in range(3)]))
    direct = correspondence(model, images, torch.tensor([[24, 24, 16, 16]] * 3))
    centre = {r["layer"]: r for r in rows if r["part"] == "centre"}
    for layer, d in direct.items():
        assert centre[layer]["delta_mean"] == pytest.approx(d.mean, abs=1e-9)
        assert centre[layer]["delta_std"] == pytest.approx(d.std, abs=1e-9)
    assert png(store, rows[0]["preview_key"]).shape[1] > 3 * 64


def test_probe_job(local_ray, trained_small, tmp_path):
    manifest, store, prefix = run_example("probe", trained_small[2], tmp_path, "layers=[conv2,conv5,fc7]")
    scores = read_table(store, f"{prefix}/scores.parquet")
    table = read_table(store, f"{prefix}/table7.parquet")
    assert scores.schema.equals(PROBE_SCORES_SCHEMA) and table.schema.equals(PROBE_TABLE_SCHEMA)
    # 2 networks x 2 classifiers x 3 layers x 2 training sizes x 2 folds.
    assert scores.num_rows == 48 and table.num_rows == 24
    acc = {(r["network"], r["classifier"], r["layer"], r["train_per_class"]): r for r in table.to_pylist()}
    for clf in ("softmax", "svm"):
        trained, baseline = acc["trained", clf, "fc7", 10], acc["random_init", clf, "fc7", 10]
        assert trained["accuracy_mean"] > baseline["accuracy_mean"] + 0.3  # Tables 4/5: pretrained wins
        shallow = acc["trained", clf, "conv2", 10]
        assert trained["accuracy_mean"] > shallow["accuracy_mean"]  # rises with depth
        assert trained["paper_caltech101"] == pytest.approx({"softmax": 0.854, "svm": 0.855}[clf])
        assert baseline["paper_caltech101"] is None
    assert manifest["feature_dims"] == {"conv2": 2304, "conv5": 576, "fc7": 256}
    assert set(manifest["table7"]) == {f"{n}/{c}/{k}" for n in ("trained", "random_init")
                                       for c in ("softmax", "svm") for k in (5, 10)}
    assert png(store, manifest["plots"]["probe"]).shape[0] > 200


def test_occlusion_on_the_loopback_cluster_one_worker_per_gpu_into_s3(ray_cluster, s3_bucket, s3_endpoint):
    # Distribution and storage only (the science is checked above): the example's untrained model.
    output = f"s3://{s3_bucket}/runs"
    argv = ["run", str(EXAMPLES / "occlusion-small.yaml"), "--quiet", "--output", output]
    for s in ("images=6", "stride=8", "resources.workers=8", f"endpoint_url={s3_endpoint}"):
        argv += ["--set", s]
    assert main(argv) == 0  # zfatlas run uses the session's cluster, already connected
    (manifest,) = committed_runs(open_store(output, s3_endpoint), "occlusion")
    workers = manifest["workers"]
    assert len(workers) == ray_cluster.gpus == 3  # capped at one per GPU, not the 8 asked for
    assert len({(w["node_id"], tuple(w["gpu_ids"])) for w in workers}) == 3
    assert all(len(w["gpu_ids"]) == 1 for w in workers)
    store = open_store(f"s3://{s3_bucket}/runs", s3_endpoint)
    images = read_table(store, f"occlusion/{manifest['run_id']}/images.parquet")
    assert images.column("image_index").to_pylist() == list(range(6))
    assert store.exists(images.column("figure_key")[0].as_py())


@pytest.mark.parametrize(
    ("kind", "override", "message"),
    [
        ("occlusion", "patch=100", "patch: 100 is larger than the 64px images"),
        ("invariance", "translations=[0,64]", "translations.1:"),
        ("correspondence", "parts.centre=[[24,24,16,16]]", "centre: 1 boxes for 3 images"),
        ("probe", "layers=[conv9]", "layers.0: unknown layer 'conv9'"),
        # Only the dataset can tell: checked by the runner before any worker starts.
        ("correspondence", "images=[proc-00000000,proc-00000001,nope]", "images.2: no image 'nope'"),
    ],
)
def test_bad_specs_exit_2(kind, override, message, tmp_path, capsys):
    if kind == "correspondence" and override.startswith("images="):
        override = [override, "parts={}"]
    overrides = override if isinstance(override, list) else [override]
    argv = ["run", str(EXAMPLES / f"{kind}-small.yaml"), "--quiet", "--output", str(tmp_path)]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not committed_runs(open_store(str(tmp_path)))
