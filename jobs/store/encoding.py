"""Encoding what runs hold: PNG images and Parquet tables of a declared schema."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """A uint8 (H, W, 3) RGB or (H, W) grey image as PNG bytes."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"put_png needs uint8 (H, W, 3) or (H, W), got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def parquet_bytes(table: pa.Table, schema: pa.Schema, *, row_group_size: int | None = None) -> bytes:
    """``table`` as zstd Parquet with exactly ``schema`` (columns reordered and safely cast to it;
    missing or extra columns, unsafe casts and nulls in non-nullable fields are errors)."""
    buf = io.BytesIO()
    pq.write_table(conform(table, schema), buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, order and types, or ValueError saying why not."""
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise ValueError(f"table does not match its schema: missing columns {missing}, extra columns {extra}")
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise ValueError(f"column {field.name!r} has {column.null_count} nulls but is not nullable")
        try:
            columns.append(column.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(
                f"column {field.name!r}: cannot cast {column.type} to {field.type}: {exc}"
            ) from exc
    return pa.Table.from_arrays(columns, schema=schema)
