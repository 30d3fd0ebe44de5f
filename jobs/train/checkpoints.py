"""Training checkpoints inside a run: where they go, which one is the latest, save and load.

A run's checkpoints are ``checkpoints/epoch-NNNN.pt`` (every N epochs) and ``checkpoints/final.pt``
(the end of training), each a ``torch.save`` dict that :func:`jobs.networks.load_model` reads as a
model (its ``"model"`` entry). ``checkpoints/latest.json`` names the newest complete one; it is
written after the checkpoint file, and both writes are atomic in every store, so the pointer never
names a partial file. Restarted workers and re-runs of a crashed spec read the pointer, so resuming
needs no listing and works the same on a local folder and on S3.

The pointer also records which spec wrote it (:func:`spec_digest`): a run id reused with another
spec (an explicit ``run_id``) never resumes from weights trained for something else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Any

import torch

from jobs.specs.base import SpecBase
from jobs.specs.loading import canonical_json
from jobs.store import MissingKeyError, RunWriter

log = logging.getLogger(__name__)

LATEST = "checkpoints/latest.json"
FINAL = "checkpoints/final.pt"


def epoch_key(epoch: int) -> str:
    """Run-relative key of the checkpoint taken after ``epoch``."""
    return f"checkpoints/epoch-{epoch:04d}.pt"


def spec_digest(spec: SpecBase) -> str:
    """Identity of what is being trained: the normalized spec, without where it is stored."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def latest_checkpoint(run: RunWriter, digest: str) -> dict[str, Any] | None:
    """The pointer to the newest checkpoint of ``run`` (see :func:`save_checkpoint`), or None
    when there is none or it was written for another spec."""
    try:
        pointer = run.store.get_json(run.key(LATEST))
    except MissingKeyError:
        return None
    if pointer.get("digest") != digest:
        log.warning("ignoring checkpoints in %s: they were written for another spec", run.uri)
        return None
    return pointer


def save_checkpoint(run: RunWriter, relkey: str, state: dict[str, Any], digest: str) -> dict[str, Any]:
    """Write ``state`` to ``relkey`` in the run, then point :data:`LATEST` at it. Returns the
    pointer: {"key", "epoch", "step", "digest", "sha256", "bytes"} (the file's hash and size)."""
    fd, tmp = tempfile.mkstemp(suffix=".pt", prefix="zfatlas-ckpt-")
    os.close(fd)
    try:
        torch.save(state, tmp)
        sha = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        size = os.path.getsize(tmp)
        run.put_file(relkey, tmp)
    finally:
        os.unlink(tmp)
    pointer = {
        "key": relkey, "epoch": int(state["epoch"]), "step": int(state["step"]), "digest": digest,
        "sha256": sha.hexdigest(), "bytes": size,
    }
    run.put_json(LATEST, pointer)
    log.info("checkpoint after epoch %d (step %d): %s", pointer["epoch"], pointer["step"], run.key(relkey))
    return pointer


def load_checkpoint(run: RunWriter, relkey: str) -> dict[str, Any]:
    """A checkpoint of ``run``, tensors on the CPU (read through a temp file: checkpoints of the
    paper's network are hundreds of MB)."""
    fd, tmp = tempfile.mkstemp(suffix=".pt", prefix="zfatlas-ckpt-")
    os.close(fd)
    try:
        run.store.get_file(run.key(relkey), tmp)
        return torch.load(tmp, map_location="cpu", weights_only=True)
    finally:
        os.unlink(tmp)
