"""The scheduling loop: fire due schedules exactly once, follow their Ray jobs, retry failures.

Each :meth:`Scheduler.tick` does, against the shared SQLite state (:mod:`services.scheduler.db`):

1. follow: ask the cluster about every run whose attempt is pending or running; a finished job
   makes its run ``succeeded``, or ``retrying`` (``failed`` after its last attempt);
2. retry: claim and submit the next attempt of runs whose backoff has passed;
3. fire: for every schedule that is not paused, decide each fire time since its watermark — run
   it, or record it ``missed`` (catch-up policy) or ``skipped`` (concurrency policy) — and
   submit what runs. Each schedule on its own: one that cannot be evaluated (a row stored before
   its cron was checked, a bug) is logged and passed over; the others still fire.

Exactly once: a fire time is decided by one INSERT guarded by ``UNIQUE (schedule,
scheduled_at)``, and an attempt is claimed by one INSERT guarded by ``PRIMARY KEY (run_id,
attempt)``, both before anything is submitted; the Ray submission id is derived from the run id
and the attempt, and Ray refuses a second job with the same submission id. So a scheduler killed
at any point, restarted, or running twice by mistake resubmits at most an attempt whose
submission it never confirmed — and that resubmission is refused by Ray if the first one got
through (an "already submitted" answer, recorded as success of the submission). Underneath, the
job itself is idempotent: a run already committed in the store is not run again.

A submission the Jobs API does not confirm (unreachable, refused, timed out) is a failed attempt
(``UNCONFIRMED``): the run backs off and retries like after a failed job, up to its
``max_attempts``, then fails with the reason. It may still have reached the cluster, so before
the next attempt is submitted the cluster is asked about it: if it is there it is followed as the
run's job (nothing is submitted twice); while the cluster cannot be asked, the next attempt fails
without being sent (``UNREACHABLE``), so a run never has two jobs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.scheduler import cron
from services.scheduler.checkpoints import newest_checkpoint
from services.scheduler.clock import Clock, SystemClock
from services.scheduler.db import ScheduleDB, ScheduleNotFoundError, Tx
from services.scheduler.model import (
    ACTIVE,
    FAILED,
    MISSED,
    NOT_SUBMITTED,
    PENDING,
    REPLACED,
    RETRYING,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    UNCONFIRMED,
    UNREACHABLE,
    Attempt,
    Run,
    Schedule,
    ScheduleConfig,
    attempt_for,
    iso,
    run_id_for,
    submission_id_for,
)
from services.scheduler.submitter import AlreadySubmittedError, JobNotFoundError, JobsAPIError, Submitter
from services.scheduler.template import render

log = logging.getLogger(__name__)

# Fire times enumerated (and recorded as missed) per schedule per tick, newest first.
MAX_DECIDED_PER_TICK = 1000


@dataclass(frozen=True)
class Started:
    """A claimed attempt that this scheduler is to submit."""

    config: ScheduleConfig
    run_id: str
    scheduled_at: datetime
    attempt: int


class Scheduler:
    """Fires the schedules stored in ``db`` through ``submitter``.

    ``poll_s``: how often running jobs are asked for their status; ``idle_s``: the longest sleep
    when nothing is due (schedules added by another process are seen within it);
    ``claim_grace_s``: how long an attempt may stay claimed without a confirmed submission before
    another tick (of any replica) submits it again.
    """

    def __init__(
        self,
        db: ScheduleDB,
        submitter: Submitter,
        clock: Clock | None = None,
        *,
        poll_s: float = 10.0,
        idle_s: float = 60.0,
        claim_grace_s: float = 60.0,
        resolve: Callable[[str, str | None], str] = newest_checkpoint,
    ) -> None:
        self.db = db
        self.submitter = submitter
        self.clock = clock or SystemClock()
        self.poll_s = poll_s
        self.idle_s = idle_s
        self.claim_grace_s = claim_grace_s
        self.resolve = resolve
        self._reported: dict[str, str] = {}  # schedule -> the problem last logged for it

    # --- the loop ---

    def run(self, until: datetime | None = None, stop: threading.Event | None = None) -> None:
        """Tick, sleep until something is due, repeat; until ``until`` (clock time) or ``stop``."""
        while not (stop and stop.is_set()):
            try:
                self.tick()
                now = self.clock.now()
                wake = self.next_wakeup(now)
            except Exception:  # one bad tick (database locked for too long, a bug) must not end the service
                log.exception("scheduler tick failed; trying again after %.0f s", self.poll_s)
                now = self.clock.now()
                wake = now + timedelta(seconds=self.poll_s)
            if until is not None and now >= until:
                return
            if until is not None:
                wake = min(wake, until)
            # At least a second: the clock may be coarse, and nothing is due sooner than that.
            self.clock.sleep(max(1.0, (wake - now).total_seconds()))

    def tick(self) -> None:
        now = self.clock.now()
        self.follow(now)
        self.retry_due(now)
        with self.db.reading() as tx:
            schedules = [s for s in tx.schedules() if not s.paused]
        for schedule in schedules:
            if schedule.config is None:
                self._report(schedule.name, f"invalid, not fired: {schedule.problem}")
                continue
            try:
                self.fire_due(schedule, now)
            except Exception as exc:  # noqa: BLE001 - one schedule's failure must not stop the others
                self._report(schedule.name, f"cannot decide its fire times, not fired: {exc}", exc)
            else:
                self._reported.pop(schedule.name, None)

    def _report(self, name: str, problem: str, exc: BaseException | None = None) -> None:
        """Log a schedule's problem once (not on every tick), with the traceback of a new failure."""
        if self._reported.get(name) != problem:
            self._reported[name] = problem
            log.error("schedule %s: %s", name, problem, exc_info=exc)

    def next_wakeup(self, now: datetime) -> datetime:
        """When the next tick is needed: a fire time, a retry, a status poll, or ``idle_s``."""
        wake = now + timedelta(seconds=self.idle_s)
        with self.db.reading() as tx:
            for schedule in tx.schedules():
                try:
                    upcoming = schedule.next_fire_times(now, 1)
                except Exception:  # noqa: BLE001 - reported by tick(); it just has no fire time
                    upcoming = []
                wake = min([wake, *upcoming])
            for run in tx.runs(statuses=ACTIVE):
                if run.status == RETRYING and run.next_attempt_at is not None:
                    wake = min(wake, run.next_attempt_at)
                else:
                    wake = min(wake, now + timedelta(seconds=self.poll_s))
        return wake

    # --- 1. follow submitted jobs ---

    def follow(self, now: datetime) -> None:
        with self.db.reading() as tx:
            runs = tx.runs(statuses=(PENDING, RUNNING), with_history=True)
        for run in runs:
            job_id = run.ray_job_id or ""
            # The attempt whose job the run follows: the latest, or an earlier one found to have
            # reached the cluster after all (see retry_due).
            attempt = attempt_for(run.run_id, job_id) or run.attempts
            try:
                job = self.submitter.status(job_id)
            except JobNotFoundError:
                if run.status == PENDING:
                    self._resubmit_if_stale(run, attempt, now)
                else:
                    lost = "the cluster no longer knows this job"
                    self.attempt_failed(run.run_id, attempt, "LOST", lost, now)
                continue
            except JobsAPIError as exc:
                if run.status == PENDING and self._stale(run, attempt, now):
                    # Its claimer gave up or died; whether the job got through cannot be known now.
                    reason = f"submission not confirmed: {exc}"
                    self.attempt_failed(run.run_id, attempt, UNCONFIRMED, reason, now)
                else:
                    log.warning("cannot get the status of %s: %s", job_id, exc)
                continue
            if job.status in ("PENDING", "RUNNING"):
                self._mark_running(run.run_id, attempt, job.status, now)
            elif job.status == "SUCCEEDED":
                self._succeeded(run.run_id, attempt, now)
            else:
                reason = f"Ray job {job_id} {job.status}" + (f": {job.message}" if job.message else "")
                self.attempt_failed(run.run_id, attempt, job.status, reason, now)

    def _stale(self, run: Run, attempt: int, now: datetime) -> bool:
        """Whether ``attempt`` was claimed longer than ``claim_grace_s`` ago (its claimer is not
        submitting it any more)."""
        claimed = next((a.claimed_at for a in run.history if a.attempt == attempt), None)
        return claimed is not None and now - claimed >= timedelta(seconds=self.claim_grace_s)

    def _resubmit_if_stale(self, run: Run, attempt: int, now: datetime) -> None:
        if not self._stale(run, attempt, now):
            return  # its claimer may be submitting it right now
        with self.db.reading() as tx:
            config, why_not = _config(tx, run.schedule)
        if config is None:
            self.attempt_failed(run.run_id, attempt, "ERROR", why_not, now)
            return
        log.info("attempt %d of %s was claimed but never confirmed; submitting it", attempt, run.run_id)
        self.submit(Started(config, run.run_id, run.scheduled_at, attempt))

    def _mark_running(self, run_id: str, attempt: int, job_status: str, now: datetime) -> None:
        with self.db.transaction() as tx:
            run = tx.run(run_id)
            if not _follows(run, attempt):
                return
            tx.update_attempt(run_id, attempt, job_status)
            if run is not None and run.status == PENDING:
                tx.update_run(run_id, now, status=RUNNING, message=None)

    def _succeeded(self, run_id: str, attempt: int, now: datetime) -> None:
        with self.db.transaction() as tx:
            if not _follows(tx.run(run_id), attempt):
                return
            tx.update_attempt(run_id, attempt, "SUCCEEDED", finished_at=now)
            tx.update_run(run_id, now, status=SUCCEEDED, message=None)
        log.info("run %s succeeded (attempt %d)", run_id, attempt)

    def attempt_failed(self, run_id: str, attempt: int, status: str, message: str, now: datetime) -> None:
        """Record a failed attempt; the run waits for its next attempt, or fails after its last."""
        with self.db.transaction() as tx:
            run = tx.run(run_id)
            if run is None or not _follows(run, attempt):
                return  # already decided (by another replica, or replaced)
            _record_failure(tx, run, attempt, status, message, now)

    # --- 2. retries ---

    def retry_due(self, now: datetime) -> None:
        with self.db.reading() as tx:
            due = [
                r
                for r in tx.runs(statuses=(RETRYING,), with_history=True)
                if r.next_attempt_at and r.next_attempt_at <= now
            ]
        for run in due:
            # A submission that was not confirmed may have reached the cluster: ask before sending
            # another, which could start the run twice. At most one attempt is ever in this state.
            unconfirmed = next((a for a in reversed(run.history) if a.status == UNCONFIRMED), None)
            blocked = None
            if unconfirmed is not None:
                try:
                    self.submitter.status(unconfirmed.ray_job_id)
                except JobNotFoundError:
                    self._not_submitted(run, unconfirmed)
                except JobsAPIError as exc:
                    blocked = (
                        f"not submitted: cannot learn from the Ray Jobs API whether attempt "
                        f"{unconfirmed.attempt} reached the cluster: {exc}"
                    )
                else:
                    self._adopt(run, unconfirmed, now)
                    continue
            attempt = run.attempts + 1
            with self.db.transaction() as tx:
                current = tx.run(run.run_id)
                if current is None or current.status != RETRYING or current.attempts != run.attempts:
                    continue
                config, why_not = _config(tx, run.schedule)
                if config is None:
                    tx.update_run(run.run_id, now, status=FAILED, message=why_not)
                    continue
                if not tx.insert_attempt(run.run_id, attempt, submission_id_for(run.run_id, attempt), now):
                    continue
                if blocked is not None:  # the attempt is used up without being sent
                    claimed = tx.run(run.run_id)
                    if claimed is not None:
                        _record_failure(tx, claimed, attempt, UNREACHABLE, blocked, now)
                    continue
            self.submit(Started(config, run.run_id, run.scheduled_at, attempt))

    def _not_submitted(self, run: Run, attempt: Attempt) -> None:
        with self.db.transaction() as tx:
            tx.update_attempt(run.run_id, attempt.attempt, NOT_SUBMITTED)
        log.info("attempt %d of %s never reached the cluster", attempt.attempt, run.run_id)

    def _adopt(self, run: Run, attempt: Attempt, now: datetime) -> None:
        """An attempt recorded as not confirmed is on the cluster after all: the run follows its job
        again instead of submitting another."""
        with self.db.transaction() as tx:
            current = tx.run(run.run_id)
            if current is None or current.status != RETRYING or current.attempts != run.attempts:
                return
            tx.reopen_attempt(
                run.run_id, attempt.attempt, "submitted", "the submission did reach the cluster"
            )
            tx.update_run(
                run.run_id, now, status=RUNNING, ray_job_id=attempt.ray_job_id, next_attempt_at=None,
                message=None,
            )
        log.info(
            "attempt %d of %s reached the cluster after all (Ray job %s); following it",
            attempt.attempt, run.run_id, attempt.ray_job_id,
        )

    # --- 3. fires ---

    def fire_due(self, schedule: Schedule, now: datetime) -> None:
        config = schedule.config
        if config is None:
            return  # invalid: never fired (tick reports it)
        times, truncated = cron.fire_times_between(
            config.cron, config.timezone, schedule.watermark, now, MAX_DECIDED_PER_TICK
        )
        if not times:
            return
        if truncated:
            log.warning(
                "%s: more than %d fire times passed; older ones are not recorded", config.name, len(times)
            )
        chosen = self._catchup(config, times, now)
        for moment in times:
            if moment in chosen:
                started = self._claim_fire(config, moment, now)
                if started is not None:
                    self.submit(started)
            else:
                reason = f"passed while the scheduler was not running (catchup {config.catchup!r})"
                with self.db.transaction() as tx:
                    tx.insert_run(run_id_for(config.name, moment), config.name, moment, MISSED, now, reason)
        with self.db.transaction() as tx:
            tx.advance_watermark(config.name, times[-1])

    @staticmethod
    def _catchup(config: ScheduleConfig, times: list[datetime], now: datetime) -> set[datetime]:
        if config.catchup == "all":
            return set(times[-config.max_catchup :])
        if config.catchup == "latest":
            return {times[-1]}
        late = (now - times[-1]).total_seconds()
        return {times[-1]} if late <= config.starting_deadline_s else set()

    def _claim_fire(self, config: ScheduleConfig, moment: datetime, now: datetime) -> Started | None:
        """Decide one fire time in one transaction; the attempt to submit, if it is to run."""
        run_id = run_id_for(config.name, moment)
        to_stop: list[str] = []
        with self.db.transaction() as tx:
            if tx.run(run_id) is not None:
                return None  # decided already: by another replica, or before a restart
            active = [
                r
                for r in tx.runs(schedule=config.name, statuses=ACTIVE, with_history=True)
                if r.scheduled_at < moment
            ]
            if active and config.concurrency == "forbid":
                names = ", ".join(r.run_id for r in active)
                tx.insert_run(
                    run_id, config.name, moment, SKIPPED, now, f"concurrency 'forbid': {names} still active"
                )
                log.info("%s skipped: %s still active", run_id, names)
                return None
            if active and config.concurrency == "replace":
                for old in active:
                    tx.update_run(old.run_id, now, status=REPLACED, message=f"replaced by {run_id}")
                    if old.status != RETRYING and old.ray_job_id:
                        to_stop.append(old.ray_job_id)
                    # A submission that was never confirmed may be running all the same.
                    to_stop.extend(a.ray_job_id for a in old.history if a.status == UNCONFIRMED)
            tx.insert_run(run_id, config.name, moment, PENDING, now)
            tx.insert_attempt(run_id, 1, submission_id_for(run_id, 1), now)
        for job_id in to_stop:
            self._stop(job_id, f"replaced by {run_id}")
        return Started(config, run_id, moment, 1)

    def _stop(self, job_id: str, why: str) -> None:
        try:
            self.submitter.stop(job_id)
            log.info("stopping Ray job %s: %s", job_id, why)
        except JobNotFoundError:
            log.info("Ray job %s is not on the cluster (never submitted, or gone); nothing to stop", job_id)
        except JobsAPIError as exc:
            log.warning("could not stop Ray job %s (%s): %s", job_id, why, exc)

    # --- submission ---

    def submit(self, started: Started) -> None:
        """Submit a claimed attempt. A template that cannot be rendered fails the attempt; so does a
        submission the Jobs API does not confirm (``UNCONFIRMED``: unreachable, refused), which
        backs off and retries like a failed job."""
        run_id, attempt = started.run_id, started.attempt
        job_id = submission_id_for(run_id, attempt)
        try:
            spec = render(started.config.spec, run_id, self.resolve)
        except Exception as exc:  # the template's inputs (e.g. no checkpoint yet): this attempt fails
            self.attempt_failed(run_id, attempt, "ERROR", f"cannot build the spec: {exc}", self.clock.now())
            return
        metadata = {
            "zfatlas_schedule": started.config.name,
            "zfatlas_scheduled_at": iso(started.scheduled_at) or "",
            "zfatlas_attempt": str(attempt),
        }
        try:
            self.submitter.submit(spec, job_id, metadata)
            log.info("submitted %s attempt %d as Ray job %s", run_id, attempt, job_id)
        except AlreadySubmittedError:
            log.info("Ray job %s was already submitted (a restart or another replica); not again", job_id)
        except JobsAPIError as exc:
            log.warning("could not submit %s: %s", job_id, exc)
            reason = f"submission not confirmed: {exc}"
            self.attempt_failed(run_id, attempt, UNCONFIRMED, reason, self.clock.now())
            return
        now = self.clock.now()
        with self.db.transaction() as tx:
            run = tx.run(run_id)
            still_wanted = _follows(run, attempt)
            if still_wanted:
                tx.update_attempt(run_id, attempt, "submitted")
                if run is not None and run.status == PENDING:
                    tx.update_run(run_id, now, status=RUNNING, message=None)
        if not still_wanted:
            # Replaced (or decided) while this submission was in flight: it must not keep running.
            self._stop(job_id, "its run was replaced while it was being submitted")


