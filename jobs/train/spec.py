"""The train job's spec: the paper's recipe (SGD, momentum, filter renormalization) and its knobs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from jobs.specs.base import Float, Int, SpecBase, unique


class TrainSpec(SpecBase):
    """Train a network with the paper's recipe (SGD, momentum, filter renormalization)."""

    kind: Literal["train"] = "train"
    epochs: Int = Field(10, ge=1, le=10_000)
    lr: Float = Field(0.01, gt=0, le=10, description="Initial learning rate (paper: 1e-2).")
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(5e-4, ge=0, le=1)
    schedule: Literal["step", "plateau", "cosine"] = Field(
        "step",
        description="step: multiply lr by gamma every step_size epochs; plateau: when "
        "validation error stops improving (the paper's manual annealing); cosine: to 0.",
    )
    step_size: Int = Field(30, ge=1, description="Epochs between lr steps (schedule 'step').")
    gamma: Float = Field(0.1, gt=0, le=1, description="lr multiplier at each step / plateau.")
    renorm_radius: Float | None = Field(
        0.1, gt=0, description="Renormalize conv filters whose RMS exceeds this (paper: 0.1); null: off."
    )
    checkpoint_every_epochs: Int = Field(1, ge=1)
    evolution_epochs: list[Int] = Field(
        [1, 2, 5, 10, 20, 30, 40, 64],
        description="Epochs at which to snapshot top activations (Fig. 4); those beyond epochs are skipped.",
    )
    evolution_channels: Int = Field(8, ge=1, description="Channels per layer tracked for Fig. 4.")
    probe_images: Int = Field(64, ge=1, description="Fixed images scanned at each evolution epoch.")
    val_fraction: Float = Field(0.1, ge=0, lt=1, description="Share of the dataset held out.")
    augment: bool = Field(True, description="Random crops and horizontal flips.")
    precision: Literal["fp32", "bf16"] = "fp32"
    max_failures: Int = Field(2, ge=0, description="Worker failures tolerated (resume from checkpoint).")

    @field_validator("evolution_epochs")
    @classmethod
    def _positive_sorted(cls, value: list[int]) -> list[int]:
        for i, epoch in enumerate(value):
            if epoch < 1:
                raise ValueError(f"epoch numbers start at 1 (item {i} is {epoch})")
        return sorted(unique(value))
