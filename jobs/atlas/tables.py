"""The atlas's tables, as written and as every reader (the query layer, the API) reads them.

Documented in docs/schemas.md ("Atlas tables"). No Ray or torch here: readers import this.
"""

from __future__ import annotations

import pyarrow as pa

FEATURES = "features.parquet"

FEATURES_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("rank", pa.int8(), nullable=False),
        pa.field("activation", pa.float32(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("y", pa.int32(), nullable=False),
        pa.field("x", pa.int32(), nullable=False),
        pa.field("box_top", pa.int32(), nullable=False),
        pa.field("box_left", pa.int32(), nullable=False),
        pa.field("box_height", pa.int32(), nullable=False),
        pa.field("box_width", pa.int32(), nullable=False),
        pa.field("patch_key", pa.string(), nullable=False),
        pa.field("projection_key", pa.string(), nullable=False),
        pa.field("patch_grid_key", pa.string(), nullable=False),
        pa.field("projection_grid_key", pa.string(), nullable=False),
    ]
)

# Raw float32 projections, cropped to the receptive box (the projection is exactly zero outside
# it). ``values`` is the (3, box_height, box_width) array in C order, in normalized-input units.
PROJECTIONS_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("rank", pa.int8(), nullable=False),
        pa.field("box_top", pa.int32(), nullable=False),
        pa.field("box_left", pa.int32(), nullable=False),
        pa.field("box_height", pa.int32(), nullable=False),
        pa.field("box_width", pa.int32(), nullable=False),
        pa.field("values", pa.list_(pa.float32()), nullable=False),
    ]
)

#: Row groups of ``features.parquet`` hold this many channels' rows (times k), so a one-channel
#: query reads one small group instead of the whole table.
CHANNELS_PER_ROW_GROUP = 64
