"""The train job: a network trained data-parallel with Ray Train, checkpoints and tables in the run.

The driver decides the shape of the job (workers, GPUs, backend), hands
:func:`jobs.train.worker.train_loop` to a ``TorchTrainer`` and turns rank 0's summary into the
manifest. Everything a worker does is plain PyTorch in :mod:`jobs.train.worker`.

Faults: ``FailureConfig(max_failures)`` restarts the worker group when a worker dies, and the new
group resumes from the run's latest checkpoint. Running the same spec again after the job itself
died resumes the same way: the runner keeps an uncommitted train run's files (the train kind is
``resumable``, :mod:`jobs.train.kind`) and this job uses the checkpoints if the same spec wrote
them, else starts the run over.

Run layout (see docs/schemas.md, "Training tables")::

    checkpoints/epoch-NNNN.pt, checkpoints/final.pt, checkpoints/latest.json
    metrics.parquet, layers.parquet, evolution.parquet
    evolution/<layer>/<channel>/epoch-NNNN.png, .../strip.png, evolution/<layer>.png
"""

from __future__ import annotations

import functools
import logging
import tempfile
import threading
import time
import uuid
from typing import Any

import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tqdm import tqdm

from jobs.datasets import open_dataset
from jobs.networks import preflight
from jobs.runtime.cluster import check_fits, cluster_gpus, connect
from jobs.store import RunWriter, StoreError
from jobs.train.checkpoints import latest_checkpoint, spec_digest
from jobs.train.spec import TrainSpec
from jobs.train.worker import PROGRESS, train_loop

log = logging.getLogger(__name__)


@ray.remote(max_retries=0)
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def worker_resources(spec: TrainSpec) -> tuple[int, bool, dict[str, float]]:
    """(workers, use_gpu, resources per worker). On a cluster with GPUs each worker is pinned to
    ``gpus_per_worker`` of them, and no more workers start than the GPUs can hold."""
    res = spec.resources
    gpus = cluster_gpus()
    if gpus > 0 and res.gpus_per_worker > 0:
        fit = max(1, int(gpus / res.gpus_per_worker + 1e-9))
        if res.workers > fit:
            log.warning("%d workers asked for but the cluster's %g GPUs hold %d; using %d",
                        res.workers, gpus, fit, fit)
        return min(res.workers, fit), True, {"GPU": res.gpus_per_worker, "CPU": res.cpus_per_worker}
    return res.workers, False, {"CPU": res.cpus_per_worker}


def backend_for(use_gpu: bool, resources: dict[str, float]) -> str:
    """NCCL when the workers' GPUs are real CUDA devices, gloo otherwise (CPU workers, and
    clusters whose GPUs are only declared, like the test cluster's)."""
    if not use_gpu:
        return "gloo"
    cluster = ray.get_runtime_context().gcs_address
    return "nccl" if _gpu_workers_have_cuda(cluster, resources["GPU"], resources["CPU"]) else "gloo"


@functools.lru_cache(maxsize=16)
def _gpu_workers_have_cuda(cluster: str, gpus: float, cpus: float) -> bool:
    # Asked of a task scheduled like a worker, since the driver may run on a node without GPUs;
    # once per cluster and shape (a driver that trains several times asks once).
    return ray.get(_cuda_available.options(num_gpus=gpus, num_cpus=cpus).remote())


