"""Submitting a job spec to a Ray cluster through the Ray Jobs API.

The job carries its own code: the runtime_env ships the zfatlas packages (``py_modules``, put
first on the driver's and workers' PYTHONPATH) and a working directory holding nothing but the
normalized spec, and the entrypoint is the same ``zfatlas run`` a user types locally. So the
cluster runs exactly the submitter's version of the code against the cluster image's
dependencies (torch, Ray, ...), and ``zfatlas run``'s own rules apply: one run per spec, committed
by its manifest, a no-op when already committed.

The two ids find each other: the job's metadata holds the run id (``zfatlas_run_id``), and the
runner writes the job's submission id into the run's manifest (``ray_job_id``).
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.specs.base import SpecBase
from jobs.specs.loading import dump_yaml, spec_run_id
from jobs.store.provenance import CODE_VERSION_ENV, code_version
from jobs.submission.ray_jobs import KIND_KEY, RUN_ID_KEY, JobsAPIError, call, job_info, jobs_client
from jobs.uris import parse_uri

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

PACKAGES = ("zfcore", "jobs", "services", "zfatlas_cli")
SPEC_FILE = "spec.yaml"
SUBMISSION_FILE = "submission.json"  # makes each submission's working_dir its own (see submit)
# Never shipped, wherever the packages live (a checkout, site-packages).
EXCLUDES = ["__pycache__", "*.pyc", ".venv", "artifacts", ".git", ".pytest_cache", ".ruff_cache"]
# A head that has just (re)started answers "No available agent to submit job, please try again
# later" until its dashboard agent registers; that is worth waiting out, briefly.
AGENT_NOT_READY = "No available agent"
AGENT_WAIT_S = 30.0


class AlreadySubmittedError(JobsAPIError):
    """A job with this submission id already exists on the cluster (for the same run)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} was already submitted")


def package_dirs() -> list[str]:
    """Folders of the zfatlas packages of this process, as shipped in ``py_modules``."""
    root = Path(__file__).resolve().parents[2]
    return [str(root / name) for name in PACKAGES if (root / name / "__init__.py").is_file()]


def entrypoint() -> str:
    """The job's command, run in the working directory that holds the spec."""
    # -v: a failed job's log carries the traceback (the one-line reason alone is for terminals).
    return f"zfatlas -v run {shlex.quote(SPEC_FILE)} --quiet"


def _absolute(location: str | None) -> str | None:
    # A relative path would be resolved in the job's working directory (a temporary folder on the
    # head node); the submitter means its own current directory.
    if location is None or parse_uri(location).is_s3 or "://" in location:
        return location
    return str(Path(location).expanduser().absolute())


def prepare(spec: SpecBase, output: str | None = None) -> SpecBase:
    """The spec as the job will run it: ``output`` applied, the run id pinned (so the job computes
    the very id the submitter reports), and local paths made absolute."""
    if output:
        parse_uri(output)
        spec = spec.model_copy(update={"output": output})
    run_id = spec_run_id(spec)  # before paths change: the id is the one `zfatlas run` gives
    update: dict[str, Any] = {"run_id": run_id, "output": _absolute(spec.output)}
    update["model"] = spec.model.model_copy(update={"checkpoint": _absolute(spec.model.checkpoint)})
    for name in ("dataset", "probe_dataset"):
        dataset = getattr(spec, name, None)
        if dataset is not None:
            update[name] = dataset.model_copy(update={"uri": _absolute(dataset.uri)})
    return spec.model_copy(update=update)


def runtime_env(spec_dir: str, py_modules: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "working_dir": spec_dir,
        # zfatlas's own packages, then the user's (a model factory named by model.arch).
        "py_modules": package_dirs() + [str(Path(p).resolve()) for p in py_modules],
        "excludes": list(EXCLUDES),
        # The shipped modules are no git checkout: carry this checkout's version into the manifest.
        "env_vars": {CODE_VERSION_ENV: json.dumps(code_version())},
    }


def submit(
    spec: SpecBase,
    address: str | None = None,
    *,
    output: str | None = None,
    submission_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    client: JobSubmissionClient | None = None,
    py_modules: Sequence[str] = (),
) -> str:
    """Submit ``spec`` (already validated) and return the Ray job's submission id. ``py_modules``:
    package folders shipped with the job (importable on the driver and every worker).

    ``submission_id`` defaults to one Ray generates. When it is given and a job with that id
    already exists for the same run, :class:`AlreadySubmittedError` is raised: Ray refuses a
    second job with one submission id, which is what makes a scheduler's submission idempotent.
    """
    job = prepare(spec, output)
    run_id = job.run_id or spec_run_id(job)
    tags = {**(metadata or {}), RUN_ID_KEY: run_id, KIND_KEY: job.kind, "zfatlas_name": job.name}
    client = client or jobs_client(address)
    with tempfile.TemporaryDirectory(prefix="zfatlas-submit-") as spec_dir:
        Path(spec_dir, SPEC_FILE).write_text(dump_yaml(job), encoding="utf-8")
        # Ray names a working_dir package by its content's hash and shares one unpacked folder
        # between jobs of the same content; a nonce keeps every submission's folder its own.
        nonce = json.dumps({"nonce": uuid.uuid4().hex})
        Path(spec_dir, SUBMISSION_FILE).write_text(nonce, encoding="utf-8")
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                # The runtime_env's folders are zipped and uploaded here, before the call returns.
                job_id = call(
                    lambda: client.submit_job(
                        entrypoint=entrypoint(),
                        runtime_env=runtime_env(spec_dir, py_modules),
                        metadata=tags,
                        submission_id=submission_id,
                    )
                )
                break
            except JobsAPIError as exc:
                if AGENT_NOT_READY in str(exc) and time.monotonic() < deadline:
                    log.info("the cluster's job agent is not ready yet; submitting again in 3 s")
                    time.sleep(3.0)
                    continue
                if submission_id is not None:
                    _raise_if_duplicate(client, submission_id, run_id)
                raise
    log.info("submitted %s/%s as Ray job %s", job.kind, run_id, job_id)
    return str(job_id)


def _raise_if_duplicate(client: JobSubmissionClient, submission_id: str, run_id: str) -> None:
    try:
        existing = job_info(client, submission_id)
    except JobsAPIError:
        return  # no such job: the submission failed for another reason, reported by the caller
    if existing.run_id != run_id:
        raise JobsAPIError(
            f"submission id {submission_id!r} is taken by another job (run {existing.run_id!r})"
        )
    raise AlreadySubmittedError(submission_id)
