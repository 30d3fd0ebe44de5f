"""One occlusion work item: an image's grid of occluded copies through the model, its pictures
written into the run and its table rows returned. Plain Python, run on an analysis worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from jobs.analyses.occlusion.spec import OcclusionSpec
from jobs.analyses.worker import AnalysisContext
from jobs.rendering.images import display, enlarge
from jobs.rendering.plots import heat_overlay, occlusion_figure
from zfcore.analyses.occlusion import occlusion_sensitivity, pixel_map
from zfcore.data import MEAN, STD

GREY = 0.5  # the occluder's "grey": mid-grey pixels, 128 of 255 (the "mean" fill is MEAN instead)


def fill_value(
    fill: str, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
) -> float | tuple[float, ...]:
    """The occluder colour in the model's normalized input space: "mean" is the normalization mean
    (0 there), "grey" mid-grey pixels."""
    if fill == "mean":
        return 0.0
    return tuple((GREY - m) / s for m, s in zip(mean, std, strict=True))


def occlude_image(ctx: AnalysisContext, index: int) -> dict[str, Any]:
    spec: OcclusionSpec = ctx.spec  # type: ignore[assignment]
    images, labels, indices, skipped = ctx.read([index])
    out: dict[str, Any] = {"skipped": skipped, "positions": None, "image": None}
    if not len(indices):
        return out
    label, image_u8 = int(labels[0]), images[0]
    image_id = ctx.source.image_id(index)
    r = occlusion_sensitivity(
        ctx.network,
        ctx.tensor(image_u8)[0],
        label,
        layer=spec.layer,
        size=spec.patch,
        stride=spec.stride,
        fill=fill_value(spec.fill, ctx.preprocess.mean, ctx.preprocess.std),
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
    projection = display(r.projection.numpy())
    run = ctx.run
    keys = {
        "figure_key": run.put_png(
            f"{base}/figure.png",
            occlusion_figure(
                image_u8,
                r.activation.numpy(),
                projection,
                r.true_prob.numpy(),
                r.top_class.numpy(),
                ctx.class_names,
                layer=spec.layer,
                channel=r.channel,
                title=f"{image_id}: {ctx.class_name(label)}, p = {r.base_true_prob:.3f} unoccluded",
            ),
        ),
        "activation_overlay_key": run.put_png(
            f"{base}/activation.png",
            heat_overlay(image_u8, pixel_map(r.activation, r.tops, r.lefts, r.size, hw).numpy()),
        ),
        "probability_overlay_key": run.put_png(
            f"{base}/probability.png",
            heat_overlay(
                image_u8, pixel_map(r.true_prob, r.tops, r.lefts, r.size, hw).numpy(), vmin=0.0, vmax=1.0
            ),
        ),
        "projection_key": run.put_png(f"{base}/projection.png", enlarge(projection, 256)),
    }
    on_object, off_object = _object_split(ctx, index, r.tops, r.lefts, r.size)
    out["image"] = {
        "image_id": image_id,
        "image_index": index,
        "label": label,
        "class_name": ctx.class_name(label),
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
    return out


def _object_split(
    ctx: AnalysisContext, index: int, tops: torch.Tensor, lefts: torch.Tensor, size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Masks (R, C) of the squares wholly on / wholly off the object's box, where the source
    knows it (procedural) and both sets are non-empty; else (None, None)."""
    object_box: Callable[[int], tuple[int, int, int, int]] | None = getattr(ctx.source, "object_box", None)
    if object_box is None:
        return None, None
    top, left, h, w = object_box(index)
    t, lf = tops[:, None], lefts[None, :]
    on = (t >= top) & (t + size <= top + h) & (lf >= left) & (lf + size <= left + w)
    off = (t + size <= top) | (t >= top + h) | (lf + size <= left) | (lf >= left + w)
    return (on, off) if bool(on.any()) and bool(off.any()) else (None, None)
