"""The invariance job's spec: the layers compared and the sweeps of shifts, scales and rotations."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.specs.base import Float, Int, LayerName, SpecBase, field_error, fill_default_layers, unique


class InvarianceSpec(SpecBase):
    """Invariance curves (Fig. 5): feature distance and class probability under transformations."""

    kind: Literal["invariance"] = "invariance"
    layers: list[LayerName] = Field(
        default_factory=list,
        min_length=1,
        description="Layers compared; default: the first layer and the last fully connected one "
        "(the paper's layers 1 and 7).",
    )
    images: Int = Field(5, ge=1, le=1000, description="Number of images transformed.")
    translations: list[Int] = Field(
        default_factory=lambda: list(range(-16, 17, 4)),
        description="Vertical shifts in pixels (the paper's -60..60 at 224px, scaled to 64px).",
    )
    scales: list[Float] = Field(
        default_factory=lambda: [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4],
        description="Scale factors.",
    )
    rotations: list[Float] = Field(
        default_factory=lambda: [float(d) for d in range(0, 360, 10)], description="Degrees."
    )

    @field_validator("layers")
    @classmethod
    def _layersunique(cls, value: list[str]) -> list[str]:
        return unique(value)

    @field_validator("scales")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        for i, s in enumerate(value):
            if not 0 < s <= 10:
                raise ValueError(f"scale factors must be in (0, 10] (item {i} is {s})")
        return value

    @field_validator("rotations")
    @classmethod
    def _degrees(cls, value: list[float]) -> list[float]:
        for i, r in enumerate(value):
            if not -360 <= r <= 360:
                raise ValueError(f"rotations are degrees in [-360, 360] (item {i} is {r})")
        return value

    @model_validator(mode="after")
    def _checks(self) -> InvarianceSpec:
        arch = self.model.config
        default = list(dict.fromkeys([arch.layer_names[0], *arch.vector_layers[-1:]]))
        fill_default_layers(self, "layers", default)
        size = self.image_size
        for i, t in enumerate(self.translations):
            if abs(t) >= size:
                raise field_error(f"translations.{i}", f"{t} moves the image out of the {size}px frame")
        return self
