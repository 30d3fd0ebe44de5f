"""Where scheduled runs go: the :class:`Submitter` interface, implemented by the Ray Jobs API.

The scheduler only needs three things of a cluster: submit a spec under a submission id it
chose (refusing a second job with the same id), report a job's status, stop a job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

from jobs.specs.base import SpecBase
from jobs.submission.ray_jobs import (
    JobNotFoundError,
    JobsAPIError,
    JobSummary,
    job_info,
    jobs_client,
    resolve_address,
    stop_job,
)
from jobs.submission.submit import AlreadySubmittedError, submit

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "AlreadySubmittedError",
    "JobNotFoundError",
    "JobSummary",
    "JobsAPIError",
    "RayJobsSubmitter",
    "Submitter",
]


class Submitter(Protocol):
    def submit(self, spec: SpecBase, submission_id: str, metadata: Mapping[str, str]) -> str:
        """Start ``spec`` as job ``submission_id`` and return that id. Raises
        :class:`AlreadySubmittedError` if a job with this id exists, :class:`JobsAPIError` if
        the cluster cannot be reached."""
        ...

    def status(self, job_id: str) -> JobSummary:
        """The job; its ``status`` is PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED.
        :class:`JobNotFoundError` if the cluster has no such job."""
        ...

    def stop(self, job_id: str) -> None: ...


class RayJobsSubmitter:
    """A :class:`Submitter` over the Ray Jobs API at ``address`` (connected on first use, and
    again after a connection error: the head may restart under a long-running scheduler)."""

    def __init__(self, address: str | None = None) -> None:
        self.address = resolve_address(address)
        self._client: JobSubmissionClient | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RayJobsSubmitter({self.address!r})"

    def _call(self, action_name: str, job_id: str, action: Callable[[JobSubmissionClient], T]) -> T:
        with self._lock:
            if self._client is None:
                self._client = jobs_client(self.address)
            client = self._client
        try:
            return action(client)
        except (JobNotFoundError, AlreadySubmittedError):
            raise  # answers about the job, not a broken connection
        except JobsAPIError:
            log.warning(
                "%s %s failed; reconnecting to %s on the next call", action_name, job_id, self.address
            )
            with self._lock:
                self._client = None
            raise

    def submit(self, spec: SpecBase, submission_id: str, metadata: Mapping[str, str]) -> str:
        return self._call(
            "submit",
            submission_id,
            lambda c: submit(spec, client=c, submission_id=submission_id, metadata=metadata),
        )

    def status(self, job_id: str) -> JobSummary:
        return self._call("status", job_id, lambda c: job_info(c, job_id))

    def stop(self, job_id: str) -> None:
        self._call("stop", job_id, lambda c: stop_job(c, job_id))
