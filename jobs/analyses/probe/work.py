"""The probe job's work items: frozen features of a slice of the probe dataset through one network
(trained, or its random-init baseline), and the folds and classifiers of one (network, layer).
Plain Python, run on an analysis worker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from jobs.analyses.probe.spec import ProbeSpec
from jobs.analyses.worker import AnalysisContext
from zfcore.analyses.probe import extract_features, pooled_grid, probe_layers
from zfcore.network import as_network

#: Probe feature vectors are capped at this length: larger conv maps are average-pooled to a grid
#: (zfcore.analyses.probe.pooled_grid). The small model's layers all fit; the paper's conv1/conv2 do not.
MAX_PROBE_FEATURES = 32768
PROBE_SLICE = 256  # probe images per feature-extraction work item


def probe_grids(model: nn.Module, layers: Sequence[str], image_size: int) -> dict[str, int | None]:
    """Per probed conv layer, the pooling grid that keeps its vector at most MAX_PROBE_FEATURES long
    (None: the whole map); vector layers are not pooled."""
    info = as_network(model).layers(image_size)
    return {
        name: pooled_grid(info[name].channels, info[name].height, MAX_PROBE_FEATURES)
        if info[name].spatial
        else None
        for name in layers
    }


def extract(ctx: AnalysisContext, item: dict[str, Any]) -> dict[str, Any]:
    """Frozen features of one slice of the probe dataset through one network."""
    spec: ProbeSpec = ctx.spec  # type: ignore[assignment]
    batch = ctx.source.read(item["indices"])
    out = {
        "network": item["network"],
        "indices": batch.indices,
        "labels": batch.labels,
        "features": {},
        "skipped": list(batch.skipped),
    }
    if len(batch.indices):
        model = ctx.network.module if item["network"] == "trained" else ctx.random_init(spec.seed + 1)
        feats = extract_features(
            model,
            ctx.tensor(batch.images),
            spec.layers,
            grid=probe_grids(model, spec.layers, ctx.image_size),
            batch_size=spec.resources.batch_size,
        )
        out["features"] = {layer: f.numpy() for layer, f in feats.items()}
    return out


def fit(
    ctx: AnalysisContext, item: dict[str, Any], features: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Every fold, classifier and training-set size of one (network, layer)."""
    spec: ProbeSpec = ctx.spec  # type: ignore[assignment]
    x = torch.from_numpy(features).to(ctx.device)
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
            max_iter=spec.max_iter,
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
    return {"rows": rows}
