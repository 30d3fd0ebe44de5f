"""The scheduler's state in SQLite: schedules, every scheduled run, every attempt at it.

Exactly once rests on two UNIQUE constraints, checked inside ``BEGIN IMMEDIATE`` transactions
(one writer at a time across every process using the file):

- ``runs (schedule, scheduled_at)`` (and the run id derived from them, the primary key): a
  scheduled time is claimed by exactly one INSERT, whichever scheduler replica gets there first;
- ``attempts (run_id, attempt)`` and ``attempts (ray_job_id)``: each attempt, and so each Ray
  submission id, is claimed once, before anything is submitted.

Every operation opens its own connection, so one ``ScheduleDB`` serves any number of threads
(the scheduler loop, HTTP handlers). Times are stored as UTC ``YYYY-MM-DDTHH:MM:SSZ`` text, which
sorts in time order.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.scheduler.model import PENDING, Attempt, Run, Schedule, ScheduleConfig, iso

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    name        TEXT PRIMARY KEY,
    config      TEXT NOT NULL,            -- ScheduleConfig as JSON
    paused      INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    watermark   TEXT NOT NULL             -- fire times up to here are decided
);
CREATE TABLE IF NOT EXISTS runs (
    run_id          TEXT PRIMARY KEY,     -- <schedule>-<scheduled time>
    schedule        TEXT NOT NULL,
    scheduled_at    TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    ray_job_id      TEXT,                 -- submission id of the latest attempt
    next_attempt_at TEXT,
    message         TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    UNIQUE (schedule, scheduled_at)
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, schedule);
CREATE TABLE IF NOT EXISTS attempts (
    run_id      TEXT NOT NULL REFERENCES runs (run_id),
    attempt     INTEGER NOT NULL,
    ray_job_id  TEXT NOT NULL UNIQUE,
    status      TEXT NOT NULL,
    claimed_at  TEXT NOT NULL,
    finished_at TEXT,
    message     TEXT,
    PRIMARY KEY (run_id, attempt)
);
"""
_RUN_FIELDS = ("status", "attempts", "ray_job_id", "next_attempt_at", "message")


class ScheduleExistsError(ValueError):
    """A schedule with this name is already stored."""


class ScheduleNotFoundError(KeyError):
    """No schedule with this name is stored."""


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _schedule(row: sqlite3.Row) -> Schedule:
    """The row as a Schedule; one that no longer validates comes back with its problem instead of
    raising, so one bad row never breaks a listing or the loop over the others."""
    stored: Any = None
    try:
        stored = json.loads(row["config"])
        config: ScheduleConfig | None = ScheduleConfig.model_validate(stored)
        problem = None
    except ValidationError as exc:
        config = None
        problem = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
    except ValueError as exc:  # not JSON
        config, problem = None, f"unreadable configuration: {exc}"
    return Schedule(
        name=row["name"],
        config=config,
        paused=bool(row["paused"]),
        created_at=_time(row["created_at"]),  # type: ignore[arg-type]
        watermark=_time(row["watermark"]),  # type: ignore[arg-type]
        problem=problem,
        stored=stored if isinstance(stored, dict) else {},
    )


def _attempt(row: sqlite3.Row) -> Attempt:
    return Attempt(
        attempt=row["attempt"],
        ray_job_id=row["ray_job_id"],
        status=row["status"],
        claimed_at=_time(row["claimed_at"]),  # type: ignore[arg-type]
        finished_at=_time(row["finished_at"]),
        message=row["message"],
    )


def _run(row: sqlite3.Row, history: list[Attempt] | None = None) -> Run:
    return Run(
        run_id=row["run_id"],
        schedule=row["schedule"],
        scheduled_at=_time(row["scheduled_at"]),  # type: ignore[arg-type]
        status=row["status"],
        attempts=row["attempts"],
        ray_job_id=row["ray_job_id"],
        next_attempt_at=_time(row["next_attempt_at"]),
        message=row["message"],
        updated_at=_time(row["updated_at"]),  # type: ignore[arg-type]
        history=history or [],
    )


