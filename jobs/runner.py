"""Run any job spec: open its store, skip it if its run is already committed, else run and commit.

Runners are looked up by kind in :data:`RUNNERS` ("module:function") and imported only when used,
so validating a spec or running one kind never imports the others' dependencies. A runner is
``run(spec, store, run, *, quiet) -> dict``: it writes its files through ``run`` and returns the
fields to put in the manifest; committing is done here, after it returns, so a runner that raises
leaves its run uncommitted.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from jobs.spec import SpecBase, SpecError, spec_run_id
from jobs.store import Store
from jobs.uris import parse_uri

log = logging.getLogger(__name__)

RUNNERS: dict[str, str] = {
    "atlas": "jobs.atlas:run",
    "train": "jobs.train:run",
    "occlusion": "jobs.analysis:run_occlusion",
    "invariance": "jobs.analysis:run_invariance",
    "correspondence": "jobs.analysis:run_correspondence",
    "probe": "jobs.analysis:run_probe",
}

# Kinds whose runner resumes from what an uncommitted attempt left (train: its checkpoints); their
# leftovers are handed to the runner instead of deleted.
RESUMABLE_KINDS = frozenset({"train"})


class NoRunnerError(SpecError):
    """The spec is valid but this version of zfatlas cannot run its kind."""


def resolve_runner(kind: str) -> Callable[..., dict[str, Any]]:
    target = RUNNERS.get(kind)
    module_name, _, func = (target or "").partition(":")
    try:
        module = importlib.import_module(module_name) if target else None
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the runner exists but one of its own imports is missing: a real error
        module = None
    if module is None or not hasattr(module, func):
        raise NoRunnerError([f"kind: no runner for kind {kind!r} in this version"])
    return getattr(module, func)


# Set by Ray's job supervisor for the entrypoint of a job submitted through the Jobs API (our
# `zfatlas submit`, the scheduler, KubeRay's RayJob, `ray job submit`): JSON whose "metadata" holds
# the submission id under "job_submission_id". Ray has no public getter for the submission id
# (ray.get_runtime_context().get_job_id() is the internal driver id, not what `zfatlas jobs status`
# takes), so this variable is the one place to read it.
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_submission_id() -> str | None:
    """The Ray Jobs API submission id of the job this process is the entrypoint of, else None."""
    raw = os.environ.get(_RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        log.warning("ignoring an unreadable %s", _RAY_JOB_CONFIG_ENV)
        return None
    value = metadata.get("job_submission_id")
    return value if isinstance(value, str) and value else None


def run_location(spec: SpecBase, output: str | None = None) -> str:
    """Where ``spec``'s run lives (absolute path or s3:// URI of its folder)."""
    store = Store.from_uri(output or spec.output, spec.endpoint_url)
    return store.uri_of(store.run_prefix(spec.kind, spec_run_id(spec)))


def run_spec(spec: SpecBase, *, output: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run ``spec`` (``output`` overrides ``spec.output``) and return its committed manifest; a run
    already committed is not run again and its manifest is returned as it is."""
    kind = spec.kind
    runner = resolve_runner(kind)  # before touching the store: an unknown kind writes nothing
    if output:
        try:
            parse_uri(output)
        except ValueError as exc:
            raise SpecError([f"output: {exc}"]) from None
        spec = spec.model_copy(update={"output": output})  # the manifest records where it went
    store = Store.from_uri(spec.output, spec.endpoint_url)
    store.check()
    run_id = spec_run_id(spec)
    run = store.begin_run(kind, run_id, keep_leftovers=kind in RESUMABLE_KINDS)
    if run.already_committed:
        log.info("%s/%s is already committed at %s; nothing to do", kind, run_id, run.uri)
        return run.manifest or {}

    log.info("running %s/%s into %s", kind, run_id, run.uri)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    with run:
        fields = dict(runner(spec, store, run, quiet=quiet) or {})
        timings = dict(fields.pop("timings", None) or {})
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        return run.commit(
            {
                **fields,
                "spec": spec.model_dump(mode="json"),
                "run_id": run_id,
                "kind": kind,
                "name": spec.name,
                "started_at": started,
                "timings": timings,
                # Links the run to the Ray job that produced it (null when not run as a Ray job);
                # the job's metadata holds the run id the other way round (jobs/submit.py).
                "ray_job_id": ray_submission_id(),
            }
        )