class EpochProgress:
    """A progress bar of finished epochs with its ETA, from the ``progress.json`` rank 0 writes
    after each; :meth:`poll` reads it (cheap: one small object)."""

    def __init__(self, run: RunWriter, epochs: int, first: int) -> None:
        self.run = run
        self.seen = first
        self.bar = tqdm(total=epochs, initial=first, unit="epoch", desc="train", dynamic_ncols=True)
        self.bar.set_postfix_str("starting the workers" if first == 0 else f"resumed after epoch {first}")

    def poll(self) -> None:
        try:
            progress = self.run.store.get_json(self.run.key(PROGRESS))
        except (StoreError, ValueError):  # not written yet, or a transient read error
            return
        if progress["epoch"] > self.seen:
            self.bar.update(progress["epoch"] - self.seen)
            self.seen = progress["epoch"]
            val = progress.get("val_top1_error")
            self.bar.set_postfix(loss=f"{progress['train_loss']:.3f}",
                                 val_err="-" if val is None else f"{val:.3f}",
                                 img_s=f"{progress['images_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()


def _fit(trainer: TorchTrainer, run: RunWriter, epochs: int, first: int, quiet: bool) -> dict[str, Any]:
    """``trainer.fit()``, with the progress bar unless ``quiet``; rank 0's summary.

    fit runs in a thread of its own while this one follows the progress, so that Ctrl-C reaches
    the caller as KeyboardInterrupt: called on the main thread, Ray Train 2.60 installs a SIGINT
    handler that aborts the run and exits the process with status 0 (and stays installed after
    fit). Interrupted, the run unwinds like any failed one (the runner keeps a training run's
    checkpoints, which the next run of the spec resumes from); the Ray Train workers end with the
    driver process.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="zfatlas-train-fit", daemon=True)
    progress = None if quiet else EpochProgress(run, epochs, first)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=2.0)
            if progress is not None:
                progress.poll()
    finally:
        if progress is not None:
            progress.close()
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["result"].return_value
    if not summary:
        raise RuntimeError("training finished without a summary from rank 0")
    return summary


def train(spec: TrainSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    """Train into ``run`` (committed by the caller); returns the manifest fields."""
    t0 = time.perf_counter()
    store = run.store
    connect()
    source = open_dataset(spec.dataset, spec.preprocess, spec.endpoint_url)
    num_classes = spec.model.num_classes or len(source.class_names)
    if num_classes < len(source.class_names):
        raise ValueError(f"model.num_classes is {num_classes} but the dataset has "
                         f"{len(source.class_names)} classes")
    # Before any worker starts: a checkpoint to start from fits, and the feature-evolution
    # snapshots (deconvnet projections of the conv layers) can be made.
    model = spec.model.model_copy(update={"num_classes": num_classes})
    preflight(model, spec.preprocess, model.config.spatial_layers, spec.endpoint_url)

    digest = spec_digest(spec)
    resumed = latest_checkpoint(run, digest)
    if resumed is None and store.list_keys(run.prefix + "/"):
        log.info("starting %s over: its leftovers hold no checkpoint of this spec", run.uri)
        store.delete_prefix(run.prefix + "/")
    elif resumed is not None:
        log.info("resuming %s from %s (epoch %d)", run.uri, resumed["key"], resumed["epoch"])

    workers, use_gpu, resources = worker_resources(spec)
    check_fits(resources["CPU"], resources.get("GPU", 0))  # else Ray Train waits for it forever
    backend = backend_for(use_gpu, resources)
    invocation = uuid.uuid4().hex[:12]
    log.info("training %s: %d workers (%s, %s), %d epochs", run.run_id, workers,
             "GPU" if use_gpu else "CPU", backend, spec.epochs)
    t_fit = time.perf_counter()
    # Ray Train's own run state goes to a scratch folder on the driver: checkpoints go to the store.
    with tempfile.TemporaryDirectory(prefix="zfatlas-ray-train-") as ray_storage:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"spec": spec, "run": run, "num_classes": num_classes, "digest": digest,
                               "invocation": invocation},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend=backend),
            run_config=RunConfig(
                name=f"{run.run_id}-{invocation}",
                storage_path=ray_storage,
                failure_config=FailureConfig(max_failures=spec.max_failures),
            ),
        )
        summary = _fit(trainer, run, spec.epochs, resumed["epoch"] if resumed else 0, quiet)
    fit_s = time.perf_counter() - t_fit

    final = latest_checkpoint(run, digest)
    restores = summary["restores"]
    last = summary["metrics"][-1] if summary["metrics"] else {}
    epoch_s = sum(m["epoch_s"] for m in summary["metrics"])
    images = sum(m["images"] for m in summary["metrics"])
    return {
        "name": spec.name,
        "model_fingerprint": final["sha256"],
        "dataset_fingerprint": source.fingerprint(),
        "images_total": len(source),
        "images_skipped": len(summary["skipped"]),
        "skipped": [{"image_id": i, "reason": r} for i, r in sorted(set(summary["skipped"]))[:1000]],
        "num_classes": num_classes,
        "checkpoint": run.key(final["key"]),
        "checkpoint_uri": store.uri_of(run.key(final["key"])),
        "checkpoints": [k for k in store.list_keys(f"{run.prefix}/checkpoints/") if k.endswith(".pt")],
        "epochs": spec.epochs,
        "steps": summary["steps"],
        "steps_per_epoch": summary["steps_per_epoch"],
        "steps_run": summary["steps_run"],
        "resumed_from_epoch": resumed["epoch"] if resumed else 0,
        "restored_from_epoch": restores[-1]["epoch"] if restores else 0,
        "restores": restores,
        # Worker-group restarts in this invocation that resumed from a checkpoint.
        "worker_restarts": max(0, sum(r["invocation"] == invocation for r in restores) - bool(resumed)),
        "workers": summary["workers"],
        "backend": backend,
        "precision": spec.precision,
        "final": {k: last.get(k) for k in ("train_loss", "train_top1_error", "train_top5_error",
                                            "val_loss", "val_top1_error", "val_top5_error")},
        "throughput_images_per_s": images / epoch_s if epoch_s > 0 else None,
        "tables": summary["tables"],
        "evolution": summary["evolution"],
        "timings": {"fit_s": fit_s, "train_s": epoch_s, "total_s": time.perf_counter() - t0},
    }
