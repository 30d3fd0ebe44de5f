"""The job kinds zfatlas runs: the one table of them, and validating a spec as its kind's.

Adding a kind is a package of its own (its spec, runner and tables, and a ``KIND`` in its
``__init__``) plus one line in :data:`KINDS`. Importing this module imports every kind's spec
but none of their runners (those import Ray and load only when a job runs).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from jobs.analyses.correspondence import kind as correspondence
from jobs.analyses.invariance import kind as invariance
from jobs.analyses.occlusion import kind as occlusion
from jobs.analyses.probe import kind as probe
from jobs.atlas import kind as atlas
from jobs.specs.base import SpecBase, SpecError
from jobs.specs.kind import JobKind
from jobs.specs.loading import apply_overrides, format_error, load_spec_dict
from jobs.train import kind as train

KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (train.KIND, atlas.KIND, occlusion.KIND, invariance.KIND, correspondence.KIND, probe.KIND)
}
SPEC_TYPES: dict[str, type[SpecBase]] = {name: kind.spec for name, kind in KINDS.items()}

JobSpec = Annotated[Union[tuple(SPEC_TYPES.values())], Field(discriminator="kind")]  # noqa: UP007
_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)


def job_kind(name: str) -> JobKind:
    """The kind called ``name``; :class:`SpecError` at ``kind`` (with the closest name) if none."""
    if isinstance(name, str) and name in KINDS:
        return KINDS[name]
    close = difflib.get_close_matches(str(name), list(KINDS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SpecError([f"kind: unknown kind {name!r}{hint}; one of {', '.join(KINDS)}"])


def parse_spec(data: dict[str, Any]) -> SpecBase:
    """Validate a spec dict as its kind's spec; raises :class:`SpecError` listing every problem."""
    if not isinstance(data, dict):
        raise SpecError([f"spec: expected a mapping of fields, got {type(data).__name__}"])
    if data.get("kind") is None:
        raise SpecError([f"kind: required field is missing; one of {', '.join(KINDS)}"])
    cls = job_kind(data["kind"]).spec
    try:
        # Validated with the concrete class so error paths read as in the file ("k", not "atlas.k").
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SpecError([format_error(cls, err) for err in exc.errors()]) from None


def load_spec(path_or_text: str | os.PathLike[str], overrides: Sequence[str] = ()) -> SpecBase:
    """Load and validate a spec file or spec text, applying ``field.path=value`` overrides."""
    return parse_spec(apply_overrides(load_spec_dict(path_or_text), overrides))


def schema(kind: str | None = None) -> dict[str, Any]:
    """JSON Schema of one kind, or of the whole union when ``kind`` is None or "all"."""
    if kind in (None, "all"):
        return _ADAPTER.json_schema()
    return job_kind(kind).spec.model_json_schema()
