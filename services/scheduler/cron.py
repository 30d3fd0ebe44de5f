"""Cron expressions in an IANA time zone: when a schedule fires, as UTC instants.

Five-field expressions (minute hour day-of-month month day-of-week, or ``@daily`` and friends),
evaluated on the zone's wall clock by croniter, so ``0 2 * * *`` in ``Europe/Berlin`` is 02:00
Berlin time in winter and in summer. Across daylight-saving changes a wall-clock time fires at
most once: a time skipped when clocks go forward fires at the first instant after the gap (as
croniter gives it), and in the hour repeated when clocks go back only the first pass fires.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

# Enough to walk back over a long outage of an every-minute schedule without unbounded work.
MAX_ENUMERATED = 10_000


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (e.g. ``Europe/Berlin``, ``UTC``); ValueError if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name like 'Europe/Berlin' or 'UTC'"
        ) from exc


# Any instant does to ask whether an expression ever fires: its calendar repeats every 400 years.
_PROBE = datetime(2001, 1, 1, tzinfo=timezone.utc)


def check_cron(expr: str) -> str:
    """``expr`` if it is a valid five-field cron expression (or an @-alias) that fires at some
    time, else ValueError. Well-formed expressions for a date that never comes (``0 0 30 2 *``,
    the 31st of April) are refused: nothing could ever be computed from them."""
    expr = " ".join(expr.split())
    if not expr.startswith("@") and len(expr.split()) != 5:
        raise ValueError(f"{expr!r} is not a five-field cron expression (minute hour day month weekday)")
    if not croniter.is_valid(expr):
        raise ValueError(f"{expr!r} is not a valid cron expression")
    try:
        croniter(expr, _PROBE).get_next(datetime)
    except (CroniterBadDateError, ValueError, OverflowError):
        raise ValueError(f"{expr!r} never fires: no date matches its day and month fields") from None
    return expr


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    return moment.astimezone(timezone.utc)


def _repeated(moment: datetime, tz: ZoneInfo) -> bool:
    # fold=1: the second time this wall-clock reading occurs (the hour repeated at fall-back).
    return moment.astimezone(tz).fold == 1


def next_fire_times(expr: str, tz_name: str, after: datetime, count: int = 1) -> list[datetime]:
    """The first ``count`` fire times strictly after ``after``, in UTC."""
    tz = zone(tz_name)
    it = croniter(expr, _utc(after).astimezone(tz))
    out: list[datetime] = []
    while len(out) < count:
        moment = it.get_next(datetime)
        if not _repeated(moment, tz):
            out.append(_utc(moment))
    return out


def fire_times_between(
    expr: str, tz_name: str, after: datetime, until: datetime, limit: int = MAX_ENUMERATED
) -> tuple[list[datetime], bool]:
    """Fire times ``t`` with ``after < t <= until``, oldest first, in UTC: at most the newest
    ``limit`` of them; the flag says whether older ones were left out."""
    tz = zone(tz_name)
    after, until = _utc(after), _utc(until)
    # croniter's get_prev is strictly before its start: start just past `until` to include it.
    it = croniter(expr, (until + timedelta(seconds=1)).astimezone(tz))
    newest_first: list[datetime] = []
    while True:
        moment = _utc(it.get_prev(datetime))
        if moment > until:
            continue
        if moment <= after:
            return newest_first[::-1], False
        if len(newest_first) == limit:
            return newest_first[::-1], True
        if not _repeated(moment, tz):
            newest_first.append(moment)
