"""The atlas job's spec: which layers to scan, how many top activations to keep, and how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.specs.base import Int, LayerName, SpecBase, fill_default_layers, unique


class AtlasSpec(SpecBase):
    """Top-k activations per channel over a dataset, projected to pixels with the deconvnet."""

    kind: Literal["atlas"] = "atlas"
    layers: list[LayerName] = Field(
        default_factory=list,
        min_length=1,
        description="Layers to scan; default: every conv layer of the model.",
    )
    k: Int = Field(9, ge=1, le=100, description="Top activations kept per channel (paper: 9).")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Scan precision; selected images are re-scored and projected in fp32."
    )
    shard_size: Int = Field(512, ge=1, description="Images per shard (unit of work and of retry).")
    project: bool = Field(True, description="Deconvnet projections of every top activation.")
    max_retries: Int = Field(3, ge=0, description="Retries of a failed shard.")

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, value: list[str]) -> list[str]:
        return unique(value)

    @model_validator(mode="after")
    def _default_layers(self) -> AtlasSpec:
        fill_default_layers(self, "layers", self.model.config.spatial_layers)
        return self
