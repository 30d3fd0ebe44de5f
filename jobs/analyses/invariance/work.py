"""One invariance work item: a sweep (translate, scale or rotate) over the chosen images, its plot
written into the run and its table rows returned. Plain Python, run on an analysis worker."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jobs.analyses.invariance.spec import InvarianceSpec
from jobs.analyses.invariance.tables import INVARIANCE_DISTANCES_SCHEMA
from jobs.analyses.worker import AnalysisContext
from jobs.rendering.plots import invariance_figure
from zfcore.analyses.invariance import invariance_sweep

SWEEPS = (("translate", "translations"), ("scale", "scales"), ("rotate", "rotations"))


def sweep(ctx: AnalysisContext, item: dict[str, Any]) -> dict[str, Any]:
    spec: InvarianceSpec = ctx.spec  # type: ignore[assignment]
    images, labels, indices, skipped = ctx.read(item["indices"])
    if not len(indices):
        return {"skipped": skipped, "distances": None, "probabilities": None}
    kind, values = item["transform"], item["values"]
    r = invariance_sweep(
        ctx.network,
        ctx.tensor(images),
        torch.from_numpy(labels).to(ctx.device),
        kind,
        values,
        layers=spec.layers,
        batch_size=spec.resources.batch_size,
    )
    ids = [ctx.source.image_id(int(i)) for i in indices]
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
    legend = [f"{ids[i]} ({ctx.class_name(int(labels[i]))})" for i in range(b)]
    plot_key = ctx.run.put_png(
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
    }
