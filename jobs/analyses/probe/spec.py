"""The probe job's spec: the dataset the linear probes learn on, the layers, sizes and folds."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from jobs.specs.base import DatasetSpec, Int, LayerName, SpecBase, fill_default_layers, unique


class ProbeSpec(SpecBase):
    """Linear probes (Table 6): classifiers on frozen features of each layer, on another dataset."""

    kind: Literal["probe"] = "probe"
    probe_dataset: DatasetSpec = Field(
        default_factory=lambda: DatasetSpec(num_images=1000, seed=1),
        description="Dataset the probes are trained and tested on (default: procedural, seed 1).",
    )
    layers: list[LayerName] = Field(
        default_factory=list,
        min_length=1,
        description="Layers probed; default: every layer of the model.",
    )
    train_per_class: list[int] = Field(
        default_factory=lambda: [15, 30], min_length=1, description="Training images per class."
    )
    folds: Int = Field(5, ge=1, le=100, description="Random splits averaged.")
    classifiers: list[Literal["softmax", "svm"]] = Field(
        default_factory=lambda: ["softmax", "svm"], min_length=1
    )
    max_iter: Int = Field(
        100,
        ge=1,
        validation_alias=AliasChoices("max_iter", "epochs"),  # "epochs": its name before 0.2
        description="At most this many L-BFGS iterations per classifier fit (full-batch).",
    )
    include_random_init: bool = Field(True, description="Also probe an untrained network (baseline).")

    @field_validator("layers", "classifiers")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        return unique(value)

    @field_validator("train_per_class")
    @classmethod
    def _counts(cls, value: list[int]) -> list[int]:
        for i, n in enumerate(value):
            if n < 1:
                raise ValueError(f"item {i} is {n}; need at least 1 image per class")
        return unique(value)

    @model_validator(mode="after")
    def _default_layers(self) -> ProbeSpec:
        fill_default_layers(self, "layers", self.model.layer_names())
        return self
