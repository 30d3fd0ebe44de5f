"""The paper's analyses as jobs: occlusion (Fig. 7), invariance (Fig. 5), correspondence (Table 1)
and transfer probes (Tables 4, 5, 7).

Each kind runs on the same kind of worker: an :class:`AnalysisWorker` actor that loads the model and
opens the dataset once, one per GPU when the cluster has GPUs (else on CPUs), fed work items by
:func:`jobs.cluster.run_on_actors` (an item whose actor dies is retried on another). The science is
in zfcore (occlusion, invariance, correspondence, probe); this module reads images, batches,
draws the pictures and writes the tables. Runners return manifest fields; ``jobs.runner`` commits.

Work items, per kind:

- occlusion: one image (all its square positions go through the model in batches of
  ``resources.batch_size``); the actor writes the image's PNGs and returns its table rows.
- invariance: one sweep (translate, scale, rotate) over all chosen images.
- correspondence: one masked part (or the random-mask baseline) over the chosen images.
- probe: phase 1, feature extraction of a slice of the probe dataset through one network (trained
  or random init); phase 2, all folds and classifiers of one (network, layer), on an actor as
  well (features handed over through the object store), so a GPU does the fitting when present.

Tables are written with the declared ``*_SCHEMA`` below (see docs/schemas.md, "Analyses").
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from jobs.cluster import connect, run_on_actors, torch_threads, worker_options
from jobs.datasets import ImageSource, open_dataset
from jobs.models import load_model
from jobs.plots import (
    bar_figure,
    enlarge,
    heat_overlay,
    image_row,
    invariance_figure,
    line_figure,
    occlusion_figure,
    projection_image,
)
from jobs.spec import (
    CorrespondenceSpec,
    InvarianceSpec,
    OcclusionSpec,
    ProbeSpec,
    SpecBase,
    SpecError,
)
from jobs.store import RunWriter, Store
from zfcore.correspondence import correspondence, mask_boxes, random_boxes, random_correspondence
from zfcore.data import MEAN, STD, to_tensor, to_uint8
from zfcore.invariance import invariance_sweep
from zfcore.model import ZFNet, feature_map_sizes
from zfcore.occlusion import occlusion_sensitivity, pixel_map
from zfcore.probe import extract_features, pooled_grid, probe_layers, random_init

log = logging.getLogger(__name__)

GREY = 0.5  # the occluder's "grey": mid-grey pixels, 128 of 255 (the "mean" fill is MEAN instead)
#: Probe feature vectors are capped at this length: larger conv maps are average-pooled to a grid
#: (zfcore.probe.pooled_grid). The small model's layers all fit; the paper's conv1/conv2 do not.
MAX_PROBE_FEATURES = 32768
PROBE_SLICE = 256  # probe images per feature-extraction work item
RANDOM_PART = "random"  # part name of the random-mask baseline rows
SWEEPS = (("translate", "translations"), ("scale", "scales"), ("rotate", "rotations"))

# --- table schemas (documented in docs/schemas.md, "Analyses") --------------------------------

OCCLUSION_POSITIONS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("col", pa.int32(), nullable=False),
        pa.field("top", pa.int32(), nullable=False),
        pa.field("left", pa.int32(), nullable=False),
        pa.field("size", pa.int32(), nullable=False),
        pa.field("activation", pa.float32(), nullable=False),
        pa.field("true_prob", pa.float32(), nullable=False),
        pa.field("top_class", pa.int32(), nullable=False),
        pa.field("top_prob", pa.float32(), nullable=False),
    ]
)

OCCLUSION_IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("base_activation", pa.float32(), nullable=False),
        pa.field("base_true_prob", pa.float32(), nullable=False),
        pa.field("base_top_class", pa.int32(), nullable=False),
        pa.field("min_true_prob", pa.float32(), nullable=False),
        # Procedural images only (null elsewhere): mean true-class probability over the squares
        # lying wholly on the object's box, and over those wholly off it.
        pa.field("object_true_prob", pa.float32(), nullable=True),
        pa.field("background_true_prob", pa.float32(), nullable=True),
        pa.field("figure_key", pa.string(), nullable=False),
        pa.field("activation_overlay_key", pa.string(), nullable=False),
        pa.field("probability_overlay_key", pa.string(), nullable=False),
        pa.field("projection_key", pa.string(), nullable=False),
    ]
)

INVARIANCE_DISTANCES_SCHEMA = pa.schema(
    [
        pa.field("transform", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("distance", pa.float32(), nullable=False),
        pa.field("relative_distance", pa.float32(), nullable=False),
    ]
)

INVARIANCE_PROBABILITIES_SCHEMA = pa.schema(
    [
        pa.field("transform", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("true_prob", pa.float32(), nullable=False),
        pa.field("top_class", pa.int32(), nullable=False),
    ]
)

CORRESPONDENCE_SCHEMA = pa.schema(
    [
        pa.field("part", pa.string(), nullable=False),
        pa.field("random", pa.bool_(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("delta_mean", pa.float64(), nullable=False),
        pa.field("delta_std", pa.float64(), nullable=False),
        pa.field("pairs", pa.int32(), nullable=False),
        pa.field("images", pa.int32(), nullable=False),
        pa.field("draws", pa.int32(), nullable=False),
        pa.field("preview_key", pa.string(), nullable=False),
    ]
)

PROBE_SCORES_SCHEMA = pa.schema(
    [
        pa.field("network", pa.string(), nullable=False),
        pa.field("classifier", pa.string(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("train_per_class", pa.int32(), nullable=False),
        pa.field("fold", pa.int32(), nullable=False),
        pa.field("accuracy", pa.float64(), nullable=False),
        pa.field("n_train", pa.int32(), nullable=False),
        pa.field("n_test", pa.int32(), nullable=False),
        pa.field("feature_dim", pa.int32(), nullable=False),
    ]
)

PROBE_TABLE_SCHEMA = pa.schema(
    [
        pa.field("network", pa.string(), nullable=False),
        pa.field("classifier", pa.string(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("train_per_class", pa.int32(), nullable=False),
        pa.field("accuracy_mean", pa.float64(), nullable=False),
        pa.field("accuracy_std", pa.float64(), nullable=False),
        pa.field("folds", pa.int32(), nullable=False),
        pa.field("paper_caltech101", pa.float64(), nullable=True),
        pa.field("paper_caltech256", pa.float64(), nullable=True),
    ]
)

#: Table 7 (accuracy %, Caltech-101 at 30 / Caltech-256 at 60 images per class), by (classifier,
#: layer). Shown beside the trained network's rows; the datasets differ, so compare directions.
PAPER_TABLE7: dict[tuple[str, str], tuple[float, float]] = {
    ("svm", "conv1"): (44.8, 24.6),
    ("svm", "conv2"): (66.2, 39.6),
    ("svm", "conv3"): (72.3, 46.0),
    ("svm", "conv4"): (76.6, 51.3),
    ("svm", "conv5"): (86.2, 65.6),
    ("svm", "fc7"): (85.5, 71.7),
    ("softmax", "conv5"): (82.9, 65.7),
    ("softmax", "fc7"): (85.4, 72.6),
}

#: Table 1 (Delta, layer 5 / layer 7: mean, std) for the paper's dog-face parts.
PAPER_TABLE1: dict[str, dict[str, list[float]]] = {
    "right eye": {"layer5": [0.067, 0.007], "layer7": [0.069, 0.015]},
    "left eye": {"layer5": [0.069, 0.007], "layer7": [0.068, 0.013]},
    "nose": {"layer5": [0.079, 0.017], "layer7": [0.069, 0.011]},
    "random": {"layer5": [0.107, 0.017], "layer7": [0.073, 0.014]},
}


def fill_value(fill: str) -> float | tuple[float, ...]:
    """The occluder colour in the model's normalized input space: "mean" is the normalization mean
    (0 there), "grey" mid-grey pixels."""
    if fill == "mean":
        return 0.0
    return tuple((GREY - m) / s for m, s in zip(MEAN, STD, strict=True))


def probe_grids(model: ZFNet, layers: Sequence[str], image_size: int) -> dict[str, int | None]:
    """Per probed conv layer, the pooling grid that keeps its vector at most MAX_PROBE_FEATURES long
    (None: the whole map); fc layers are not pooled."""
    sides = feature_map_sizes(model.config, image_size)
    channels = {s.name: s.out_channels for s in model.config.conv}
    return {
        name: pooled_grid(channels[name], sides[name], MAX_PROBE_FEATURES) if name in channels else None
        for name in layers
    }


def _table(columns: dict[str, list | np.ndarray], schema: pa.Schema) -> pa.Table:
    return pa.table({name: columns[name] for name in schema.names})


def _columns(parts: Sequence[dict[str, np.ndarray | list]], schema: pa.Schema) -> dict[str, np.ndarray]:
    """Concatenate column dicts (one per work item) into one."""
    return {
        name: np.concatenate([np.asarray(p[name]) for p in parts]) if parts else np.array([])
        for name in schema.names
    }


# --- the worker ----------------------------------------------------------------------------------


@ray.remote(max_restarts=0)  # a dead worker is not restarted: its items move to the others
class AnalysisWorker:
    """Loads the spec's model (and for probes the random-init baseline) once and opens the dataset;
    its methods are the work items of the four analysis kinds."""

    def __init__(self, spec: SpecBase, run: RunWriter, num_cpus: float) -> None:
        torch.set_num_threads(torch_threads(num_cpus))
        self.spec = spec
        self.run = run
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, self.model_fingerprint = load_model(spec.model, spec.seed, spec.endpoint_url)
        self.model = model.to(self.device).eval()
        self.image_size = spec.image_size
        dataset = spec.probe_dataset if isinstance(spec, ProbeSpec) else spec.dataset
        self.source: ImageSource = open_dataset(dataset, self.image_size, spec.endpoint_url)
        self.class_names = self.source.class_names
        self.networks = {"trained": self.model}
        if isinstance(spec, ProbeSpec) and spec.include_random_init:
            # seed + 1: an untrained spec model is itself drawn from ``seed``; the baseline is another.
            self.networks["random_init"] = random_init(model, spec.seed + 1).to(self.device)

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
            "device": str(self.device),
            "pid": os.getpid(),
            "actor_id": ctx.get_actor_id(),
            "model_fingerprint": self.model_fingerprint,
        }

    def _read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """(images uint8, labels, indices, skipped) of the readable images whose label the model
        can score (a true-class probability needs the class among the model's outputs)."""
        batch = self.source.read(list(indices))
        skipped = list(batch.skipped)
        ok = batch.labels < self.model.config.num_classes
        for i in np.nonzero(~ok)[0]:
            skipped.append(
                (
                    self.source.image_id(int(batch.indices[i])),
                    f"label {int(batch.labels[i])} is not one of the model's "
                    f"{self.model.config.num_classes} classes",
                )
            )
        return batch.images[ok], batch.labels[ok], batch.indices[ok], skipped

    def _class_name(self, label: int) -> str:
        return self.class_names[label] if label < len(self.class_names) else str(label)

    # --- occlusion ---

    def occlusion(self, index: int) -> dict[str, Any]:
        start = time.perf_counter()
        spec: OcclusionSpec = self.spec  # type: ignore[assignment]
        images, labels, indices, skipped = self._read([index])
        out: dict[str, Any] = {"skipped": skipped, "positions": None, "image": None}
        if not len(indices):
            return out
        label, image_u8 = int(labels[0]), images[0]
        image_id = self.source.image_id(index)
        r = occlusion_sensitivity(
            self.model,
            to_tensor(image_u8)[0].to(self.device),
            label,
            layer=spec.layer,
            size=spec.patch,
            stride=spec.stride,
            fill=fill_value(spec.fill),
            batch_size=spec.resources.batch_size,
        )
        rows, cols = r.activation.shape
        rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        n = rows * cols
        out["positions"] = {
            "image_id": [image_id] * n,
            "image_index": np.full(n, index, np.int64),
            "label": np.full(n, label, np.int32),
            "layer": [spec.layer] * n,
            "channel": np.full(n, r.channel, np.int32),
            "row": rr.ravel().astype(np.int32),
            "col": cc.ravel().astype(np.int32),
            "top": r.tops.numpy()[rr.ravel()].astype(np.int32),
            "left": r.lefts.numpy()[cc.ravel()].astype(np.int32),
            "size": np.full(n, r.size, np.int32),
            "activation": r.activation.numpy().ravel(),
            "true_prob": r.true_prob.numpy().ravel(),
            "top_class": r.top_class.numpy().ravel().astype(np.int32),
            "top_prob": r.top_prob.numpy().ravel(),
        }

        hw = image_u8.shape[:2]
        base = f"images/{index:08d}"
        projection = projection_image(r.projection.numpy())
        keys = {
            "figure_key": self.run.put_png(
                f"{base}/figure.png",
                occlusion_figure(
                    image_u8,
                    r.activation.numpy(),
                    projection,
                    r.true_prob.numpy(),
                    r.top_class.numpy(),
                    self.class_names,
                    layer=spec.layer,
                    channel=r.channel,
                    title=f"{image_id}: {self._class_name(label)}, p = {r.base_true_prob:.3f} unoccluded",
                ),
            ),
            "activation_overlay_key": self.run.put_png(
                f"{base}/activation.png",
                heat_overlay(image_u8, pixel_map(r.activation, r.tops, r.lefts, r.size, hw).numpy()),
            ),
            "probability_overlay_key": self.run.put_png(
                f"{base}/probability.png",
                heat_overlay(
                    image_u8, pixel_map(r.true_prob, r.tops, r.lefts, r.size, hw).numpy(), vmin=0.0, vmax=1.0
                ),
            ),
            "projection_key": self.run.put_png(f"{base}/projection.png", enlarge(projection, 256)),
        }
        on_object, off_object = self._object_split(index, r.tops, r.lefts, r.size)
        out["image"] = {
            "image_id": image_id,
            "image_index": index,
            "label": label,
            "class_name": self._class_name(label),
            "layer": spec.layer,
            "channel": r.channel,
            "base_activation": r.base_activation,
            "base_true_prob": r.base_true_prob,
            "base_top_class": r.base_top_class,
            "min_true_prob": float(r.true_prob.min()),
            "object_true_prob": float(r.true_prob[on_object].mean()) if on_object is not None else None,
            "background_true_prob": float(r.true_prob[off_object].mean()) if off_object is not None else None,
            **keys,
        }
        out["seconds"] = time.perf_counter() - start
        return out

    def _object_split(
        self, index: int, tops: torch.Tensor, lefts: torch.Tensor, size: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Masks (R, C) of the squares wholly on / wholly off the object's box, where the source
        knows it (procedural) and both sets are non-empty; else (None, None)."""
        object_box: Callable[[int], tuple[int, int, int, int]] | None = getattr(
            self.source, "object_box", None
        )
        if object_box is None:
            return None, None
        top, left, h, w = object_box(index)
        t, lf = tops[:, None], lefts[None, :]
        on = (t >= top) & (t + size <= top + h) & (lf >= left) & (lf + size <= left + w)
        off = (t + size <= top) | (t >= top + h) | (lf + size <= left) | (lf >= left + w)
        return (on, off) if bool(on.any()) and bool(off.any()) else (None, None)

    # --- invariance ---

    def invariance(self, item: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        spec: InvarianceSpec = self.spec  # type: ignore[assignment]
        images, labels, indices, skipped = self._read(item["indices"])
        if not len(indices):
            return {"skipped": skipped, "distances": None, "probabilities": None}
        kind, values = item["transform"], item["values"]
        r = invariance_sweep(
            self.model,
            to_tensor(images).to(self.device),
            torch.from_numpy(labels).to(self.device),
            kind,
            values,
            layers=spec.layers,
            batch_size=spec.resources.batch_size,
        )
        ids = [self.source.image_id(int(i)) for i in indices]
        b, v = len(indices), len(values)
        image_col = np.repeat(np.arange(b), v)  # rows are image-major, values inner
        value_col = np.tile(np.asarray(values, np.float64), b)
        distances = {name: [] for name in INVARIANCE_DISTANCES_SCHEMA.names}
        for layer in spec.layers:
            distances["transform"] += [kind] * (b * v)
            distances["value"].append(value_col)
            distances["image_id"] += [ids[i] for i in image_col]
            distances["image_index"].append(indices[image_col])
            distances["layer"] += [layer] * (b * v)
            distances["distance"].append(r.distance[layer].numpy().ravel())
            distances["relative_distance"].append(r.relative_distance[layer].numpy().ravel())
        for name in ("value", "image_index", "distance", "relative_distance"):
            distances[name] = np.concatenate(distances[name])
        probabilities = {
            "transform": [kind] * (b * v),
            "value": value_col,
            "image_id": [ids[i] for i in image_col],
            "image_index": indices[image_col],
            "label": labels[image_col].astype(np.int32),
            "true_prob": r.true_prob.numpy().ravel(),
            "top_class": r.top_class.numpy().ravel().astype(np.int32),
        }
        legend = [f"{ids[i]} ({self._class_name(int(labels[i]))})" for i in range(b)]
        plot_key = self.run.put_png(
            f"plots/{kind}.png",
            invariance_figure(
                kind,
                values,
                {layer: r.distance[layer].numpy() for layer in spec.layers},
                r.true_prob.numpy(),
                legend,
            ),
        )
        return {
            "skipped": skipped,
            "distances": distances,
            "probabilities": probabilities,
            "plot_key": plot_key,
            "seconds": time.perf_counter() - start,
        }

    # --- correspondence ---

    def correspondence(self, item: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        spec: CorrespondenceSpec = self.spec  # type: ignore[assignment]
        images, _, indices, skipped = self._read(item["indices"])
        if len(indices) != len(item["indices"]):
            # One box per image: a part measured on fewer images would not be the same measurement.
            return {"skipped": skipped, "rows": None}
        x = to_tensor(images).to(self.device)
        boxes = torch.tensor(item["boxes"], dtype=torch.long)
        if item["random"]:
            result = random_correspondence(
                self.model, x, boxes, draws=spec.random_masks, seed=spec.seed, layers=spec.layers
            )
            # The first draw's boxes, exactly as random_correspondence drew them, for the preview.
            shown = random_boxes(boxes, tuple(x.shape[-2:]), torch.Generator().manual_seed(spec.seed))
        else:
            result = correspondence(self.model, x, boxes, layers=spec.layers)
            shown = boxes
        masked = to_uint8(mask_boxes(x, shown.to(self.device)).cpu())
        slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in item["part"])
        preview = self.run.put_png(f"images/{item['order']:03d}-{slug}.png", image_row(list(masked)))
        rows = [
            {
                "part": item["part"],
                "random": item["random"],
                "layer": layer,
                "delta_mean": d.mean,
                "delta_std": d.std,
                "pairs": d.pairs,
                "images": len(indices),
                "draws": spec.random_masks if item["random"] else 1,
                "preview_key": preview,
            }
            for layer, d in result.items()
        ]
        return {"skipped": skipped, "rows": rows, "seconds": time.perf_counter() - start}

    # --- probes ---

    def features(self, item: dict[str, Any]) -> dict[str, Any]:
        """Frozen features of one slice of the probe dataset through one network."""
        start = time.perf_counter()
        spec: ProbeSpec = self.spec  # type: ignore[assignment]
        batch = self.source.read(item["indices"])
        out = {
            "network": item["network"],
            "indices": batch.indices,
            "labels": batch.labels,
            "features": {},
            "skipped": list(batch.skipped),
        }
        if len(batch.indices):
            model = self.networks[item["network"]]
            feats = extract_features(
                model,
                to_tensor(batch.images).to(self.device),
                spec.layers,
                grid=probe_grids(model, spec.layers, self.image_size),
                batch_size=spec.resources.batch_size,
            )
            out["features"] = {layer: f.numpy() for layer, f in feats.items()}
        return {**out, "seconds": time.perf_counter() - start}

    def fit(self, item: dict[str, Any], features: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Every fold, classifier and training-set size of one (network, layer)."""
        start = time.perf_counter()
        spec: ProbeSpec = self.spec  # type: ignore[assignment]
        x = torch.from_numpy(features).to(self.device)
        y = torch.from_numpy(labels)
        rows = []
        for n in spec.train_per_class:
            scores = probe_layers(
                {item["layer"]: x},
                y,
                item["num_classes"],
                n_train=n,
                folds=spec.folds,
                classifiers=spec.classifiers,
                seed=spec.seed,
                max_iter=spec.epochs,
            )
            rows += [
                {
                    "network": item["network"],
                    "classifier": s.classifier,
                    "layer": s.layer,
                    "train_per_class": n,
                    "fold": s.fold,
                    "accuracy": s.accuracy,
                    "n_train": s.n_train,
                    "n_test": s.n_test,
                    "feature_dim": x.shape[1],
                }
                for s in scores
            ]
        return {"rows": rows, "seconds": time.perf_counter() - start}


# --- driver side ---------------------------------------------------------------------------------


def _start(spec: SpecBase, run: RunWriter, items: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """Start min(workers, items) actors (one per GPU on a GPU cluster) and wait until they are up."""
    connect()
    res = spec.resources
    count, options = worker_options(res.workers, res.gpus_per_worker, res.cpus_per_worker)
    count = max(1, min(count, items))
    actors = [AnalysisWorker.options(**options).remote(spec, run, options["num_cpus"]) for _ in range(count)]
    return actors, ray.get([a.info.remote() for a in actors])


def _stop(actors: Sequence[Any]) -> None:
    for a in actors:
        ray.kill(a)


def _same_skips(skips: dict[Any, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """The skipped images of items that all read the same images: any one item's list (counting
    every item's would list each bad image once per item)."""
    return next(iter(skips.values()), [])


def _common(
    spec: SpecBase, source: ImageSource, workers: list[dict[str, Any]], skipped: list[tuple[str, str]]
) -> dict[str, Any]:
    if skipped:
        log.warning("skipped %d images", len(skipped))
    return {
        "name": spec.name,
        "model_fingerprint": workers[0]["model_fingerprint"],
        "dataset_fingerprint": source.fingerprint(),
        "images_total": len(source),
        "images_skipped": len(skipped),
        "skipped": [{"image_id": i, "reason": r} for i, r in skipped[:1000]],
        "workers": [{k: v for k, v in w.items() if k != "model_fingerprint"} for w in workers],
    }


def run_occlusion(
    spec: OcclusionSpec, store: Store, run: RunWriter, *, quiet: bool = False
) -> dict[str, Any]:
    """Occlusion sensitivity of the first ``spec.images`` images; one work item per image."""
    t0 = time.perf_counter()
    source = open_dataset(spec.dataset, spec.image_size, spec.endpoint_url)
    indices = list(range(min(spec.images, len(source))))
    actors, workers = _start(spec, run, len(indices))
    positions, images, skipped = [], [], []

    def collect(index: int, out: dict[str, Any]) -> None:
        skipped.extend(out["skipped"])
        if out["image"] is not None:
            positions.append(out["positions"])
            images.append(out["image"])

    t_run = time.perf_counter()
    run_on_actors(actors, lambda a, i: a.occlusion.remote(i), indices, collect)
    analyse_s = time.perf_counter() - t_run
    _stop(actors)
    if not images:
        raise RuntimeError("no image could be analysed (all unreadable or with unknown labels)")
    order = np.argsort([im["image_index"] for im in images])
    positions = [positions[i] for i in order]
    images = [images[i] for i in order]
    run.write_table(
        "positions.parquet",
        _table(_columns(positions, OCCLUSION_POSITIONS_SCHEMA), OCCLUSION_POSITIONS_SCHEMA),
        OCCLUSION_POSITIONS_SCHEMA,
    )
    run.write_table(
        "images.parquet",
        pa.Table.from_pylist(images, schema=OCCLUSION_IMAGES_SCHEMA),
        OCCLUSION_IMAGES_SCHEMA,
    )
    split = [im for im in images if im["object_true_prob"] is not None]
    return {
        **_common(spec, source, workers, skipped),
        "images_analysed": len(images),
        "layer": spec.layer,
        "patch": spec.patch,
        "stride": spec.stride,
        "positions_per_image": int(len(positions[0]["row"])),
        "tables": {"positions": "positions.parquet", "images": "images.parquet"},
        "figures": [im["figure_key"] for im in images],
        # The Fig. 7 claim in one number per region, over the images where the object is known.
        "mean_true_prob": {
            "unoccluded": float(np.mean([im["base_true_prob"] for im in images])),
            "object_occluded": float(np.mean([im["object_true_prob"] for im in split])) if split else None,
            "background_occluded": float(np.mean([im["background_true_prob"] for im in split]))
            if split
            else None,
        },
        "timings": {"analyse_s": analyse_s, "total_s": time.perf_counter() - t0},
    }


def run_invariance(
    spec: InvarianceSpec, store: Store, run: RunWriter, *, quiet: bool = False
) -> dict[str, Any]:
    """Translation, scale and rotation sweeps of the first ``spec.images`` images; one work item per
    sweep (an empty list in the spec skips that sweep)."""
    t0 = time.perf_counter()
    source = open_dataset(spec.dataset, spec.image_size, spec.endpoint_url)
    indices = list(range(min(spec.images, len(source))))
    items = [
        {"transform": kind, "values": [float(v) for v in getattr(spec, field)], "indices": indices}
        for kind, field in SWEEPS
        if getattr(spec, field)
    ]
    if not items:
        raise SpecError(["translations: every sweep (translations, scales, rotations) is empty"])
    actors, workers = _start(spec, run, len(items))
    distances, probabilities, plots = [], [], {}
    skips: dict[str, list[tuple[str, str]]] = {}

    def collect(item: dict[str, Any], out: dict[str, Any]) -> None:
        skips[item["transform"]] = out["skipped"]
        if out["distances"] is not None:
            distances.append(out["distances"])
            probabilities.append(out["probabilities"])
            plots[item["transform"]] = out["plot_key"]

    t_run = time.perf_counter()
    run_on_actors(actors, lambda a, it: a.invariance.remote(it), items, collect)
    analyse_s = time.perf_counter() - t_run
    _stop(actors)
    skipped = _same_skips(skips)
    if not distances:
        raise RuntimeError("no image could be analysed (all unreadable or with unknown labels)")
    dist = _table(_columns(distances, INVARIANCE_DISTANCES_SCHEMA), INVARIANCE_DISTANCES_SCHEMA)
    dist = dist.sort_by(
        [
            ("transform", "ascending"),
            ("layer", "ascending"),
            ("image_index", "ascending"),
            ("value", "ascending"),
        ]
    )
    prob = _table(_columns(probabilities, INVARIANCE_PROBABILITIES_SCHEMA), INVARIANCE_PROBABILITIES_SCHEMA)
    prob = prob.sort_by([("transform", "ascending"), ("image_index", "ascending"), ("value", "ascending")])
    run.write_table("distances.parquet", dist, INVARIANCE_DISTANCES_SCHEMA)
    run.write_table("probabilities.parquet", prob, INVARIANCE_PROBABILITIES_SCHEMA)
    return {
        **_common(spec, source, workers, skipped),
        "images_analysed": len(set(prob.column("image_index").to_pylist())),
        "layers": spec.layers,
        "transforms": [it["transform"] for it in items],
        "tables": {"distances": "distances.parquet", "probabilities": "probabilities.parquet"},
        "plots": {kind: plots[kind] for kind, _ in SWEEPS if kind in plots},
        "timings": {"analyse_s": analyse_s, "total_s": time.perf_counter() - t0},
    }


def _correspondence_items(spec: CorrespondenceSpec, source: ImageSource) -> list[dict[str, Any]]:
    """One item per part, plus the random-mask baseline; parts default to the procedural object box."""
    if spec.images:
        known = {image_id: i for i, image_id in enumerate(source.ids())}
        missing = [
            f"images.{n}: no image {image_id!r} in the dataset"
            for n, image_id in enumerate(spec.images)
            if image_id not in known
        ]
        if missing:
            raise SpecError(missing)
        indices = [known[image_id] for image_id in spec.images]
    else:
        indices = list(range(min(5, len(source))))
    if len(indices) < 2:
        raise SpecError(["images: correspondence compares image pairs; need at least 2 images"])
    parts = {name: [list(b) for b in boxes] for name, boxes in spec.parts.items()}
    if not parts:
        object_box = getattr(source, "object_box", None)
        if object_box is None:  # the spec validator already requires parts for these datasets
            raise SpecError(["parts: required unless the dataset is procedural"])
        parts = {"object": [list(object_box(i)) for i in indices]}
    items = [
        {"part": name, "random": False, "indices": indices, "boxes": boxes} for name, boxes in parts.items()
    ]
    if spec.random_masks:
        size = spec.mask_size
        items.append(
            {
                "part": RANDOM_PART,
                "random": True,
                "indices": indices,
                "boxes": [[0, 0, size, size]] * len(indices),
            }
        )
    return [{**it, "order": n} for n, it in enumerate(items)]


def run_correspondence(
    spec: CorrespondenceSpec, store: Store, run: RunWriter, *, quiet: bool = False
) -> dict[str, Any]:
    """Table 1: Delta per part and layer (and for random masks); one work item per part."""
    t0 = time.perf_counter()
    source = open_dataset(spec.dataset, spec.image_size, spec.endpoint_url)
    items = _correspondence_items(spec, source)
    actors, workers = _start(spec, run, len(items))
    rows: dict[int, list[dict[str, Any]]] = {}
    skips: dict[int, list[tuple[str, str]]] = {}

    def collect(item: dict[str, Any], out: dict[str, Any]) -> None:
        skips[item["order"]] = out["skipped"]
        if out["rows"] is not None:
            rows[item["order"]] = out["rows"]

    t_run = time.perf_counter()
    run_on_actors(actors, lambda a, it: a.correspondence.remote(it), items, collect)
    analyse_s = time.perf_counter() - t_run
    _stop(actors)
    skipped = _same_skips(skips)
    if skipped:
        raise RuntimeError(
            f"correspondence needs every listed image; {len(skipped)} could not be used: {skipped[:3]}"
        )
    flat_rows = [r for n in sorted(rows) for r in rows[n]]
    run.write_table(
        "correspondence.parquet",
        pa.Table.from_pylist(flat_rows, schema=CORRESPONDENCE_SCHEMA),
        CORRESPONDENCE_SCHEMA,
    )
    # The paper's layout: a row per part, "mean ± std" per layer.
    table1 = {
        it["part"]: {r["layer"]: f"{r['delta_mean']:.3f} ± {r['delta_std']:.3f}" for r in rows[it["order"]]}
        for it in items
    }
    parts = [it["part"] for it in items]
    series = {
        layer: (
            [next(r["delta_mean"] for r in rows[it["order"]] if r["layer"] == layer) for it in items],
            [next(r["delta_std"] for r in rows[it["order"]] if r["layer"] == layer) for it in items],
        )
        for layer in spec.layers
    }
    plot = run.put_png(
        "plots/correspondence.png",
        bar_figure(
            parts, series, ylabel="Delta (fraction of sign flips)", title="Table 1: lower is more consistent"
        ),
    )
    return {
        **_common(spec, source, workers, skipped),
        "images_analysed": len(items[0]["indices"]),
        "image_ids": [source.image_id(i) for i in items[0]["indices"]],
        "layers": spec.layers,
        "table1": table1,
        "paper_table1": PAPER_TABLE1,
        "delta_normalization": "mean over ordered image pairs i != j of the fraction of feature "
        "entries whose sign(eps) differs; std over pairs",
        "tables": {"correspondence": "correspondence.parquet"},
        "plots": {"correspondence": plot},
        "timings": {"analyse_s": analyse_s, "total_s": time.perf_counter() - t0},
    }


def run_probe(spec: ProbeSpec, store: Store, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    """Tables 4/5/7: linear probes on frozen features of each layer, trained on ``probe_dataset``
    with N images per class over several folds, for the trained network and a random-init one."""
    t0 = time.perf_counter()
    source = open_dataset(spec.probe_dataset, spec.image_size, spec.endpoint_url)
    networks = ["trained"] + (["random_init"] if spec.include_random_init else [])
    slices = [list(range(s, min(s + PROBE_SLICE, len(source)))) for s in range(0, len(source), PROBE_SLICE)]
    extract_items = [{"network": net, "indices": s} for net in networks for s in slices]
    actors, workers = _start(spec, run, max(len(extract_items), len(networks) * len(spec.layers)))
    parts: dict[str, list[dict[str, Any]]] = {net: [] for net in networks}
    skipped: list[tuple[str, str]] = []

    def collect_features(item: dict[str, Any], out: dict[str, Any]) -> None:
        if item["network"] == networks[0]:
            skipped.extend(out["skipped"])  # both networks read the same images
        if len(out["indices"]):
            parts[item["network"]].append(out)

    t_extract = time.perf_counter()
    alive = run_on_actors(actors, lambda a, it: a.features.remote(it), extract_items, collect_features)
    extract_s = time.perf_counter() - t_extract
    if not parts[networks[0]]:
        _stop(actors)
        raise RuntimeError("no image of the probe dataset could be read")
    labels_by_net, features_by_net = {}, {}
    for net, outs in parts.items():
        outs.sort(key=lambda o: int(o["indices"][0]))
        labels_by_net[net] = np.concatenate([o["labels"] for o in outs])
        features_by_net[net] = {
            layer: np.concatenate([o["features"][layer] for o in outs]) for layer in spec.layers
        }
    labels = labels_by_net[networks[0]]
    num_classes = max(len(source.class_names), int(labels.max()) + 1)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    need = max(spec.train_per_class) + 1
    if present.min() < need:
        _stop(actors)
        raise SpecError(
            [
                f"train_per_class: {max(spec.train_per_class)} training images per class leave no "
                f"test image for a class with {int(present.min())} images in probe_dataset; "
                f"need at least {need} per class"
            ]
        )

    label_ref = ray.put(labels)
    refs = {(net, layer): ray.put(features_by_net[net][layer]) for net in networks for layer in spec.layers}
    fit_items = [
        {"network": net, "layer": layer, "num_classes": num_classes}
        for net in networks
        for layer in spec.layers
    ]
    scores: list[dict[str, Any]] = []
    t_fit = time.perf_counter()
    run_on_actors(
        alive,
        lambda a, it: a.fit.remote(it, refs[it["network"], it["layer"]], label_ref),
        fit_items,
        lambda item, out: scores.extend(out["rows"]),
    )
    fit_s = time.perf_counter() - t_fit
    _stop(actors)

    layer_order = {layer: i for i, layer in enumerate(spec.layers)}
    scores.sort(
        key=lambda r: (
            networks.index(r["network"]),
            r["classifier"],
            r["train_per_class"],
            layer_order[r["layer"]],
            r["fold"],
        )
    )
    run.write_table(
        "scores.parquet", pa.Table.from_pylist(scores, schema=PROBE_SCORES_SCHEMA), PROBE_SCORES_SCHEMA
    )
    summary = _probe_summary(scores, networks, spec)
    run.write_table(
        "table7.parquet", pa.Table.from_pylist(summary, schema=PROBE_TABLE_SCHEMA), PROBE_TABLE_SCHEMA
    )
    # Table 7's layout: a row per (network, classifier, N), a column per layer, "mean ± std" in %.
    table7: dict[str, dict[str, str]] = {}
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for s in summary:  # layer-major within each row, in spec.layers order
        row = f"{s['network']}/{s['classifier']}/{s['train_per_class']}"
        table7.setdefault(row, {})[s["layer"]] = (
            f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}"
        )
        panel = curves.setdefault(f"{s['train_per_class']} training images per class", {})
        means, stds = panel.setdefault(f"{s['network']} {s['classifier']}", ([], []))
        means.append(s["accuracy_mean"])
        stds.append(s["accuracy_std"])
    plot = run.put_png("plots/probe.png", line_figure(curves, spec.layers, ylabel="test accuracy"))
    return {
        **_common(spec, source, workers, skipped),
        "images_used": int(len(labels)),
        "num_classes": int(num_classes),
        "layers": spec.layers,
        "networks": networks,
        "feature_dims": {layer: int(features_by_net[networks[0]][layer].shape[1]) for layer in spec.layers},
        "table7": table7,
        "tables": {"scores": "scores.parquet", "table7": "table7.parquet"},
        "plots": {"probe": plot},
        "timings": {"extract_s": extract_s, "fit_s": fit_s, "total_s": time.perf_counter() - t0},
    }


def _probe_summary(
    scores: list[dict[str, Any]], networks: list[str], spec: ProbeSpec
) -> list[dict[str, Any]]:
    """Mean ± std over folds per (network, classifier, layer, N), with Table 7's numbers beside the
    trained network's rows (as fractions, like the accuracies)."""
    groups: dict[tuple[str, str, str, int], list[float]] = {}
    for r in scores:
        groups.setdefault((r["network"], r["classifier"], r["layer"], r["train_per_class"]), []).append(
            r["accuracy"]
        )
    out = []
    for net in networks:
        for clf in spec.classifiers:
            for n in spec.train_per_class:
                for layer in spec.layers:  # innermost: each table7 row and plot line runs over layers
                    accs = np.asarray(groups[net, clf, layer, n], np.float64)
                    paper = PAPER_TABLE7.get((clf, layer)) if net == "trained" else None
                    out.append(
                        {
                            "network": net,
                            "classifier": clf,
                            "layer": layer,
                            "train_per_class": n,
                            "accuracy_mean": float(accs.mean()),
                            "accuracy_std": float(accs.std()),
                            "folds": len(accs),
                            "paper_caltech101": paper[0] / 100 if paper else None,
                            "paper_caltech256": paper[1] / 100 if paper else None,
                        }
                    )
    return out
