"""Building a spec's network: an architecture from zfcore, with weights from a checkpoint in any
store (a bare state_dict, or a training checkpoint's ``"model"``)."""

from __future__ import annotations

import io
import logging

import torch
from torch import nn

from jobs.specs.base import ModelSpec
from jobs.store import read_uri_bytes
from jobs.store.provenance import fingerprint_bytes
from zfcore import architectures
from zfcore.network import output_layer

log = logging.getLogger(__name__)


def state_dict_of(checkpoint: dict, output_key: str) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: a bare state_dict, or a training checkpoint's "model"."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or output_key not in state:
        raise ValueError(f"checkpoint holds no state_dict of this architecture (expected key {output_key})")
    return state


def load_model(spec: ModelSpec, seed: int = 0, endpoint_url: str | None = None) -> tuple[nn.Module, str]:
    """The model in eval mode on the CPU, and its fingerprint (sha256 of the checkpoint, or of the
    architecture and seed for a randomly initialized model)."""
    arch = architectures.get(spec.variant)
    if spec.checkpoint is None:
        torch.manual_seed(seed)
        num_classes = spec.num_classes or arch.num_classes
        model = arch.build(num_classes)
        return model.eval(), f"init:{spec.variant}:{num_classes}:seed={seed}"
    blob = read_uri_bytes(spec.checkpoint, endpoint_url)
    with torch.device("meta"):  # the layout only: no memory, no init
        output_key = output_layer(arch.build()) + ".weight"
    state = state_dict_of(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True), output_key)
    model = arch.build(spec.num_classes or int(state[output_key].shape[0]))
    model.load_state_dict(state)
    log.info("loaded %s weights from %s", spec.variant, spec.checkpoint)
    return model.eval(), fingerprint_bytes(blob)
