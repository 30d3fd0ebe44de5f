"""The loop every Ray Train worker runs: the paper's recipe, data-parallel, resumable.

Each worker builds the same seeded network, reads its own shard (:mod:`jobs.train.data`) and runs
the plain step (:mod:`jobs.train.step`) on a DDP-wrapped network; DDP averages the gradients, so
the workers' weights stay identical. Rank 0 also measures the filters on the probe set, snapshots
the feature evolution, writes checkpoints into the run and, at the end, the tables.

Resume: on every start (the first, a restart by Ray after a worker died, or a re-run of a crashed
spec) the workers load the checkpoint ``checkpoints/latest.json`` points to, with the optimizer,
schedule, counters, history and every rank's RNG state, and carry on from the next epoch. The
store is the one place every node can reach and where the atlas job reads checkpoints, so one
mechanism covers both kinds of resume; Ray is told the metrics (``ray.train.report``), not given
copies of the checkpoints.

The Ray lines are :func:`train_loop` (rank, world size), ``prepare_model`` (DDP) and ``report``.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from jobs.datasets import open_dataset
from jobs.networks import load_model
from jobs.runtime.actors import worker_info
from jobs.runtime.device import memory_format, to_device, torch_threads, tune_convolutions
from jobs.store import RunWriter
from jobs.train.checkpoints import FINAL, epoch_key, latest_checkpoint, load_checkpoint, save_checkpoint
from jobs.train.data import ShardReader, epoch_order, shard, split_indices
from jobs.train.evolution import EVOLUTION_SCHEMA, select_channels, snapshot, write_snapshot, write_strips
from jobs.train.metrics import (
    LAYERS_SCHEMA,
    METRICS_SCHEMA,
    EpochMeter,
    all_reduce,
    filter_summary,
    layer_stats,
    validate,
)
from jobs.train.schedule import make_scheduler, step_schedule
from jobs.train.spec import TrainSpec
from jobs.train.step import TrainStepper, with_precision

log = logging.getLogger(__name__)

PROGRESS = "progress.json"  # rank 0's last finished epoch, for the driver's progress bar


def train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's ``train_loop_per_worker``. Returns the run summary on rank 0, None elsewhere."""
    ctx = ray.train.get_context()
    worker = TrainWorker(
        config["spec"], config["run"], ctx.get_world_rank(), ctx.get_world_size(),
        num_classes=config["num_classes"], digest=config["digest"], invocation=config["invocation"],
    )
    return worker.train()


