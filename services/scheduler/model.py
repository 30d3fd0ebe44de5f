"""What a schedule is (its configuration and policies) and what its history records.

Policies follow Kubernetes CronJob where it has one:

- ``concurrency`` — when a fire comes while an earlier run of the schedule is still active
  (submitted, running, or waiting to be retried): ``forbid`` records the new fire as ``skipped``;
  ``replace`` stops the active runs (``replaced``) and starts the new one; ``allow`` starts it too.
- ``catchup`` — fire times that passed while the scheduler was down (or behind): ``none`` runs a
  fire only within ``starting_deadline_s`` of its time; ``latest`` runs the most recent passed
  fire whatever its age; ``all`` runs the most recent ``max_catchup``. The others are recorded as
  ``missed``.
- ``retry`` — a run whose Ray job fails, or whose submission the Jobs API did not confirm (it
  could not be reached, or refused), is submitted again after
  ``backoff_s * backoff_factor ** (attempt - 2)`` seconds (at most ``max_backoff_s``), up to
  ``max_attempts`` attempts in all, then reported ``failed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobs.specs.base import SpecError
from services.scheduler import cron
from services.scheduler.template import check_template

Concurrency = Literal["forbid", "replace", "allow"]
Catchup = Literal["none", "latest", "all"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9-_]*$")

# Run states: the first three are "active" (the concurrency policy counts them).
PENDING = "pending"  # an attempt is claimed; its submission is not confirmed yet
RUNNING = "running"  # its Ray job is pending or running
RETRYING = "retrying"  # the last attempt failed; the next one waits for its backoff
SUCCEEDED = "succeeded"
FAILED = "failed"
SKIPPED = "skipped"  # concurrency "forbid": an earlier run was still active
MISSED = "missed"  # catch-up policy: passed while the scheduler was not running
REPLACED = "replaced"  # concurrency "replace": stopped for a newer run
ACTIVE = (PENDING, RUNNING, RETRYING)

# Attempt states besides claimed, submitted and the Ray job's own (PENDING ... STOPPED, LOST, ERROR):
UNCONFIRMED = "UNCONFIRMED"  # sent, but the Jobs API did not confirm it: the job may exist or not
NOT_SUBMITTED = "NOT_SUBMITTED"  # was UNCONFIRMED; the cluster has since said it has no such job
# Never sent: the cluster could not be reached to learn whether an UNCONFIRMED attempt got through,
# and sending another could have started the run twice.
UNREACHABLE = "UNREACHABLE"


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(3, ge=1, le=100, description="Attempts in all, the first included.")
    backoff_s: float = Field(300.0, ge=0, description="Wait before the second attempt.")
    backoff_factor: float = Field(2.0, ge=1, le=10, description="Each further wait is this much longer.")
    max_backoff_s: float = Field(6 * 3600.0, ge=0, description="Longest wait between attempts.")

    def delay_before(self, attempt: int) -> float:
        """Seconds between the end of attempt ``attempt - 1`` and the start of ``attempt`` (>= 2)."""
        return min(self.max_backoff_s, self.backoff_s * self.backoff_factor ** max(0, attempt - 2))


class ScheduleConfig(BaseModel):
    """A schedule as the user writes it (``zfatlas schedule add`` or ``POST /schedules``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1, max_length=48, description="Slug; prefix of every run id.")
    cron: str = Field(..., description="Five-field cron expression, e.g. '0 2 * * *' (02:00 daily).")
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in.")
    spec: dict[str, Any] = Field(
        ..., description="Job spec template; 'latest:PREFIX' values name the newest checkpoint under PREFIX."
    )
    concurrency: Concurrency = "forbid"
    catchup: Catchup = "latest"
    max_catchup: int = Field(10, ge=1, le=1000, description="Most passed fires run by catchup 'all'.")
    starting_deadline_s: float = Field(
        300.0, ge=0, description="How late a fire may still start under catchup 'none'."
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} is not a slug: use lowercase letters, digits, '-' and '_'")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return cron.check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        cron.zone(value)
        return value

    @field_validator("spec")
    @classmethod
    def _template(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            check_template(value)
        except SpecError as exc:
            raise ValueError("; ".join(f"spec.{p}" for p in exc.problems)) from None
        return value

    @property
    def kind(self) -> str:
        return str(self.spec.get("kind"))

    def next_fire_times(self, after: datetime, count: int = 3) -> list[datetime]:
        return cron.next_fire_times(self.cron, self.timezone, after, count)


@dataclass(frozen=True)
class Schedule:
    """A stored schedule: its configuration and its state.

    A row that no longer validates (stored by an older zfatlas with looser checks, e.g. a cron for
    a date that never comes, or edited by hand) has ``config`` None and ``problem`` saying why: it
    is listed with its problem, never fired, and can be paused or removed like any other.
    """

    name: str
    config: ScheduleConfig | None
    paused: bool
    created_at: datetime
    # Every fire time up to here has been decided (run, skipped or missed); later ones have not.
    watermark: datetime
    problem: str | None = None
    stored: dict[str, Any] = field(default_factory=dict)  # the row's configuration as stored

    def next_fire_times(self, now: datetime, count: int = 3) -> list[datetime]:
        """The next ``count`` fire times after ``now`` (none when paused); ValueError for a
        schedule that cannot fire (see ``problem``)."""
        if self.config is None:
            raise ValueError(self.problem or "invalid schedule")
        if self.paused:
            return []
        return self.config.next_fire_times(max(now, self.watermark), count)

    def to_dict(self, now: datetime, count: int = 3) -> dict[str, Any]:
        config = self.config.model_dump(mode="json") if self.config else {**self.stored, "name": self.name}
        problem, times = self.problem, []
        if problem is None:
            try:
                times = [iso(t) for t in self.next_fire_times(now, count)]
            except Exception as exc:  # noqa: BLE001 - whatever a stored row makes croniter raise is shown
                problem = f"cannot compute its fire times: {exc}"
        return {
            **config,
            "paused": self.paused,
            "created_at": iso(self.created_at),
            "watermark": iso(self.watermark),
            "next_fire_times": times,
            "problem": problem,
        }


@dataclass(frozen=True)
class Attempt:
    attempt: int
    ray_job_id: str  # the submission id, derived from the run id and the attempt number
    # claimed, submitted, a Ray job status (PENDING ... STOPPED), LOST, ERROR, or one of the
    # submission states above (UNCONFIRMED, NOT_SUBMITTED, UNREACHABLE)
    status: str
    claimed_at: datetime
    finished_at: datetime | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "ray_job_id": self.ray_job_id,
            "status": self.status,
            "claimed_at": iso(self.claimed_at),
            "finished_at": iso(self.finished_at),
            "message": self.message,
        }


