"""``zfatlas scheduler serve`` and ``zfatlas schedule add|list|pause|resume|remove|history``.

The ``schedule`` commands work on the scheduler's SQLite file directly (``--db``, default
``$ZFATLAS_SCHEDULER_DB`` or ./artifacts/scheduler.db), so they need to run where that file is;
a running ``scheduler serve`` picks changes up within its idle interval (a minute). From another
machine, use the same operations over HTTP (``/api/schedules``). Exit codes: 0 success; 2 a bad
schedule or spec (one ``zfatlas: field: reason`` line per problem); 1 no such schedule, or the
service or the database failed (one ``zfatlas: <reason>`` line).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from zfatlas_cli.failures import fail, fail_with
from zfatlas_cli.specs import EXIT_FAILED, EXIT_SPEC

if TYPE_CHECKING:
    from services.scheduler.db import ScheduleDB
    from services.scheduler.model import Schedule
    from services.scheduler.service import SchedulerSettings

log = logging.getLogger("zfatlas.scheduler")

DEFAULT_PORT = 8001
_COLUMNS = "{:<24} {:<16} {:<18} {:<7} {:<8} {:<7} {}"


def _reported(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The command, with a database that cannot be opened or used reported in one line (exit 1)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            return fail_with(exc, getattr(args, "verbose", False), EXIT_FAILED)

    return run


def _problems(exc: Any) -> int:
    """One ``zfatlas: field: reason`` line per problem of a pydantic ValidationError; exit 2."""
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "schedule"
        fail(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return EXIT_SPEC


def register(sub: argparse._SubParsersAction) -> None:
    db_help = "scheduler database (default: $ZFATLAS_SCHEDULER_DB or ./artifacts/scheduler.db)"

    p = sub.add_parser("scheduler", help="run the scheduler service")
    sched_sub = p.add_subparsers(dest="scheduler_command", required=True, metavar="ACTION")
    p = sched_sub.add_parser("serve", help="fire schedules through the Ray Jobs API; serve /api/schedules")
    p.add_argument("--db", help=db_help)
    p.add_argument(
        "--address", help="Ray Jobs API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or local)"
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    p.add_argument("--no-http", action="store_true", help="only the scheduling loop, no HTTP endpoints")
    p.add_argument("--poll", type=float, help="seconds between status polls of running jobs (default 10)")
    p.set_defaults(func=_reported(serve))

    p = sub.add_parser(
        "schedule", help="manage nightly schedules (add, list, pause, resume, remove, history)"
    )
    sched = p.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")

    p = sched.add_parser("add", help="add a schedule; prints its next fire times")
    p.add_argument("name", help="schedule name (slug); runs are named <name>-<UTC time>")
    p.add_argument("--cron", required=True, help="five-field cron expression, e.g. '0 2 * * *'")
    p.add_argument(
        "--spec", required=True, help="spec template file; latest:PREFIX = newest checkpoint there"
    )
    p.add_argument(
        "--timezone", "--tz", default="UTC", help="IANA time zone of the cron expression (default UTC)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a spec field",
    )
    p.add_argument("--concurrency", choices=["forbid", "replace", "allow"], default="forbid",
                   help="when a fire comes while the last one still runs: forbid (skip it), replace "
                   "(stop the running job, start the new one) or allow (run both)")
    p.add_argument("--catchup", choices=["none", "latest", "all"], default="latest",
                   help="fires missed while the scheduler was down: none, the latest only, or all "
                   "(up to --max-catchup)")
    p.add_argument("--max-catchup", type=int, default=10, help="most missed fires run by --catchup all")
    p.add_argument(
        "--starting-deadline", type=float, default=300.0, help="seconds late a fire may start (none)"
    )
    p.add_argument("--max-attempts", type=int, default=3, help="attempts per run, the first included")
    p.add_argument("--backoff", type=float, default=300.0, help="seconds before the second attempt")
    p.add_argument("--backoff-factor", type=float, default=2.0, help="growth of each further wait")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=_reported(add))

    p = sched.add_parser("list", help="schedules and their next fire times")
    p.add_argument("--next", type=int, default=3, help="fire times shown per schedule (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per schedule, per line")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=_reported(list_schedules))

    for action, text in (("pause", "stop firing (until resumed)"), ("resume", "fire again from now on")):
        p = sched.add_parser(action, help=text)
        p.add_argument("name", help="the schedule's name, as schedule list shows it")
        p.add_argument("--db", help=db_help)
        p.set_defaults(func=_reported(pause if action == "pause" else resume))

    p = sched.add_parser("remove", help="delete a schedule (its history stays)")
    p.add_argument("name", help="the schedule's name, as schedule list shows it")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=_reported(remove))

    p = sched.add_parser("history", help="runs, newest first: scheduled time, status, attempts, Ray job")
    p.add_argument("name", nargs="?", help="one schedule (default: all)")
    p.add_argument("--limit", type=int, default=20, help="most runs shown")
    p.add_argument("--json", action="store_true", help="one JSON object per run, per line")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=_reported(history))


def _settings(args: argparse.Namespace, **options: Any) -> SchedulerSettings:
    from services.scheduler.service import SchedulerSettings

    if args.db:
        options["db"] = args.db
    return SchedulerSettings(**options)  # the rest from ZFATLAS_SCHEDULER_* or the defaults


def _open(args: argparse.Namespace) -> ScheduleDB:
    from services.scheduler.db import ScheduleDB

    return ScheduleDB(_settings(args).db)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _local(moment: datetime, tz_name: str) -> str:
    from services.scheduler.cron import zone

    return moment.astimezone(zone(tz_name)).strftime("%Y-%m-%d %H:%M %Z")


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from services.http.settings import Settings
    from services.scheduler.app import create_scheduler_app
    from services.scheduler.service import SchedulerService

    options: dict[str, Any] = {}
    if args.address:
        options["ray_address"] = args.address
    if args.poll:
        options["poll_s"] = args.poll
    try:
        service = SchedulerService(_settings(args, **options))
        api = None if args.no_http else Settings(host=args.host, port=args.port)
    except ValidationError as exc:
        return _problems(exc)
    if api is None:
        log.info("scheduler (no HTTP): %s -> %s", service.db.path, service.address)
        service.scheduler.run()
        return 0
    app = create_scheduler_app(service, api)
    log.info(
        "scheduler HTTP on http://%s:%d (db %s, Ray %s)", api.host, api.port, service.db.path, service.address
    )
    uvicorn.run(app, host=api.host, port=api.port, log_level="info")
    return 0


def add(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from jobs.specs.base import SpecError
    from jobs.specs.loading import apply_overrides, load_spec_dict
    from services.scheduler.db import ScheduleExistsError
    from services.scheduler.model import RetryPolicy, ScheduleConfig
    from services.scheduler.template import check_template

    try:
        template = apply_overrides(load_spec_dict(args.spec), args.overrides)
        check_template(template)  # spec problems one per line, as `zfatlas validate` prints them
        config = ScheduleConfig(
            name=args.name,
            cron=args.cron,
            timezone=args.timezone,
            spec=template,
            concurrency=args.concurrency,
            catchup=args.catchup,
            max_catchup=args.max_catchup,
            starting_deadline_s=args.starting_deadline,
            retry=RetryPolicy(
                max_attempts=args.max_attempts, backoff_s=args.backoff, backoff_factor=args.backoff_factor
            ),
        )
    except SpecError as exc:
        for problem in exc.problems:
            fail(problem)
        return EXIT_SPEC
    except ValidationError as exc:  # a cron that is malformed or never fires, an unknown zone, ...
        return _problems(exc)
    now = _now()
    try:
        with _open(args).transaction() as tx:
            tx.insert_schedule(config, now)
    except ScheduleExistsError as exc:
        return fail(f"{exc} (remove it first, or pick another name)", EXIT_FAILED)
    times = ", ".join(_local(t, config.timezone) for t in config.next_fire_times(now, 3))
    print(f"added {config.name}: {config.cron} ({config.timezone}); next: {times}")
    return 0


def _describe(schedule: Schedule, now: datetime, count: int) -> str:
    shown = schedule.to_dict(now, count)  # never raises: a bad row comes back with its problem
    if shown["problem"]:
        state, times = "invalid", shown["problem"]
    else:
        state = "paused" if schedule.paused else "active"
        zone_name = str(shown.get("timezone", "UTC"))
        times = ", ".join(_local(_parse(t), zone_name) for t in shown["next_fire_times"]) or "-"
    columns = [shown.get(k, "?") for k in ("name", "cron", "timezone")]
    return _COLUMNS.format(*columns, state, shown.get("concurrency", "?"), shown.get("catchup", "?"), times)


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def list_schedules(args: argparse.Namespace) -> int:
    now = _now()
    with _open(args).reading() as tx:
        schedules = tx.schedules()
    if args.json:
        for schedule in schedules:
            print(json.dumps(schedule.to_dict(now, args.next)))
        return 0
    print(_COLUMNS.format("NAME", "CRON", "TIME ZONE", "STATE", "CONCUR.", "CATCHUP", "NEXT FIRE TIMES"))
    for schedule in schedules:
        print(_describe(schedule, now, args.next))
    return 0


def _change(args: argparse.Namespace, action: str) -> int:
    from services.scheduler.db import ScheduleNotFoundError

    try:
        with _open(args).transaction() as tx:
            if action == "remove":
                tx.delete_schedule(args.name)
            else:
                tx.set_paused(args.name, action == "pause", _now())
    except ScheduleNotFoundError:
        return fail(f"no schedule {args.name!r} in {_open(args).path}", EXIT_FAILED)
    print(f"{args.name}: {'removed' if action == 'remove' else action + 'd'}")
    return 0


def pause(args: argparse.Namespace) -> int:
    return _change(args, "pause")


def resume(args: argparse.Namespace) -> int:
    return _change(args, "resume")


def remove(args: argparse.Namespace) -> int:
    return _change(args, "remove")


def history(args: argparse.Namespace) -> int:
    from services.scheduler.model import iso

    with _open(args).reading() as tx:
        runs = tx.runs(schedule=args.name, limit=args.limit, with_history=True)
    if args.json:
        for run in runs:
            print(json.dumps(run.to_dict()))
        return 0
    print(f"{'SCHEDULED (UTC)':<21} {'RUN ID':<40} {'STATUS':<10} {'TRIES':<5} {'RAY JOB ID':<48} MESSAGE")
    for run in runs:
        print(
            f"{iso(run.scheduled_at):<21} {run.run_id:<40} {run.status:<10} {run.attempts:<5} "
            f"{run.ray_job_id or '-':<48} {run.message or ''}"
        )
    return 0
