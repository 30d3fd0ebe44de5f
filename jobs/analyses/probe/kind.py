"""The probe job kind: its spec and how it runs (the driver is imported only when it runs, so
validating a spec or reading its tables never imports Ray)."""

from __future__ import annotations

from typing import Any

from jobs.analyses.probe.spec import ProbeSpec
from jobs.specs.kind import JobKind
from jobs.store import RunWriter


def _execute(spec: ProbeSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    from jobs.analyses.probe.driver import run_probe  # Ray is imported only when it runs

    return run_probe(spec, run, quiet=quiet)


KIND = JobKind("probe", ProbeSpec, _execute)