def gather(obj: Any) -> list[Any]:
    """``obj`` of every worker, by rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


class TrainWorker:
    def __init__(
        self, spec: TrainSpec, run: RunWriter, rank: int, world: int, *,
        num_classes: int, digest: str, invocation: str,
    ) -> None:
        torch.set_num_threads(torch_threads(spec.resources.cpus_per_worker))
        self.spec, self.run, self.rank, self.world = spec, run, rank, world
        self.digest, self.invocation, self.num_classes = digest, invocation, num_classes
        # The GPU Ray assigned this worker; the CPU when CUDA is missing, also on clusters whose GPUs
        # are only declared (the test cluster's).
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        tune_convolutions(self.device)
        self.batch_size = spec.resources.batch_size

        self.source = open_dataset(spec.dataset, spec.preprocess, spec.endpoint_url)
        split = split_indices(len(self.source), spec.val_fraction, spec.probe_images, spec.seed)
        self.train_data = ShardReader(self.source, shard(split.train, rank, world, equal=True))
        if not len(self.train_data):
            raise ValueError(f"{len(split.train)} training images cannot feed {world} workers")
        self.val_data = ShardReader(self.source, shard(split.val, rank, world, equal=False))

        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        model, _ = load_model(spec.model.model_copy(update={"num_classes": num_classes}), spec.seed,
                              spec.endpoint_url, spec.preprocess)
        self.network = model.train().to(self.device, memory_format=memory_format(self.device))
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=spec.lr, momentum=spec.momentum,
                                         weight_decay=spec.weight_decay)
        self.scheduler = make_scheduler(spec, self.optimizer)
        self.state: dict[str, Any] = {
            "epoch": 0, "step": 0, "metrics": [], "layers": [], "evolution": [], "restores": [],
            "checkpoints": [],
        }
        # Per-rank random streams (dropout, crops): different across workers, reproducible.
        torch.manual_seed(_seed(spec.seed, 1, rank))
        self.generator = torch.Generator().manual_seed(_seed(spec.seed, 2, rank))
        self._restore()

        forward = with_precision(self.network, spec.precision, self.device)
        self.eval_forward = forward  # unwrapped: each worker scores its own, unequal share
        ddp = ray.train.torch.prepare_model(forward, move_to_device=self.device)
        self.stepper = TrainStepper(
            self.network, ddp, self.optimizer, self.device, renorm_radius=spec.renorm_radius,
            augment_images=spec.augment, generator=self.generator, preprocess=spec.preprocess,
        )
        self.workers = gather(self._info())
        if rank == 0:
            probe = self.source.read(split.probe)
            self.probe = to_device(probe.images, self.device, spec.preprocess)
            self.probe_ids = [self.source.image_id(int(i)) for i in probe.indices]
            self.probe_indices = [int(i) for i in probe.indices]
            self.channels = select_channels(self.network, spec.evolution_channels)

    def _info(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "hostname": socket.gethostname(), **worker_info(self.device),
            "train_images": len(self.train_data), "val_images": len(self.val_data),
            "cached": self.train_data.cached,
        }

    # --- checkpoints ---

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state(), "augment": self.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore(self) -> None:
        pointer = latest_checkpoint(self.run, self.digest)
        if pointer is None:
            return
        ckpt = load_checkpoint(self.run, pointer["key"])
        self.network.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = ckpt["train_state"]
        rng = ckpt["rng"]
        if rng["world_size"] == self.world:
            mine = rng["ranks"][self.rank]
            torch.set_rng_state(mine["torch"])
            self.generator.set_state(mine["augment"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:  # another number of workers: fresh streams, still a function of (seed, epoch, rank)
            torch.manual_seed(_seed(self.spec.seed, 1, self.rank, self.state["epoch"]))
            self.generator.manual_seed(_seed(self.spec.seed, 2, self.rank, self.state["epoch"]))
        self.state["restores"].append({
            "epoch": int(ckpt["epoch"]), "step": int(ckpt["step"]), "world_size": self.world,
            "invocation": self.invocation, "at": time.time(),
        })
        if self.rank == 0:
            log.info("resumed from %s (epoch %d, step %d)", pointer["key"], ckpt["epoch"], ckpt["step"])

    def _checkpoint(self, relkey: str) -> None:
        rngs = gather(self._rng_state())  # every rank takes part
        if self.rank != 0:
            return
        state = {
            "model": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.state["epoch"],
            "step": self.state["step"],
            "rng": {"world_size": self.world, "ranks": rngs},
            "train_state": self.state,
            "arch": self.spec.model.arch,
            "num_classes": self.num_classes,
            "digest": self.digest,
        }
        pointer = save_checkpoint(self.run, relkey, state, self.digest)
        self.state["checkpoints"].append(pointer)

    # --- training ---

    def train(self) -> dict[str, Any] | None:
        spec = self.spec
        start_step = self.state["step"]
        for epoch in range(self.state["epoch"] + 1, spec.epochs + 1):
            row = self._epoch(epoch)
            self.state["epoch"] = epoch
            if epoch == spec.epochs:
                self._checkpoint(FINAL)
            elif epoch % spec.checkpoint_every_epochs == 0:
                self._checkpoint(epoch_key(epoch))
            ray.train.report({k: v for k, v in row.items() if v is not None})
        skipped = gather(self.train_data.skipped + self.val_data.skipped)
        if self.rank != 0:
            return None
        return self._finish(start_step, [s for part in skipped for s in part])

    def _epoch(self, epoch: int) -> dict[str, Any]:
        spec, device = self.spec, self.device
        lr = self.optimizer.param_groups[0]["lr"]
        meter = EpochMeter()
        t0 = time.perf_counter()
        order = epoch_order(len(self.train_data), spec.seed, epoch, self.rank)
        for images, labels in self.train_data.batches(order, self.batch_size):
            meter.add(self.stepper.step(images, labels))
            self.state["step"] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        (seconds,) = all_reduce([time.perf_counter() - t0], device, op="max")
        totals = meter.totals(device)
        val = validate(self.eval_forward, self.val_data, self.batch_size, device, spec.preprocess)
        step_schedule(self.scheduler, val["val_top1_error"], totals["train_loss"])
        row = {"epoch": epoch, "step": self.state["step"], "lr": lr, **totals, **val, "epoch_s": seconds,
               "images_per_s": totals["images"] / seconds if seconds > 0 else 0.0}
        if self.rank == 0:
            layers = layer_stats(self.network, self.probe, spec.renorm_radius, self.batch_size)
            row.update(filter_summary(layers))
            self.state["layers"].extend({"epoch": epoch, **r} for r in layers)
            if epoch in spec.evolution_epochs:
                items = snapshot(self.network, self.probe, self.probe_ids, self.probe_indices,
                                 self.channels, self.batch_size)
                self.state["evolution"].extend(write_snapshot(self.run, epoch, items))
            self.state["metrics"].append(row)
            self.run.put_json(PROGRESS, {"epochs": spec.epochs, **row})
            log.info("epoch %d/%d: loss %.3f, train top-1 err %.3f, val top-1 err %s, %.0f img/s",
                     epoch, spec.epochs, row["train_loss"], row["train_top1_error"],
                     "-" if val["val_top1_error"] is None else f"{val['val_top1_error']:.3f}",
                     row["images_per_s"])
        return row

    def _finish(self, start_step: int, skipped: list[tuple[str, str]]) -> dict[str, Any]:
        """Rank 0, after the last epoch: the tables, the evolution strips and the run summary."""
        run, state = self.run, self.state
        table = pa.Table.from_pylist
        tables = {
            "metrics": run.write_table("metrics.parquet", table(state["metrics"]), METRICS_SCHEMA),
            "layers": run.write_table("layers.parquet", table(state["layers"]), LAYERS_SCHEMA),
        }
        panels = {}
        if state["evolution"]:
            tables["evolution"] = run.write_table(
                "evolution.parquet", table(state["evolution"]), EVOLUTION_SCHEMA
            )
            panels = write_strips(run, state["evolution"])
        return {
            "steps": state["step"],
            "steps_run": state["step"] - start_step,
            "steps_per_epoch": self.train_data.steps(self.batch_size),
            "epochs_done": state["epoch"],
            "restores": state["restores"],
            "checkpoints": [c["key"] for c in state["checkpoints"]],
            "workers": self.workers,
            "skipped": skipped,
            "metrics": state["metrics"],
            "tables": tables,
            "evolution": {
                "epochs": sorted({r["epoch"] for r in state["evolution"]}),
                "channels": self.channels,
                "panels": panels,
            },
        }
