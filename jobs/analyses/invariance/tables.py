"""The invariance job's tables (docs/schemas.md, "Analyses"); no Ray here."""

from __future__ import annotations

import pyarrow as pa

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
