"""What a job kind is: its spec class, the function that runs it, and how it treats leftovers.

Each kind's package defines one :class:`JobKind` (``jobs/atlas/__init__.py``, ...); the table of
all of them is :data:`jobs.kinds.KINDS`, the one place that lists the kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs.specs.base import SpecBase

#: ``execute(spec, run, quiet=...)`` writes the job's files through ``run`` (a RunWriter) and
#: returns the fields to put in the manifest; :func:`jobs.runner.run_spec` commits.
Execute = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class JobKind:
    name: str
    spec: type[SpecBase]
    execute: Execute
    #: The runner resumes from what an uncommitted attempt left (train: its checkpoints), so
    #: those files are handed to it instead of deleted.
    resumable: bool = False
