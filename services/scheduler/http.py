"""HTTP endpoints for submission and schedules: ``router``, mounted in ``zfatlas serve``'s server
(:func:`services.server.create_server`) and by ``zfatlas scheduler serve``.

- ``/api/jobs``: submit a spec to the Ray cluster, list jobs, one job's status, logs, stop.
- ``/api/schedules``: add, list (with next fire times), pause, resume, remove, history.

Mutating endpoints need the API's bearer token (:func:`services.http.security.require_token`);
reads follow :func:`services.http.security.require_read_access` (open on loopback). The database
and the cluster come from ``app.state.scheduler`` (a :class:`SchedulerService`), created from the
``ZFATLAS_SCHEDULER_*`` environment on first use when the app has none.

What is submitted over HTTP (a job, a schedule's template) writes to the server's ``store`` unless
it names an output, which must then be inside ``store`` or one of ``allowed_outputs``; it may
name only an S3 endpoint this process would send credentials to
(:func:`jobs.store.s3.endpoint_allowed`). Anything else is 422 before the cluster is asked, and so
are unknown fields in a body.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from jobs.kinds import parse_spec
from jobs.specs.base import SpecBase, SpecError
from jobs.specs.loading import apply_overrides, spec_run_id
from jobs.submission.ray_jobs import (
    JobNotFoundError,
    JobsAPIError,
    job_info,
    job_logs,
    jobs_client,
    list_jobs,
    stop_job,
)
from jobs.submission.submit import prepare, submit
from jobs.uris import parse_uri
from services.http.security import app_settings, require_read_access, require_token
from services.http.settings import Settings
from services.scheduler.db import ScheduleExistsError, ScheduleNotFoundError
from services.scheduler.model import ScheduleConfig
from services.scheduler.service import SchedulerService
from services.scheduler.template import check_template

_NAME = r"^[a-z0-9][a-z0-9-_]*$"
_JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_INIT_LOCK = threading.Lock()

router = APIRouter()


def scheduler_service(request: Request) -> SchedulerService:
    service = getattr(request.app.state, "scheduler", None)
    if service is None:
        with _INIT_LOCK:
            service = getattr(request.app.state, "scheduler", None)
            if service is None:
                service = SchedulerService()
                request.app.state.scheduler = service
    return service


class SubmitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt "overides" must not be silently ignored

    spec: dict[str, Any] = Field(..., description="A job spec, as in a spec file.")
    overrides: list[str] = Field(default_factory=list, description="field.path=value overrides.")
    output: str | None = Field(None, description="Artifact store to use instead of the spec's output.")


class SubmitOut(BaseModel):
    job_id: str
    run_id: str
    kind: str


def _spec_problems(problems: list[str]) -> JSONResponse:
    return JSONResponse(
        {"detail": "; ".join(problems), "problems": problems},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


def _with_output(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``spec`` writing to the server's store when it names no output of its own (local stores as
    absolute paths: the job, or the scheduler loop that submits it, may run in another folder)."""
    if "output" in spec:
        return spec
    location = parse_uri(settings.store)
    store = settings.store if location.is_s3 else str(location.local_path().absolute())
    return {**spec, "output": store}


def _where_it_goes(job: SpecBase, settings: Settings, field: str = "") -> list[str]:
    """Problems with where a job submitted over HTTP would write and which S3 endpoint it would
    send credentials to (``job`` as :func:`jobs.submission.submit.prepare` made it)."""
    from jobs.store.s3 import ENDPOINTS_ENV, endpoint_allowed  # boto3: only when a job is submitted

    problems = []
    if not settings.output_allowed(job.output):
        problems.append(
            f"{field}output: {job.output} is outside this server's store ({settings.store}); jobs "
            "submitted over HTTP write there or under ZFATLAS_API_ALLOWED_OUTPUTS"
        )
    if not endpoint_allowed(job.endpoint_url):
        problems.append(
            f"{field}endpoint_url: {job.endpoint_url} is not an allowed S3 endpoint (set "
            f"{ENDPOINTS_ENV} here and where the job runs)"
        )
    return problems


def _cluster_error(exc: JobsAPIError) -> HTTPException:
    if isinstance(exc, JobNotFoundError):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    return HTTPException(status.HTTP_502_BAD_GATEWAY, f"Ray Jobs API: {exc}")


# --- jobs ---------------------------------------------------------------------------------


@router.post(
    "/api/jobs",
    status_code=status.HTTP_201_CREATED,
    response_model=SubmitOut,
    tags=["jobs"],
    summary="Validate a spec and submit it to the Ray cluster",
    dependencies=[Depends(require_token)],
)
def submit_job(
    body: SubmitIn, request: Request, service: SchedulerService = Depends(scheduler_service)
) -> Any:
    settings = app_settings(request)
    try:
        spec = parse_spec(_with_output(apply_overrides(body.spec, body.overrides), settings))
        job = prepare(spec, body.output)
    except SpecError as exc:
        return _spec_problems(exc.problems)
    except ValueError as exc:
        return _spec_problems([f"output: {exc}"])
    problems = _where_it_goes(job, settings)
    if problems:
        return _spec_problems(problems)
    try:
        job_id = submit(job, service.address)
    except JobsAPIError as exc:
        raise _cluster_error(exc) from None
    return SubmitOut(job_id=job_id, run_id=spec_run_id(job), kind=job.kind)


