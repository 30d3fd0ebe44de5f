"""The invariance job kind: its spec and how it runs (the driver is imported only when it runs, so
validating a spec or reading its tables never imports Ray)."""

from __future__ import annotations

from typing import Any

from jobs.analyses.invariance.spec import InvarianceSpec
from jobs.specs.kind import JobKind
from jobs.store import RunWriter


def _execute(spec: InvarianceSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    from jobs.analyses.invariance.driver import run_invariance  # Ray is imported only when it runs

    return run_invariance(spec, run, quiet=quiet)


KIND = JobKind("invariance", InvarianceSpec, _execute)
