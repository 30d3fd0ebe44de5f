"""The correspondence job's spec: the images, the parts masked in each, and the random baseline."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from jobs.specs.base import Int, LayerName, SpecBase, field_error, fill_default_layers, unique

Box = tuple[int, int, int, int]


class CorrespondenceSpec(SpecBase):
    """Correspondence analysis (Table 1): mask the same part in several images and compare."""

    kind: Literal["correspondence"] = "correspondence"
    layers: list[LayerName] = Field(
        default_factory=list,
        min_length=1,
        description="Layers compared; default: the last conv layer and the last fully connected one "
        "(the paper's layers 5 and 7).",
    )
    images: list[str] = Field(
        default_factory=list,
        description="Image ids. Empty with a procedural dataset: the first 5 images, with one part "
        "'object' taken from each image's object box.",
    )
    parts: dict[str, list[Box]] = Field(
        default_factory=dict,
        description="Part name -> one (top, left, height, width) box per image, in the order of images.",
    )
    random_masks: Int = Field(5, ge=0, description="Random-mask baselines per image.")
    mask_size: Int = Field(12, ge=1, description="Side of the random masks in pixels.")

    @field_validator("images")
    @classmethod
    def _imagesunique(cls, value: list[str]) -> list[str]:
        return unique(value)

    @field_validator("parts")
    @classmethod
    def _boxes(cls, value: dict[str, list[Box]], info: ValidationInfo) -> dict[str, list[Box]]:
        images = info.data.get("images")
        for part, boxes in value.items():
            if images is not None and len(boxes) != len(images):
                raise field_error(part, f"{len(boxes)} boxes for {len(images)} images; need one per image")
            for i, (top, left, height, width) in enumerate(boxes):
                if top < 0 or left < 0 or height < 1 or width < 1:
                    raise field_error(f"{part}.{i}", "top and left must be >= 0, height and width >= 1")
        return value

    @model_validator(mode="after")
    def _checks(self) -> CorrespondenceSpec:
        arch = self.model.config
        fill_default_layers(self, "layers", [arch.spatial_layers[-1], *arch.vector_layers[-1:]])
        for field in ("images", "parts"):
            if self.dataset.format != "procedural" and not getattr(self, field):
                raise field_error(field, "required unless the dataset is procedural")
        if self.parts and not self.images:
            raise field_error("images", "required when parts are given")
        size = self.image_size
        for part, boxes in self.parts.items():
            for i, (top, left, height, width) in enumerate(boxes):
                if top + height > size or left + width > size:
                    raise field_error(f"parts.{part}.{i}", f"box extends past the {size}px image")
        if self.mask_size > size:
            raise field_error("mask_size", f"{self.mask_size} is larger than the {size}px images")
        return self
