"""The occlusion job on Ray: one work item per image, on analysis workers."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.analyses.occlusion.spec import OcclusionSpec
from jobs.analyses.occlusion.tables import OCCLUSION_IMAGES_SCHEMA, OCCLUSION_POSITIONS_SCHEMA
from jobs.analyses.occlusion.work import occlude_image
from jobs.analyses.results import common_fields, concat_columns, table
from jobs.analyses.worker import analyse
from jobs.datasets import open_dataset
from jobs.store import RunWriter


def run_occlusion(spec: OcclusionSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    """Occlusion sensitivity of the first ``spec.images`` images; one work item per image."""
    t0 = time.perf_counter()
    source = open_dataset(spec.dataset, spec.preprocess, spec.endpoint_url)
    indices = list(range(min(spec.images, len(source))))
    positions, images, skipped = [], [], []

    def collect(index: int, out: dict[str, Any]) -> None:
        skipped.extend(out["skipped"])
        if out["image"] is not None:
            positions.append(out["positions"])
            images.append(out["image"])

    workers, analyse_s = analyse(spec, run, occlude_image, indices, collect, layers=[spec.layer])
    if not images:
        raise RuntimeError("no image could be analysed (all unreadable or with unknown labels)")
    order = np.argsort([im["image_index"] for im in images])
    positions = [positions[i] for i in order]
    images = [images[i] for i in order]
    run.write_table(
        "positions.parquet",
        table(concat_columns(positions, OCCLUSION_POSITIONS_SCHEMA), OCCLUSION_POSITIONS_SCHEMA),
        OCCLUSION_POSITIONS_SCHEMA,
    )
    run.write_table(
        "images.parquet",
        pa.Table.from_pylist(images, schema=OCCLUSION_IMAGES_SCHEMA),
        OCCLUSION_IMAGES_SCHEMA,
    )
    split = [im for im in images if im["object_true_prob"] is not None]
    return {
        **common_fields(spec, source, workers, skipped),
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
