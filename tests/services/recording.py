"""Test doubles for the scheduler: a clock the test moves, and an in-memory cluster that records
every submission and keeps the Ray Jobs API's one rule that matters here (a submission id is
accepted once)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from jobs.specs.base import SpecBase
from jobs.submission.ray_jobs import JobNotFoundError, JobsAPIError, JobSummary
from jobs.submission.submit import AlreadySubmittedError


class ManualClock:
    """``sleep`` moves time forward instantly."""

    def __init__(self, start: datetime) -> None:
        self.current = start
        self.slept: list[float] = []

    def now(self) -> datetime:
        return self.current

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.current += timedelta(seconds=seconds)

    def advance(self, **delta: float) -> datetime:
        self.current += timedelta(**delta)
        return self.current


@dataclass
class RecordedJob:
    job_id: str
    spec: SpecBase
    metadata: dict[str, str]
    status: str = "RUNNING"
    message: str | None = None


@dataclass
class RecordingCluster:
    """Implements :class:`services.scheduler.submitter.Submitter` in memory. Jobs stay RUNNING
    until the test finishes them (or ``auto_finish`` says what every new job ends as)."""

    auto_finish: str | None = None
    unreachable: bool = False
    jobs: dict[str, RecordedJob] = field(default_factory=dict)
    submit_calls: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    # Called after a job is accepted, before submit returns: lets a test "kill" the scheduler there.
    after_accept: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, spec: SpecBase, submission_id: str, metadata: Mapping[str, str]) -> str:
        if self.unreachable:
            raise JobsAPIError("connection refused")
        with self._lock:
            self.submit_calls.append(submission_id)
            if submission_id in self.jobs:
                raise AlreadySubmittedError(submission_id)
            self.jobs[submission_id] = RecordedJob(
                submission_id, spec, dict(metadata), self.auto_finish or "RUNNING"
            )
        if callable(self.after_accept):
            self.after_accept(submission_id)
        return submission_id

    def status(self, job_id: str) -> JobSummary:
        if self.unreachable:
            raise JobsAPIError("connection refused")
        job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        return JobSummary(job_id, job.status, "zfatlas run spec.yaml", job.message, metadata=job.metadata)

    def stop(self, job_id: str) -> None:
        if job_id not in self.jobs:
            raise JobNotFoundError(job_id)
        self.stopped.append(job_id)
        if self.jobs[job_id].status in ("PENDING", "RUNNING"):
            self.jobs[job_id].status = "STOPPED"

    def finish(self, job_id: str, status: str = "SUCCEEDED", message: str | None = None) -> None:
        self.jobs[job_id].status = status
        self.jobs[job_id].message = message

    def finish_all(self, status: str = "SUCCEEDED") -> None:
        for job in self.jobs.values():
            if job.status in ("PENDING", "RUNNING"):
                job.status = status

    @property
    def accepted(self) -> list[str]:
        return list(self.jobs)
