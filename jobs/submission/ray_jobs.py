"""The Ray Jobs API (the dashboard's HTTP server on the head, port 8265) as zfatlas uses it.

One client per address, queries that return plain :class:`JobSummary` records, and errors that say
what to fix. Submitting a spec is :mod:`jobs.submission.submit`; this module is everything else that
``zfatlas jobs`` and the scheduler ask a cluster.

Authentication: Ray 2.60 clusters started with token auth answer 401 without
``Authorization: Bearer <token>``. Ray's client adds that header itself when this process has
``RAY_AUTH_MODE=token`` and a token (``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token``); see deploy/README.md.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Ray's own variable for the Jobs API address (RAY_ADDRESS is the GCS address `zfatlas run` uses).
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
RUN_ID_KEY = "zfatlas_run_id"
KIND_KEY = "zfatlas_kind"

# JobSubmissionClient replaces the address it is given with RAY_API_SERVER_ADDRESS or RAY_ADDRESS
# when either is set, so an explicit --address would silently go to another cluster. The client is
# built with both hidden; the lock keeps two threads from restoring each other's view.
_ENV_LOCK = threading.Lock()
_ADDRESS_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class JobsAPIError(Exception):
    """The Jobs API could not be reached, refused the request, or failed it."""


class JobNotFoundError(JobsAPIError):
    """No job with this id on the cluster."""


@dataclass(frozen=True)
class JobSummary:
    """One job as the Jobs API reports it."""

    job_id: str  # the submission id: what every command takes
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED
    entrypoint: str
    message: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        return self.metadata.get(RUN_ID_KEY)

    @property
    def kind(self) -> str | None:
        return self.metadata.get(KIND_KEY)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "run_id": self.run_id,
            "kind": self.kind,
            "entrypoint": self.entrypoint,
            "message": self.message,
            "start_time": _iso(self.start_time),
            "end_time": _iso(self.end_time),
            "metadata": dict(self.metadata),
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def _time(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc) if ms else None


def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL: ``address``, else ``RAY_API_SERVER_ADDRESS``, else the local default;
    ``host:port`` gets ``http://``."""
    address = (address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS).strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


@contextmanager
def _explicit_address() -> Iterator[None]:
    with _ENV_LOCK:
        saved = {k: os.environ.pop(k) for k in _ADDRESS_OVERRIDES if k in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def jobs_client(address: str | None = None) -> JobSubmissionClient:
    """A client of the Jobs API at ``address`` (see :func:`resolve_address`)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        with _explicit_address():
            return JobSubmissionClient(url)
    except AuthenticationError as exc:
        raise JobsAPIError(
            f"the Ray cluster at {url} needs its auth token: set RAY_AUTH_MODE=token and put the "
            f"token in RAY_AUTH_TOKEN or ~/.ray/auth_token ({str(exc).splitlines()[0]})"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobsAPIError(f"cannot reach the Ray Jobs API at {url}: {exc}") from None


def call(action: Callable[[], Any], job_id: str | None = None) -> Any:
    """Run one client call, turning Ray's errors into :class:`JobsAPIError` (and a 404 into
    :class:`JobNotFoundError`)."""
    from ray.exceptions import AuthenticationError

    try:
        return action()
    except AuthenticationError as exc:
        raise JobsAPIError(f"authentication failed: {str(exc).splitlines()[0]}") from None
    except (ConnectionError, OSError) as exc:
        raise JobsAPIError(f"cannot reach the Ray Jobs API: {exc}") from None
    except RuntimeError as exc:
        text = str(exc)
        if "status code 404" in text or "does not exist" in text:
            raise JobNotFoundError(f"no job {job_id!r} on this cluster") from None
        raise JobsAPIError(_reason(text) or type(exc).__name__) from None


def _reason(text: str) -> str:
    # A server-side failure comes back as "Request failed with status code 500: <traceback>";
    # its last meaningful line ("ValueError: ...") says why.
    lines = [line.strip() for line in text.splitlines() if line.strip(" .")]
    return lines[-1] if lines else ""


def _summary(details: Any) -> JobSummary:
    status = details.status
    return JobSummary(
        job_id=details.submission_id or details.job_id or "",
        status=str(getattr(status, "value", status)),
        entrypoint=details.entrypoint or "",
        message=details.message,
        start_time=_time(details.start_time),
        end_time=_time(details.end_time),
        metadata=dict(details.metadata or {}),
    )


def job_info(client: JobSubmissionClient, job_id: str) -> JobSummary:
    return _summary(call(lambda: client.get_job_info(job_id), job_id))


def list_jobs(client: JobSubmissionClient, *, zfatlas_only: bool = True) -> list[JobSummary]:
    """Submitted jobs, newest first; with ``zfatlas_only``, those whose metadata names a run."""
    jobs = [
        _summary(d)
        for d in call(client.list_jobs)
        if d.submission_id is not None  # not bare drivers
    ]
    if zfatlas_only:
        jobs = [j for j in jobs if j.run_id]
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(jobs, key=lambda j: j.start_time or oldest, reverse=True)


def stop_job(client: JobSubmissionClient, job_id: str) -> bool:
    """Ask the cluster to stop the job; False if it had already finished."""
    return bool(call(lambda: client.stop_job(job_id), job_id))


def job_logs(client: JobSubmissionClient, job_id: str) -> str:
    return str(call(lambda: client.get_job_logs(job_id), job_id))


def follow_logs(client: JobSubmissionClient, job_id: str, write: Callable[[str], Any]) -> None:
    """Hand every chunk of the job's output to ``write`` as it is produced, until the job ends."""
    job_info(client, job_id)  # a clear JobNotFoundError instead of a websocket failure

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    call(lambda: asyncio.run(tail()), job_id)
