"""Building a spec's model: a zfcore variant, with weights from a checkpoint in any store."""

from __future__ import annotations

import io
import logging

import torch

from jobs.spec import ModelSpec
from jobs.store import fingerprint_bytes, read_uri_bytes
from zfcore.model import ZFNet

log = logging.getLogger(__name__)


def state_dict_of(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: a bare state_dict, or a training checkpoint's "model"."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or "classifier.fc8.weight" not in state:
        raise ValueError("checkpoint holds no ZFNet state_dict (expected key classifier.fc8.weight)")
    return state


def load_model(spec: ModelSpec, seed: int = 0, endpoint_url: str | None = None) -> tuple[ZFNet, str]:
    """The model in eval mode on the CPU, and its fingerprint (sha256 of the checkpoint, or of the
    variant and seed for a randomly initialized model)."""
    if spec.checkpoint is None:
        torch.manual_seed(seed)
        model = ZFNet(config=spec.config)
        return model.eval(), f"init:{spec.variant}:{model.config.num_classes}:seed={seed}"
    blob = read_uri_bytes(spec.checkpoint, endpoint_url)
    state = state_dict_of(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    num_classes = spec.num_classes or int(state["classifier.fc8.weight"].shape[0])
    model = ZFNet(config=spec.config.replace(num_classes=num_classes))
    model.load_state_dict(state)
    log.info("loaded %s weights from %s", spec.variant, spec.checkpoint)
    return model.eval(), fingerprint_bytes(blob)
