"""Encoding what runs hold: PNG images and Parquet tables of a declared schema."""

from __future__ import annotations

import io
from collections.abc import Sequence

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


def warm_arrow() -> None:
    """pyarrow imports pandas on its first conversion of Python values (0.14 s on the 2-core
    benchmark machine): a process that will build tables does it while it starts, not inside its
    first piece of work."""
    pa.array([0])


def binary_column(arrays: Sequence[np.ndarray]) -> pa.Array:
    """Each array's bytes in C order as one value of a binary column, in one buffer (no bytes
    object per value: thousands of small images cross Ray and reach Parquet as one buffer)."""
    flat = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    return pa.BinaryArray.from_buffers(pa.binary(), len(flat), [None, *_packed(flat, np.uint8)])


def list_column(arrays: Sequence[np.ndarray], type: pa.DataType) -> pa.Array:
    """Each array's values in C order, converted to ``type``, as one list value (a list<float32>
    column of projections, say), in one buffer."""
    dtype = type.to_pandas_dtype()
    flat = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays]
    offsets, data = _packed(flat, dtype)
    return pa.ListArray.from_arrays(pa.Array.from_buffers(pa.int32(), len(flat) + 1, [None, offsets]),
                                    pa.Array.from_buffers(type, len(data) // type.byte_width, [None, data]))


def _packed(flat: Sequence[np.ndarray], dtype: type) -> tuple[pa.Buffer, pa.Buffer]:
    """int32 offsets (in elements) and the concatenation of 1-D ``flat`` arrays of ``dtype``."""
    offsets = np.zeros(len(flat) + 1, np.int64)
    np.cumsum([f.size for f in flat], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} values are more than one Arrow column chunk holds")
    data = np.concatenate(flat) if flat else np.empty(0, dtype)
    return pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)
