"""Run any job spec: open its store, skip it if its run is already committed, else run and commit.

The kind's ``execute`` (:data:`jobs.kinds.KINDS`) writes its files through the run and returns the
fields to put in the manifest; committing is done here, after it returns, so a runner that raises
leaves its run uncommitted.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

from jobs.kinds import job_kind
from jobs.specs.base import SpecBase, SpecError
from jobs.specs.loading import spec_run_id
from jobs.store import RunWriter, StoreError, begin_run, open_store, run_prefix
from jobs.uris import parse_uri

log = logging.getLogger(__name__)


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
    store = open_store(output or spec.output, spec.endpoint_url)
    return store.uri_of(run_prefix(spec.kind, spec_run_id(spec)))


def run_spec(
    spec: SpecBase, *, output: str | None = None, quiet: bool = False, wait_s: float = 0.0
) -> dict[str, Any]:
    """Run ``spec`` (``output`` overrides ``spec.output``) and return its committed manifest; a run
    already committed is not run again and its manifest is returned as it is. A run another
    writer holds (:mod:`jobs.store.lease`) is waited for up to ``wait_s``, then
    :class:`jobs.store.lease.RunBusyError` names the holder."""
    kind = job_kind(spec.kind)  # before touching the store: an unknown kind writes nothing
    if output:
        try:
            parse_uri(output)
        except ValueError as exc:
            raise SpecError([f"output: {exc}"]) from None
        spec = spec.model_copy(update={"output": output})  # the manifest records where it went
    store = open_store(spec.output, spec.endpoint_url)
    store.check()
    run_id = spec_run_id(spec)
    holder = {"ray_job_id": ray_submission_id(), "run": f"{kind.name}/{run_id}"}
    run = begin_run(store, kind.name, run_id, keep_leftovers=kind.resumable, wait_s=wait_s, holder=holder)
    if run.already_committed:
        log.info("%s/%s is already committed at %s; nothing to do", kind.name, run_id, run.uri)
        return run.manifest or {}

    log.info("running %s/%s into %s", kind.name, run_id, run.uri)
    try:
        return _execute(kind, spec, run, run_id, quiet)
    except Exception as exc:
        full = _no_space(exc)
        if full is None:
            raise
        where = full.filename or run.uri
        left = {True: "the files of this attempt were removed",
                False: f"remove what this attempt left at {run.uri}",
                None: f"what it wrote is kept at {run.uri} for the next attempt to resume from"}
        what = left[run.removed_after_failure]
        raise StoreError(f"no space left on the device writing {where}; {what}") from exc


def _no_space(exc: BaseException) -> OSError | None:
    """The full-disk error behind ``exc``: itself, or the one a worker raised (Ray's error for a
    worker's exception keeps it as ``cause``)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def _execute(kind: Any, spec: SpecBase, run: RunWriter, run_id: str, quiet: bool) -> dict[str, Any]:
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    with run:
        fields = dict(kind.execute(spec, run, quiet=quiet) or {})
        timings = dict(fields.pop("timings", None) or {})
        total = time.perf_counter() - t0
        if "startup_s" in timings and "total_s" in timings:
            # What ran before the kind's own clock (importing its module: Ray, torch; 0.27 s for
            # the atlas) is start-up too, so total - startup is the phases' time.
            timings["startup_s"] += total - timings["total_s"]
        timings["total_s"] = round(total, 3)
        return run.commit(
            {
                **fields,
                "spec": spec.model_dump(mode="json"),
                "run_id": run_id,
                "kind": kind.name,
                "name": spec.name,
                "started_at": started,
                "timings": timings,
                # Links the run to the Ray job that produced it (null when not run as a Ray job);
                # the job's metadata holds the run id the other way round (jobs/submission/submit.py).
                "ray_job_id": ray_submission_id(),
            }
        )
