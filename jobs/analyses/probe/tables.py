"""The probe job's tables (docs/schemas.md, "Analyses"); no Ray here."""

from __future__ import annotations

import pyarrow as pa

PROBE_SCORES_SCHEMA = pa.schema(
    [
        pa.field("network", pa.string(), nullable=False),
        pa.field("classifier", pa.string(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("train_per_class", pa.int32(), nullable=False),
        pa.field("fold", pa.int32(), nullable=False),
        pa.field("accuracy", pa.float64(), nullable=False),
        pa.field("n_train", pa.int32(), nullable=False),
        pa.field("n_test", pa.int32(), nullable=False),
        pa.field("feature_dim", pa.int32(), nullable=False),
    ]
)

PROBE_TABLE_SCHEMA = pa.schema(
    [
        pa.field("network", pa.string(), nullable=False),
        pa.field("classifier", pa.string(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("train_per_class", pa.int32(), nullable=False),
        pa.field("accuracy_mean", pa.float64(), nullable=False),
        pa.field("accuracy_std", pa.float64(), nullable=False),
        pa.field("folds", pa.int32(), nullable=False),
        pa.field("paper_caltech101", pa.float64(), nullable=True),
        pa.field("paper_caltech256", pa.float64(), nullable=True),
    ]
)
