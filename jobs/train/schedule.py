"""The learning-rate schedule of a train spec, stepped once per epoch.

- ``step``: multiply by ``gamma`` every ``step_size`` epochs.
- ``plateau``: the paper's manual annealing made automatic: multiply by ``gamma`` when the
  validation top-1 error (the training loss without a validation split) has not improved for
  :data:`PLATEAU_PATIENCE` epochs.
- ``cosine``: from ``lr`` down to 0 over the run's epochs.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, ReduceLROnPlateau, StepLR

from jobs.train.spec import TrainSpec

PLATEAU_PATIENCE = 2  # epochs without improvement before the rate drops


def make_scheduler(spec: TrainSpec, optimizer: torch.optim.Optimizer) -> LRScheduler | ReduceLROnPlateau:
    if spec.schedule == "step":
        return StepLR(optimizer, step_size=spec.step_size, gamma=spec.gamma)
    if spec.schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=spec.epochs)
    if spec.gamma >= 1:
        raise ValueError("schedule 'plateau' needs gamma < 1 (the factor the rate is cut by)")
    return ReduceLROnPlateau(optimizer, mode="min", factor=spec.gamma, patience=PLATEAU_PATIENCE)


def step_schedule(
    scheduler: LRScheduler | ReduceLROnPlateau, val_top1_error: float | None, train_loss: float
) -> None:
    """Advance the schedule after an epoch."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_top1_error if val_top1_error is not None else train_loss)
    else:
        scheduler.step()
