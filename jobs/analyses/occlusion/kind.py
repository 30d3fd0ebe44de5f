"""The occlusion job kind: its spec and how it runs (the driver is imported only when it runs, so
validating a spec or reading its tables never imports Ray)."""

from __future__ import annotations

from typing import Any

from jobs.analyses.occlusion.spec import OcclusionSpec
from jobs.specs.kind import JobKind
from jobs.store import RunWriter


def _execute(spec: OcclusionSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    from jobs.analyses.occlusion.driver import run_occlusion  # Ray is imported only when it runs

    return run_occlusion(spec, run, quiet=quiet)


KIND = JobKind("occlusion", OcclusionSpec, _execute)
