"""One training step on a worker's device: zfcore's plain step, placed and measured.

:func:`zfcore.training.train_step` is the step (forward, loss, backward, SGD update); this
module puts its inputs on the worker's device (uint8 over the bus, channels-last on GPU), runs the
forward pass under bf16 autocast when asked, renormalizes the filters of the unwrapped network
after the step and counts top-1/top-5 hits from the logits that step computed. Nothing here knows
about Ray: the train job's workers and the benchmark drive it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from jobs.runtime.device import to_device
from zfcore.network import Preprocess
from zfcore.renorm import renormalize_filters
from zfcore.training import augment, train_step


class Autocast(nn.Module):
    """Runs ``model``'s forward pass under bf16 autocast and returns fp32 logits, so the loss and
    the backward pass of the plain step stay outside autocast, as PyTorch recommends."""

    def __init__(self, model: nn.Module, device_type: str) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


def with_precision(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """``model`` itself for fp32, wrapped in :class:`Autocast` for bf16."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
    return Autocast(model, device.type) if precision == "bf16" else model


@dataclass
class StepResult:
    loss: float
    images: int
    top1: int  # hits among the batch's labels
    top5: int
    rescaled: int  # conv filters renormalized after the step


class TrainStepper:
    """Runs the plain step for one worker.

    ``network`` is the unwrapped network (renormalization, hooks, checkpoints); ``forward``
    is what the step calls: the same network, possibly wrapped for precision and for data
    parallelism (DDP), which share its parameters.
    """

    def __init__(
        self,
        network: nn.Module,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        *,
        renorm_radius: float | None,
        augment_images: bool,
        generator: torch.Generator,
        preprocess: Preprocess | None = None,
    ) -> None:
        self.network = network
        self.forward = forward
        self.optimizer = optimizer
        self.device = device
        self.renorm_radius = renorm_radius
        self.augment_images = augment_images
        self.generator = generator
        self.preprocess = preprocess
        self._logits: torch.Tensor | None = None
        # The step returns only the loss; the hook keeps the logits it computed, so train error
        # costs no second forward pass.
        network.register_forward_hook(self._keep_logits)

    def _keep_logits(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._logits = output.detach()

    def step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        x = to_device(images, self.device, self.preprocess)
        if self.augment_images:
            x = augment(x, self.generator)
        y = torch.from_numpy(labels).to(self.device, non_blocking=True)
        loss = train_step(self.forward, self.optimizer, x, y, renorm_radius=None)
        rescaled = renormalize_filters(self.network, self.renorm_radius) if self.renorm_radius else 0
        top1, top5 = hits(self._logits, y)
        return StepResult(loss, len(labels), top1, top5, rescaled)


def hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many labels are the top-1 and among the top-5 classes of ``logits`` (B, C)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(dim=1).sum())