@dataclass(frozen=True)
class Run:
    """One scheduled time of one schedule, and what became of it."""

    run_id: str
    schedule: str
    scheduled_at: datetime
    status: str
    attempts: int
    ray_job_id: str | None
    next_attempt_at: datetime | None
    message: str | None
    updated_at: datetime
    history: list[Attempt] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "schedule": self.schedule,
            "scheduled_at": iso(self.scheduled_at),
            "status": self.status,
            "attempts": self.attempts,
            "ray_job_id": self.ray_job_id,
            "next_attempt_at": iso(self.next_attempt_at),
            "message": self.message,
            "updated_at": iso(self.updated_at),
            "history": [a.to_dict() for a in self.history],
        }


def iso(moment: datetime | None) -> str | None:
    """UTC ISO 8601 with a Z, to the second (what the database stores and sorts)."""
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_id_for(schedule: str, scheduled_at: datetime) -> str:
    """The run id of one scheduled time: the same on every scheduler replica and after restarts."""
    return f"{schedule}-{scheduled_at.astimezone(timezone.utc):%Y%m%dT%H%MZ}"


def submission_id_for(run_id: str, attempt: int) -> str:
    """The Ray submission id of one attempt: the run id itself for the first."""
    return run_id if attempt == 1 else f"{run_id}-attempt{attempt}"


def attempt_for(run_id: str, submission_id: str) -> int | None:
    """The attempt whose submission id is ``submission_id`` (the inverse of
    :func:`submission_id_for`); None for an id of no attempt of this run."""
    if submission_id == run_id:
        return 1
    number = submission_id.removeprefix(f"{run_id}-attempt")
    return int(number) if number != submission_id and number.isdigit() else None
