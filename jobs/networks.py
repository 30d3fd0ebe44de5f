"""Building a spec's network: an architecture from zfcore, with weights from a checkpoint in any
store.

A checkpoint is a state_dict saved with ``torch.save`` (bare, or under ``"state_dict"`` or
``"model"`` as training scripts and zfatlas's own train job write it; DDP's ``module.`` prefix
and ``torch.compile``'s ``_orig_mod.`` are stripped) or a ``.safetensors`` file. Whether it fits
the architecture is checked by :func:`check_checkpoint` against the network built on the ``meta``
device (no memory, no init), so a driver finds a wrong checkpoint before any worker starts.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from jobs.specs.base import ModelSpec
from jobs.store import MissingKeyError, read_uri_bytes
from jobs.store.provenance import fingerprint_bytes
from zfcore import architectures
from zfcore.deconv import inspect, method_for
from zfcore.network import Preprocess, output_layer

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")
_SAFETENSORS = b'{"'  # a safetensors file: 8 bytes of header length, then a JSON header


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or does not fit the architecture (the message says how)."""


@dataclass(frozen=True)
class Checkpoint:
    state: dict[str, torch.Tensor]
    num_classes: int  # rows of the output layer's weight
    fingerprint: str  # sha256 of the file


def read_state_dict(blob: bytes, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights in a checkpoint file's bytes (see the module docstring for what is read)."""
    if name.endswith(".safetensors") or blob[8:10] == _SAFETENSORS:
        from safetensors.torch import load

        try:
            return dict(load(blob))
        except Exception as exc:
            raise CheckpointError(f"{name} is not a readable safetensors file: {exc}") from None
    try:
        loaded = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{name} is not a readable torch checkpoint: {first}") from None
    state = loaded
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors:
        raise CheckpointError(f"{name} holds no state_dict (a mapping of parameter names to tensors)")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _required(keys: set[str]) -> set[str]:
    """Keys a checkpoint must hold: all but BatchNorm's step counters (often not saved)."""
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def _dims(shape: torch.Size) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def fit_state_dict(arch: architectures.Architecture, state: dict[str, torch.Tensor], where: str,
                   num_classes: int | None = None) -> int:
    """The class count the checkpoint's weights give ``arch`` (``num_classes`` when given), or
    CheckpointError in one line naming the first few missing or unexpected keys and shape
    mismatches."""
    expected_module = arch.build_shapes()
    key = output_layer(expected_module) + ".weight"
    if key not in state:
        missing = sorted(_required(set(expected_module.state_dict()) - set(state)))
        raise CheckpointError(
            f"{where} is not a {arch.name} checkpoint: {len(missing)} of its keys are missing "
            f"({_few(missing)}); the file has {_few(sorted(state))}"
        )
    n = num_classes or int(state[key].shape[0])
    expected = {k: v.shape for k, v in arch.build_shapes(n).state_dict().items()}
    missing = sorted(_required(set(expected) - set(state)))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} ({_dims(state[k].shape)} in the file, {_dims(expected[k])} in the model)"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if shapes:
        problems.append(f"shapes differ for {_few(shapes, 2)}")
    if problems:
        raise CheckpointError(f"{where} does not fit {arch.name}: " + "; ".join(problems))
    return n


def checkpoint_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """The checkpoint file's bytes; :class:`CheckpointError` naming it if there is none."""
    try:
        return read_uri_bytes(uri, endpoint_url)
    except MissingKeyError:
        raise CheckpointError(f"checkpoint {uri} does not exist") from None


def check_checkpoint(spec: ModelSpec, endpoint_url: str | None = None) -> Checkpoint:
    """Read ``spec.checkpoint`` and check it fits the architecture (before any worker starts)."""
    if spec.checkpoint is None:
        raise ValueError("the model has no checkpoint")
    blob = checkpoint_bytes(spec.checkpoint, endpoint_url)
    state = read_state_dict(blob, spec.checkpoint)
    n = fit_state_dict(spec.config, state, spec.checkpoint, spec.num_classes)
    return Checkpoint(state, n, fingerprint_bytes(blob))


def load_model(
    spec: ModelSpec, seed: int = 0, endpoint_url: str | None = None, preprocess: Preprocess | None = None
) -> tuple[nn.Module, str]:
    """The model in eval mode on the CPU, with its Network (``preprocess``, default the spec's)
    attached, and its fingerprint: the checkpoint's sha256, or the architecture and seed for a
    randomly initialized model."""
    arch = spec.config
    preprocess = preprocess or spec.preprocessing()
    if spec.checkpoint is None:
        torch.manual_seed(seed)
        num_classes = spec.num_classes or arch.num_classes
        model = arch.build(num_classes, preprocess)
        return model.eval(), f"init:{spec.arch}:{num_classes}:seed={seed}"
    checkpoint = check_checkpoint(spec, endpoint_url)
    model = arch.build(checkpoint.num_classes, preprocess)
    model.load_state_dict(checkpoint.state, strict=False)  # num_batches_tracked may be absent
    log.info("loaded %s weights from %s", spec.arch, spec.checkpoint)
    return model.eval(), checkpoint.fingerprint


def preflight(
    spec: ModelSpec, preprocess: Preprocess, layers: Sequence[str], endpoint_url: str | None = None
) -> dict[str, Any]:
    """What the driver checks before any worker starts: the checkpoint fits the architecture, and
    the deconvnet can go down from every layer in ``layers``. Returns the manifest's ``deconvnet``
    field (per layer, the way down and the activations met; see :mod:`zfcore.deconv_graph`).
    Raises CheckpointError, DeconvError or ArchitectureError, each a one-line reason."""
    n = check_checkpoint(spec, endpoint_url).num_classes if spec.checkpoint else spec.num_classes
    arch = spec.config.at(preprocess.image_size)
    module = arch.build_shapes(n, preprocess)  # shapes only: no memory, no compute
    out: dict[str, Any] = {}
    for layer in layers:
        inversion = inspect(module, layer, preprocess.image_size)
        out[layer] = {
            "method": method_for(module, layer),
            "relus_rectified": inversion.rectified,
            "normalizations_skipped": inversion.normalizations_skipped,
            # No deconvnet rule in the paper for these: the signal goes down their gradient.
            "gradient_through": sorted(inversion.gradient_through),
        }
    return out
