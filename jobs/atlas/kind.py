"""The atlas job kind: its spec and how it runs (the driver is imported only when it runs, so
validating a spec or reading its tables never imports Ray)."""

from __future__ import annotations

from typing import Any

from jobs.atlas.spec import AtlasSpec
from jobs.specs.kind import JobKind
from jobs.store import RunWriter


def _execute(spec: AtlasSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    from jobs.atlas.driver import build_atlas  # Ray is imported only when an atlas runs

    return build_atlas(spec, run, quiet=quiet)


KIND = JobKind("atlas", AtlasSpec, _execute)
