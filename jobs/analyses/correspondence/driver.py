"""The correspondence job on Ray: one work item per masked part, on analysis workers."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from jobs.analyses.correspondence.spec import CorrespondenceSpec
from jobs.analyses.correspondence.tables import CORRESPONDENCE_SCHEMA
from jobs.analyses.correspondence.work import RANDOM_PART, mask_part
from jobs.analyses.results import common_fields, same_skips
from jobs.analyses.worker import analyse
from jobs.datasets import ImageSource, open_dataset
from jobs.rendering.plots import bar_figure
from jobs.specs.base import SpecError
from jobs.store import RunWriter
from zfcore.zfnet import PAPER_TABLE1


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


def run_correspondence(spec: CorrespondenceSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    """Table 1: Delta per part and layer (and for random masks); one work item per part."""
    t0 = time.perf_counter()
    source = open_dataset(spec.dataset, spec.preprocess, spec.endpoint_url)
    items = _correspondence_items(spec, source)
    rows: dict[int, list[dict[str, Any]]] = {}
    skips: dict[int, list[tuple[str, str]]] = {}

    def collect(item: dict[str, Any], out: dict[str, Any]) -> None:
        skips[item["order"]] = out["skipped"]
        if out["rows"] is not None:
            rows[item["order"]] = out["rows"]

    workers, analyse_s = analyse(spec, run, mask_part, items, collect)
    skipped = same_skips(skips)
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
        **common_fields(spec, source, workers, skipped),
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
