"""The occlusion job's tables (docs/schemas.md, "Analyses"); no Ray here."""

from __future__ import annotations

import pyarrow as pa

OCCLUSION_POSITIONS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("col", pa.int32(), nullable=False),
        pa.field("top", pa.int32(), nullable=False),
        pa.field("left", pa.int32(), nullable=False),
        pa.field("size", pa.int32(), nullable=False),
        pa.field("activation", pa.float32(), nullable=False),
        pa.field("true_prob", pa.float32(), nullable=False),
        pa.field("top_class", pa.int32(), nullable=False),
        pa.field("top_prob", pa.float32(), nullable=False),
    ]
)

OCCLUSION_IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("base_activation", pa.float32(), nullable=False),
        pa.field("base_true_prob", pa.float32(), nullable=False),
        pa.field("base_top_class", pa.int32(), nullable=False),
        pa.field("min_true_prob", pa.float32(), nullable=False),
        # Procedural images only (null elsewhere): mean true-class probability over the squares
        # lying wholly on the object's box, and over those wholly off it.
        pa.field("object_true_prob", pa.float32(), nullable=True),
        pa.field("background_true_prob", pa.float32(), nullable=True),
        pa.field("figure_key", pa.string(), nullable=False),
        pa.field("activation_overlay_key", pa.string(), nullable=False),
        pa.field("probability_overlay_key", pa.string(), nullable=False),
        pa.field("projection_key", pa.string(), nullable=False),
    ]
)