class Tx:
    """The operations of one transaction (see :meth:`ScheduleDB.transaction`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    # --- schedules ---

    def insert_schedule(self, config: ScheduleConfig, now: datetime) -> None:
        cur = self._conn.execute(
            "INSERT INTO schedules (name, config, paused, created_at, watermark) VALUES (?, ?, 0, ?, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (config.name, config.model_dump_json(), iso(now), iso(now)),
        )
        if cur.rowcount == 0:
            raise ScheduleExistsError(f"schedule {config.name!r} already exists")

    def schedule(self, name: str) -> Schedule:
        row = self._conn.execute("SELECT * FROM schedules WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ScheduleNotFoundError(name)
        return _schedule(row)

    def schedules(self) -> list[Schedule]:
        return [_schedule(r) for r in self._conn.execute("SELECT * FROM schedules ORDER BY name")]

    def delete_schedule(self, name: str) -> None:
        """Forget the schedule; its runs stay in the history."""
        if self._conn.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount == 0:
            raise ScheduleNotFoundError(name)

    def set_paused(self, name: str, paused: bool, now: datetime) -> None:
        """Pause or resume. Resuming moves the watermark to ``now``: fire times that passed while
        paused were skipped on purpose, not missed."""
        sql = "UPDATE schedules SET paused = ? WHERE name = ?"
        args: tuple[Any, ...] = (int(paused), name)
        if not paused:
            sql = "UPDATE schedules SET paused = 0, watermark = MAX(watermark, ?) WHERE name = ?"
            args = (iso(now), name)
        if self._conn.execute(sql, args).rowcount == 0:
            raise ScheduleNotFoundError(name)

    def advance_watermark(self, name: str, moment: datetime) -> None:
        self._conn.execute(
            "UPDATE schedules SET watermark = ? WHERE name = ? AND watermark < ?",
            (iso(moment), name, iso(moment)),
        )

    # --- runs ---

    def insert_run(
        self,
        run_id: str,
        schedule: str,
        scheduled_at: datetime,
        status: str,
        now: datetime,
        message: str | None = None,
    ) -> bool:
        """Claim a scheduled time; False if it was already claimed (by anyone)."""
        cur = self._conn.execute(
            "INSERT INTO runs (run_id, schedule, scheduled_at, status, message, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (run_id, schedule, iso(scheduled_at), status, message, iso(now), iso(now)),
        )
        return cur.rowcount == 1

    def run(self, run_id: str, with_history: bool = False) -> Run | None:
        row = self._conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        return _run(row, self.attempts(run_id) if with_history else None)

    def runs(
        self,
        schedule: str | None = None,
        statuses: Sequence[str] | None = None,
        limit: int | None = None,
        with_history: bool = False,
    ) -> list[Run]:
        """Runs, newest scheduled time first."""
        sql, args = "SELECT * FROM runs WHERE 1 = 1", []
        if schedule is not None:
            sql += " AND schedule = ?"
            args.append(schedule)
        if statuses is not None:
            sql += f" AND status IN ({', '.join('?' * len(statuses))})"
            args.extend(statuses)
        sql += " ORDER BY scheduled_at DESC, run_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._conn.execute(sql, args).fetchall()
        return [_run(r, self.attempts(r["run_id"]) if with_history else None) for r in rows]

    def update_run(self, run_id: str, now: datetime, **fields: Any) -> None:
        unknown = set(fields) - set(_RUN_FIELDS)
        if unknown:
            raise ValueError(f"not run fields: {sorted(unknown)}")
        values = [iso(v) if isinstance(v, datetime) else v for v in fields.values()]
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self._conn.execute(
            f"UPDATE runs SET {assignments}, updated_at = ? WHERE run_id = ?", (*values, iso(now), run_id)
        )

    # --- attempts ---

    def insert_attempt(self, run_id: str, attempt: int, ray_job_id: str, now: datetime) -> bool:
        """Claim attempt ``attempt`` of a run (before submitting it); False if already claimed.
        The run becomes ``pending`` with this attempt as its latest."""
        cur = self._conn.execute(
            "INSERT INTO attempts (run_id, attempt, ray_job_id, status, claimed_at) "
            "VALUES (?, ?, ?, 'claimed', ?) ON CONFLICT DO NOTHING",
            (run_id, attempt, ray_job_id, iso(now)),
        )
        if cur.rowcount == 0:
            return False
        self.update_run(
            run_id, now, status=PENDING, attempts=attempt, ray_job_id=ray_job_id, next_attempt_at=None
        )
        return True

    def attempts(self, run_id: str) -> list[Attempt]:
        rows = self._conn.execute("SELECT * FROM attempts WHERE run_id = ? ORDER BY attempt", (run_id,))
        return [_attempt(r) for r in rows]

    def update_attempt(
        self,
        run_id: str,
        attempt: int,
        status: str,
        finished_at: datetime | None = None,
        message: str | None = None,
    ) -> None:
        self._conn.execute(
            "UPDATE attempts SET status = ?, finished_at = COALESCE(?, finished_at), "
            "message = COALESCE(?, message) WHERE run_id = ? AND attempt = ?",
            (status, iso(finished_at), message, run_id, attempt),
        )

    def reopen_attempt(self, run_id: str, attempt: int, status: str, message: str) -> None:
        """An attempt recorded as finished turns out to be going after all (a submission that was
        not confirmed did reach the cluster): its status, no end time, and why."""
        self._conn.execute(
            "UPDATE attempts SET status = ?, finished_at = NULL, message = ? "
            "WHERE run_id = ? AND attempt = ?",
            (status, message, run_id, attempt),
        )


class ScheduleDB:
    """One SQLite file (created with its folder on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().absolute()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            # WAL: readers (history, HTTP) never wait for the scheduler's writes.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(
                    f"{self.path} has schema version {version}; this zfatlas reads {SCHEMA_VERSION}"
                )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def __repr__(self) -> str:
        return f"ScheduleDB({str(self.path)!r})"

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: no implicit transactions; transaction() says BEGIN itself.
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction: ``BEGIN IMMEDIATE`` takes the file's write lock up front, so what a
        transaction reads cannot change before it commits. Rolled back on any exception."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        """A read-only snapshot (no write lock)."""
        with self._connect() as conn:
            conn.execute("BEGIN")
            try:
                yield Tx(conn)
            finally:
                conn.execute("ROLLBACK")
