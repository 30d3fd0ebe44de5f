"""The invariance job on Ray: one work item per sweep, on analysis workers."""

from __future__ import annotations

import time
from typing import Any

from jobs.analyses.invariance.spec import InvarianceSpec
from jobs.analyses.invariance.tables import INVARIANCE_DISTANCES_SCHEMA, INVARIANCE_PROBABILITIES_SCHEMA
from jobs.analyses.invariance.work import SWEEPS, sweep
from jobs.analyses.results import common_fields, concat_columns, same_skips, table
from jobs.analyses.worker import analyse
from jobs.datasets import open_dataset
from jobs.specs.base import SpecError
from jobs.store import RunWriter


def run_invariance(spec: InvarianceSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    """Translation, scale and rotation sweeps of the first ``spec.images`` images; one work item per
    sweep (an empty list in the spec skips that sweep)."""
    t0 = time.perf_counter()
    source = open_dataset(spec.dataset, spec.preprocess, spec.endpoint_url)
    indices = list(range(min(spec.images, len(source))))
    items = [
        {"transform": kind, "values": [float(v) for v in getattr(spec, field)], "indices": indices}
        for kind, field in SWEEPS
        if getattr(spec, field)
    ]
    if not items:
        raise SpecError(["translations: every sweep (translations, scales, rotations) is empty"])
    distances, probabilities, plots = [], [], {}
    skips: dict[str, list[tuple[str, str]]] = {}

    def collect(item: dict[str, Any], out: dict[str, Any]) -> None:
        skips[item["transform"]] = out["skipped"]
        if out["distances"] is not None:
            distances.append(out["distances"])
            probabilities.append(out["probabilities"])
            plots[item["transform"]] = out["plot_key"]

    workers, analyse_s = analyse(spec, run, sweep, items, collect)
    skipped = same_skips(skips)
    if not distances:
        raise RuntimeError("no image could be analysed (all unreadable or with unknown labels)")
    dist = table(concat_columns(distances, INVARIANCE_DISTANCES_SCHEMA), INVARIANCE_DISTANCES_SCHEMA)
    dist = dist.sort_by(
        [
            ("transform", "ascending"),
            ("layer", "ascending"),
            ("image_index", "ascending"),
            ("value", "ascending"),
        ]
    )
    prob_schema = INVARIANCE_PROBABILITIES_SCHEMA
    prob = table(concat_columns(probabilities, prob_schema), prob_schema)
    prob = prob.sort_by([("transform", "ascending"), ("image_index", "ascending"), ("value", "ascending")])
    run.write_table("distances.parquet", dist, INVARIANCE_DISTANCES_SCHEMA)
    run.write_table("probabilities.parquet", prob, INVARIANCE_PROBABILITIES_SCHEMA)
    return {
        **common_fields(spec, source, workers, skipped),
        "images_analysed": len(set(prob.column("image_index").to_pylist())),
        "layers": spec.layers,
        "transforms": [it["transform"] for it in items],
        "tables": {"distances": "distances.parquet", "probabilities": "probabilities.parquet"},
        "plots": {kind: plots[kind] for kind, _ in SWEEPS if kind in plots},
        "timings": {"analyse_s": analyse_s, "total_s": time.perf_counter() - t0},
    }
