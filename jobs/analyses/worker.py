"""The worker every analysis kind runs on: a Ray actor that loads the spec's model and opens the
dataset once, then runs a kind's plain work functions on its :class:`AnalysisContext`.

A work function is ``fn(context, item) -> dict``, defined in the kind's ``work`` module (no Ray
there); the driver sends ``(fn, item)`` pairs and :func:`jobs.runtime.actors.run_on_actors`
retries an item on another actor when its actor dies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from jobs.datasets import ImageSource, open_dataset
from jobs.networks import load_model, preflight
from jobs.runtime.actors import run_on_actors, started_workers, worker_info
from jobs.runtime.cluster import connect, worker_options
from jobs.runtime.device import pick_device, torch_threads
from jobs.specs.base import SpecBase
from jobs.store import RunWriter
from zfcore.data import to_tensor
from zfcore.network import Network, as_network


class AnalysisContext:
    """What every work function gets: the spec, the run to write into, the model on this worker's
    device, and the dataset."""

    def __init__(self, spec: SpecBase, run: RunWriter, num_cpus: float, dataset: Any = None) -> None:
        torch.set_num_threads(torch_threads(num_cpus))
        self.spec = spec
        self.run = run
        self.device = pick_device()
        self.preprocess = spec.preprocess
        model, self.model_fingerprint = load_model(spec.model, spec.seed, spec.endpoint_url, self.preprocess)
        self.model: nn.Module = model.to(self.device).eval()
        self.network: Network = as_network(self.model)
        self.image_size = spec.image_size
        self.source: ImageSource = open_dataset(dataset or spec.dataset, spec.preprocess, spec.endpoint_url)
        self.class_names = self.source.class_names
        self.num_classes = _num_classes(self.network, self.image_size, self.device)
        self._random_init: nn.Module | None = None

    def tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) images as the network's normalized input on this worker's device."""
        return to_tensor(images, self.preprocess.mean, self.preprocess.std).to(self.device)

    def random_init(self, seed: int) -> nn.Module:
        """An untrained network of the same architecture (the probes' baseline), built once."""
        if self._random_init is None:
            self._random_init = self.network.initialized(seed).to(self.device)
        return self._random_init

    def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """(images uint8, labels, indices, skipped) of the readable images whose label the model
        can score (a true-class probability needs the class among the model's outputs)."""
        batch = self.source.read(list(indices))
        skipped = list(batch.skipped)
        ok = batch.labels < self.num_classes
        for i in np.nonzero(~ok)[0]:
            skipped.append(
                (
                    self.source.image_id(int(batch.indices[i])),
                    f"label {int(batch.labels[i])} is not one of the model's {self.num_classes} classes",
                )
            )
        return batch.images[ok], batch.labels[ok], batch.indices[ok], skipped

    def class_name(self, label: int) -> str:
        return self.class_names[label] if label < len(self.class_names) else str(label)


def _num_classes(network: Network, image_size: int, device: torch.device) -> int:
    """Width of the network's output, from one forward pass of a zero image."""
    probe = torch.zeros(1, network.preprocess.channels, image_size, image_size, device=device)
    with torch.no_grad():
        _, logits = network.features_and_logits(probe, [])
    return int(logits.shape[1])


@ray.remote(max_restarts=0)  # a dead worker is not restarted: its items move to the others
class AnalysisWorker:
    def __init__(self, spec: SpecBase, run: RunWriter, num_cpus: float, dataset: Any = None) -> None:
        self.context = AnalysisContext(spec, run, num_cpus, dataset)

    def info(self) -> dict[str, Any]:
        return {**worker_info(self.context.device), "model_fingerprint": self.context.model_fingerprint}

    def work(self, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        start = time.perf_counter()
        return {**fn(self.context, *args), "seconds": time.perf_counter() - start}


@contextmanager
def analysis_workers(
    spec: SpecBase, run: RunWriter, items: int, dataset: Any = None, layers: Sequence[str] = ()
) -> Iterator[tuple[list[Any], list[dict[str, Any]]]]:
    """Workers for ``items`` work items (no more than there are items, one per GPU on a GPU
    cluster), killed when the block ends; first the driver's checks (:func:`preflight`: the
    checkpoint, and the deconvnet on ``layers``). Yields (actors, their infos)."""
    connect()
    preflight(spec.model, spec.preprocess, layers, spec.endpoint_url)  # before any worker starts
    res = spec.resources
    count, options = worker_options(res.workers, res.gpus_per_worker, res.cpus_per_worker)
    with started_workers(
        AnalysisWorker, max(1, min(count, items)), options, spec, run, options["num_cpus"], dataset
    ) as started:
        yield started


def analyse(
    spec: SpecBase,
    run: RunWriter,
    fn: Callable[..., dict[str, Any]],
    items: Sequence[Any],
    on_result: Callable[[Any, dict[str, Any]], None],
    layers: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], float]:
    """Run ``fn(context, item)`` for every item on analysis workers, handing each result to
    ``on_result(item, result)``. Returns (the workers' infos, seconds the work took). ``layers``:
    those the work projects with the deconvnet (checked first)."""
    with analysis_workers(spec, run, len(items), layers=layers) as (actors, workers):
        start = time.perf_counter()
        run_on_actors(actors, lambda a, item: a.work.remote(fn, item), items, on_result)
        return workers, time.perf_counter() - start
