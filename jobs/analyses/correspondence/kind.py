"""The correspondence job kind: its spec and how it runs (the driver is imported only when it runs, so
validating a spec or reading its tables never imports Ray)."""

from __future__ import annotations

from typing import Any

from jobs.analyses.correspondence.spec import CorrespondenceSpec
from jobs.specs.kind import JobKind
from jobs.store import RunWriter


def _execute(spec: CorrespondenceSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    from jobs.analyses.correspondence.driver import run_correspondence  # Ray is imported only when it runs

    return run_correspondence(spec, run, quiet=quiet)


KIND = JobKind("correspondence", CorrespondenceSpec, _execute)