def _follows(run: Run | None, attempt: int) -> bool:
    """Whether ``run`` is still waiting on ``attempt``'s job (not decided, replaced or moved on)."""
    return (
        run is not None
        and run.status in (PENDING, RUNNING)
        and run.ray_job_id == submission_id_for(run.run_id, attempt)
    )


def _config(tx: Tx, name: str) -> tuple[ScheduleConfig | None, str]:
    """The schedule's configuration, or None and why there is none to run with."""
    try:
        schedule = tx.schedule(name)
    except ScheduleNotFoundError:
        return None, "its schedule was removed"
    if schedule.config is None:
        return None, f"its schedule is invalid: {schedule.problem}"
    return schedule.config, ""


def _record_failure(tx: Tx, run: Run, attempt: int, status: str, message: str, now: datetime) -> None:
    """In ``tx``: ``attempt`` failed; the run retries after its backoff, or fails after its last
    attempt (``run.attempts``, the attempts made so far, counts against ``max_attempts``)."""
    tx.update_attempt(run.run_id, attempt, status, finished_at=now, message=message)
    config, _ = _config(tx, run.schedule)
    retry = config.retry if config is not None else None
    made = run.attempts
    if retry is not None and made < retry.max_attempts:
        at = now + timedelta(seconds=retry.delay_before(made + 1))
        tx.update_run(run.run_id, now, status=RETRYING, next_attempt_at=at, message=message)
        log.warning(
            "run %s attempt %d failed (%s); attempt %d at %s", run.run_id, attempt, message, made + 1, iso(at)
        )
    else:
        tx.update_run(run.run_id, now, status=FAILED, message=f"failed after {made} attempt(s): {message}")
        log.error("run %s failed after %d attempt(s): %s", run.run_id, made, message)
