"""The occlusion job's spec: which layer's strongest map to follow, the occluder and its steps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jobs.specs.base import Int, LayerName, SpecBase, field_error


class OcclusionSpec(SpecBase):
    """Occlusion sensitivity (Fig. 7): slide a grey patch and record the response."""

    kind: Literal["occlusion"] = "occlusion"
    layer: LayerName | None = Field(
        None, description="Layer whose strongest feature map is tracked; default: the last conv layer."
    )
    patch: Int = Field(16, ge=1, description="Occluder side in pixels.")
    stride: Int = Field(4, ge=1, description="Occluder step in pixels.")
    images: Int = Field(8, ge=1, le=10_000, description="Number of images analysed.")
    fill: Literal["grey", "mean"] = Field("grey", description="Occluder colour.")

    @model_validator(mode="after")
    def _patch_fits(self) -> OcclusionSpec:
        if self.layer is None:
            self.layer = self.model.config.spatial_layers[-1]  # the paper's layer 5
        if self.patch > self.image_size:
            # Raised here (not in a field validator) because image_size comes from other fields.
            raise field_error("patch", f"{self.patch} is larger than the {self.image_size}px images")
        return self
