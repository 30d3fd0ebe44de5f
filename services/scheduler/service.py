"""The scheduler service's configuration and wiring: one SQLite file, one Ray cluster, one loop.

Settings come from arguments or ``ZFATLAS_SCHEDULER_*`` environment variables (``_DB``,
``_RAY_ADDRESS``, ``_POLL_S``, ...). The HTTP router (:mod:`services.scheduler.http`) uses the
same settings, so mounted in the API app (``zfatlas serve``) it reads the same database the
``zfatlas scheduler serve`` loop works from.
"""

from __future__ import annotations

import logging
import threading

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.submission.ray_jobs import resolve_address
from services.scheduler.clock import SystemClock
from services.scheduler.db import ScheduleDB
from services.scheduler.scheduler import Scheduler
from services.scheduler.submitter import RayJobsSubmitter

log = logging.getLogger(__name__)

DEFAULT_DB = "./artifacts/scheduler.db"


class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZFATLAS_SCHEDULER_", extra="forbid", frozen=True)

    db: str = Field(DEFAULT_DB, description="SQLite file holding schedules and run history.")
    ray_address: str | None = Field(
        None, description="Ray Jobs API (http://HEAD:8265); default: RAY_API_SERVER_ADDRESS or local."
    )
    poll_s: float = Field(10.0, gt=0, description="Seconds between status polls of running jobs.")
    idle_s: float = Field(60.0, gt=0, description="Longest sleep when nothing is due.")
    claim_grace_s: float = Field(60.0, gt=0, description="Age at which an unconfirmed submission is retried.")

    @property
    def address(self) -> str:
        return resolve_address(self.ray_address)


class SchedulerService:
    """The database, the cluster and the clock, shared by the loop and the HTTP handlers."""

    def __init__(self, settings: SchedulerSettings | None = None) -> None:
        self.settings = settings or SchedulerSettings()
        self.db = ScheduleDB(self.settings.db)
        self.clock = SystemClock()
        self.submitter = RayJobsSubmitter(self.settings.address)
        self.scheduler = Scheduler(
            self.db,
            self.submitter,
            self.clock,
            poll_s=self.settings.poll_s,
            idle_s=self.settings.idle_s,
            claim_grace_s=self.settings.claim_grace_s,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return self.submitter.address

    def start(self) -> None:
        """Run the scheduling loop in a background thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.scheduler.run, kwargs={"stop": self._stop}, name="zfatlas-scheduler", daemon=True
        )
        self._thread.start()
        log.info("scheduler running: %s, Ray Jobs API %s", self.db.path, self.address)

    def wake(self) -> None:
        """Tick now (a schedule was added or resumed)."""
        self.clock.wake()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self.clock.wake()
        self._thread.join(timeout)
        self._thread = None
        log.info("scheduler stopped")
