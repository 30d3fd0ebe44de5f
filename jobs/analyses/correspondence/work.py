"""One correspondence work item: one masked part (or the random-mask baseline) over the chosen
images, its preview written into the run and its table rows returned. Plain Python, run on an
analysis worker."""

from __future__ import annotations

from typing import Any

import torch

from jobs.analyses.correspondence.spec import CorrespondenceSpec
from jobs.analyses.worker import AnalysisContext
from jobs.rendering.images import image_row
from zfcore.analyses.correspondence import correspondence, mask_boxes, random_boxes, random_correspondence
from zfcore.data import to_uint8

RANDOM_PART = "random"  # part name of the random-mask baseline rows


def mask_part(ctx: AnalysisContext, item: dict[str, Any]) -> dict[str, Any]:
    spec: CorrespondenceSpec = ctx.spec  # type: ignore[assignment]
    images, _, indices, skipped = ctx.read(item["indices"])
    if len(indices) != len(item["indices"]):
        # One box per image: a part measured on fewer images would not be the same measurement.
        return {"skipped": skipped, "rows": None}
    x = ctx.tensor(images)
    boxes = torch.tensor(item["boxes"], dtype=torch.long)
    if item["random"]:
        result = random_correspondence(
            ctx.network, x, boxes, draws=spec.random_masks, seed=spec.seed, layers=spec.layers
        )
        # The first draw's boxes, exactly as random_correspondence drew them, for the preview.
        shown = random_boxes(boxes, tuple(x.shape[-2:]), torch.Generator().manual_seed(spec.seed))
    else:
        result = correspondence(ctx.network, x, boxes, layers=spec.layers)
        shown = boxes
    masked = to_uint8(mask_boxes(x, shown.to(ctx.device)).cpu(), ctx.preprocess.mean, ctx.preprocess.std)
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in item["part"])
    preview = ctx.run.put_png(f"images/{item['order']:03d}-{slug}.png", image_row(list(masked)))
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
    return {"skipped": skipped, "rows": rows}
