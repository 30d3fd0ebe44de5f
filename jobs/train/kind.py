"""The train job kind: its spec and how it runs (the driver is imported only when it runs, so
validating a spec or reading its tables never imports Ray)."""

from __future__ import annotations

from typing import Any

from jobs.specs.kind import JobKind
from jobs.store import RunWriter
from jobs.train.spec import TrainSpec


def _execute(spec: TrainSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    from jobs.train.driver import train  # Ray Train is imported only when training runs

    return train(spec, run, quiet=quiet)


# Resumable: a re-run after a crash continues from the uncommitted run's checkpoints.
KIND = JobKind("train", TrainSpec, _execute, resumable=True)
