"""The correspondence job's table (docs/schemas.md, "Analyses"); no Ray here."""

from __future__ import annotations

import pyarrow as pa

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
