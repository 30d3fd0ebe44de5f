"""The device a worker computes on, and getting uint8 images onto it. No Ray here: the actors,
Ray Train's workers and the benchmarks use the same functions."""

from __future__ import annotations

import numpy as np
import torch

from zfcore.data import to_tensor
from zfcore.network import Preprocess


def torch_threads(num_cpus: float) -> int:
    """Intra-op threads for a worker holding ``num_cpus`` (at least one)."""
    return max(1, int(num_cpus))


def pick_device() -> torch.device:
    """CUDA when this process sees a GPU, else the CPU (also on clusters whose GPUs are only
    declared, like the test cluster's)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on GPU (tensor-core convolutions), the default layout on CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def tune_convolutions(device: torch.device) -> None:
    """On GPU, let cuDNN pick the fastest convolution algorithms (input shapes are fixed)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def to_device(
    images: np.ndarray | torch.Tensor, device: torch.device, preprocess: Preprocess | None = None
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) on ``device``, normalized with the preprocessing's
    mean and std (default: the project's); the copy is uint8 (4x less traffic) and asynchronous
    from pinned memory on GPU. A tensor (images decoded on the device) is used where it is."""
    if isinstance(images, torch.Tensor):
        t = images.to(device)
    else:
        t = torch.from_numpy(np.ascontiguousarray(images))
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
    norm = (preprocess.mean, preprocess.std) if preprocess is not None else ()
    return to_tensor(t, *norm).contiguous(memory_format=memory_format(device))