@router.get("/api/jobs", tags=["jobs"], summary="Jobs on the cluster, newest first")
def jobs(
    all_jobs: bool = Query(False, alias="all", description="Also jobs not submitted by zfatlas."),
    service: SchedulerService = Depends(scheduler_service),
    _: None = Depends(require_read_access),
) -> list[dict[str, Any]]:
    try:
        return [j.to_dict() for j in list_jobs(jobs_client(service.address), zfatlas_only=not all_jobs)]
    except JobsAPIError as exc:
        raise _cluster_error(exc) from None


@router.get("/api/jobs/{job_id}", tags=["jobs"], summary="One job's status and metadata")
def job(
    job_id: str = Path(..., pattern=_JOB_ID),
    service: SchedulerService = Depends(scheduler_service),
    _: None = Depends(require_read_access),
) -> dict[str, Any]:
    try:
        return job_info(jobs_client(service.address), job_id).to_dict()
    except JobsAPIError as exc:
        raise _cluster_error(exc) from None


@router.get("/api/jobs/{job_id}/logs", tags=["jobs"], summary="One job's output so far")
def logs(
    job_id: str = Path(..., pattern=_JOB_ID),
    service: SchedulerService = Depends(scheduler_service),
    _: None = Depends(require_read_access),
) -> dict[str, str]:
    try:
        return {"job_id": job_id, "logs": job_logs(jobs_client(service.address), job_id)}
    except JobsAPIError as exc:
        raise _cluster_error(exc) from None


@router.post(
    "/api/jobs/{job_id}/stop", tags=["jobs"], summary="Stop a job", dependencies=[Depends(require_token)]
)
def stop(
    job_id: str = Path(..., pattern=_JOB_ID), service: SchedulerService = Depends(scheduler_service)
) -> dict[str, Any]:
    try:
        return {"job_id": job_id, "stopped": stop_job(jobs_client(service.address), job_id)}
    except JobsAPIError as exc:
        raise _cluster_error(exc) from None


# --- schedules ----------------------------------------------------------------------------


def _schedule_out(service: SchedulerService, name: str) -> dict[str, Any]:
    with service.db.reading() as tx:
        try:
            return tx.schedule(name).to_dict(service.clock.now())
        except ScheduleNotFoundError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no schedule {name!r}") from None


@router.get("/api/schedules", tags=["schedules"], summary="Schedules with their next fire times")
def schedules(
    next_count: int = Query(3, alias="next", ge=1, le=100, description="Next fire times shown per schedule."),
    service: SchedulerService = Depends(scheduler_service),
    _: None = Depends(require_read_access),
) -> list[dict[str, Any]]:
    now = service.clock.now()
    with service.db.reading() as tx:
        return [s.to_dict(now, next_count) for s in tx.schedules()]


@router.post(
    "/api/schedules",
    status_code=status.HTTP_201_CREATED,
    tags=["schedules"],
    summary="Add a schedule (it fires from now on)",
    dependencies=[Depends(require_token)],
)
def add_schedule(
    config: ScheduleConfig, request: Request, service: SchedulerService = Depends(scheduler_service)
) -> Any:
    # The template validated with the config; where its runs would write is this server's business.
    settings = app_settings(request)
    config = config.model_copy(update={"spec": _with_output(config.spec, settings)})
    problems = _where_it_goes(prepare(check_template(config.spec)), settings, "spec.")
    if problems:
        return _spec_problems(problems)
    try:
        with service.db.transaction() as tx:
            tx.insert_schedule(config, service.clock.now())
    except ScheduleExistsError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    service.wake()
    return _schedule_out(service, config.name)


@router.get("/api/schedules/{name}", tags=["schedules"], summary="One schedule")
def schedule(
    name: str = Path(..., pattern=_NAME),
    service: SchedulerService = Depends(scheduler_service),
    _: None = Depends(require_read_access),
) -> dict[str, Any]:
    return _schedule_out(service, name)


def _set_paused(service: SchedulerService, name: str, paused: bool) -> dict[str, Any]:
    try:
        with service.db.transaction() as tx:
            tx.set_paused(name, paused, service.clock.now())
    except ScheduleNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no schedule {name!r}") from None
    service.wake()
    return _schedule_out(service, name)


@router.post(
    "/api/schedules/{name}/pause", tags=["schedules"], summary="Pause", dependencies=[Depends(require_token)]
)
def pause(
    name: str = Path(..., pattern=_NAME), service: SchedulerService = Depends(scheduler_service)
) -> dict[str, Any]:
    return _set_paused(service, name, True)


@router.post(
    "/api/schedules/{name}/resume",
    tags=["schedules"],
    summary="Resume (times passed while paused are not caught up)",
    dependencies=[Depends(require_token)],
)
def resume(
    name: str = Path(..., pattern=_NAME), service: SchedulerService = Depends(scheduler_service)
) -> dict[str, Any]:
    return _set_paused(service, name, False)


@router.delete(
    "/api/schedules/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["schedules"],
    summary="Remove a schedule (its history is kept)",
    dependencies=[Depends(require_token)],
)
def remove(
    name: str = Path(..., pattern=_NAME), service: SchedulerService = Depends(scheduler_service)
) -> Response:
    try:
        with service.db.transaction() as tx:
            tx.delete_schedule(name)
    except ScheduleNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no schedule {name!r}") from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/api/schedules/{name}/history",
    tags=["schedules"],
    summary="Runs of a schedule, newest first, with attempts",
)
def history(
    name: str = Path(..., pattern=_NAME),
    limit: int = Query(50, ge=1, le=1000),
    service: SchedulerService = Depends(scheduler_service),
    _: None = Depends(require_read_access),
) -> list[dict[str, Any]]:
    with service.db.reading() as tx:
        return [r.to_dict() for r in tx.runs(schedule=name, limit=limit, with_history=True)]
