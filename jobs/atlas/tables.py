"""The atlas's tables, as written and as every reader (the query layer, the API) reads them.

Documented in docs/schemas.md ("Atlas tables"). No Ray or torch here: readers import this.
"""

from __future__ import annotations

import pyarrow as pa

FEATURES = "features.parquet"

#: The artifact layout this version writes (the manifest's "format"; absent: 1).
#: 1: features.parquet + one PNG file per patch, projection and grid (7,000+ objects a small atlas).
#: 2: features.parquet + per layer two tables (images: raw pixels; projections: raw values), a row
#:    group per few channels, + one summary PNG: a handful of objects, every image addressable.
#: 3: as 2, each layer's two tables split in parts of GROUPS_PER_PART row groups (a few dozen
#:    channels), each part written by the worker that projected it: the driver moves no pixels.
FORMAT = 3

#: Projection groups (row groups) per part file of a layer's tables (format 3). Fixed, so the
#: layout depends on the spec alone, not on how many workers ran it.
GROUPS_PER_PART = 16

#: An activation's position in its layer's map and its receptive box in input pixels, as every
#: table of top activations records them (the atlas's features, training's feature evolution).
POSITION_FIELDS = [
    pa.field("y", pa.int32(), nullable=False),
    pa.field("x", pa.int32(), nullable=False),
    pa.field("box_top", pa.int32(), nullable=False),
    pa.field("box_left", pa.int32(), nullable=False),
    pa.field("box_height", pa.int32(), nullable=False),
    pa.field("box_width", pa.int32(), nullable=False),
]

# One row per (layer, channel, rank): the winner, where it is in its map and its receptive box.
_FEATURE_FIELDS = [
    pa.field("layer", pa.string(), nullable=False),
    pa.field("channel", pa.int32(), nullable=False),
    pa.field("rank", pa.int8(), nullable=False),
    pa.field("activation", pa.float32(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_index", pa.int64(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),
    *POSITION_FIELDS,
]

FEATURES_SCHEMA = pa.schema(
    [
        *_FEATURE_FIELDS,
        # The channel never fired (its strongest activation is not positive): it has one row,
        # rank 0, and no images.
        pa.field("dead", pa.bool_(), nullable=False),
    ]
)

#: features.parquet of format 1 (atlases before 0.2): PNG files named by the *_key columns.
FEATURES_SCHEMA_V1 = pa.schema(
    [
        *_FEATURE_FIELDS,
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

# Per layer: images/<layer>/part-NNNNN.parquet and projections/<layer>/part-NNNNN.parquet (format 2:
# images/<layer>.parquet, projections/<layer>.parquet), each with one row group per projection
# group (a few whole channels), rows sorted by (channel, rank): a one-channel read is one row group.
# Pixels are raw uint8, (height, width, 3) in C order (``np.frombuffer(...).reshape(h, w, 3)``);
# the API encodes PNGs from them, and draws a channel's 3x3 grids from its rows (zstd-compressed
# Parquet writes them several times faster than PNGs).
IMAGES_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("rank", pa.int8(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),  # the receptive box's
        pa.field("width", pa.int32(), nullable=False),
        pa.field("patch", pa.binary(), nullable=False),  # the image under the box
        pa.field("projection", pa.binary(), nullable=False),  # the projection, display-normalized
    ]
)

TABLE_KINDS = ("images", "projections")


def part_key(kind: str, layer: str, part: int) -> str:
    """Format 3: part ``part`` of a layer's ``kind`` ("images" or "projections") table."""
    return f"{kind}/{layer}/part-{part:05d}.parquet"


def images_key(layer: str) -> str:
    """Format 2: the layer's one images table."""
    return f"images/{layer}.parquet"


def projections_key(layer: str) -> str:
    """Format 2: the layer's one projections table."""
    return f"projections/{layer}.parquet"


def summary_key(layer: str) -> str:
    return f"summary/{layer}.png"
