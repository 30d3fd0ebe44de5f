"""Putting an analysis's results together: work items' column dicts into tables, their skipped
images, and the manifest fields every analysis kind shares."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.datasets import ImageSource
from jobs.specs.base import SpecBase

log = logging.getLogger(__name__)


def table(columns: dict[str, list | np.ndarray], schema: pa.Schema) -> pa.Table:
    return pa.table({name: columns[name] for name in schema.names})


def concat_columns(parts: Sequence[dict[str, np.ndarray | list]], schema: pa.Schema) -> dict[str, np.ndarray]:
    """Concatenate column dicts (one per work item) into one."""
    return {
        name: np.concatenate([np.asarray(p[name]) for p in parts]) if parts else np.array([])
        for name in schema.names
    }


def same_skips(skips: dict[Any, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """The skipped images of items that all read the same images: any one item's list (counting
    every item's would list each bad image once per item)."""
    return next(iter(skips.values()), [])


def common_fields(
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
