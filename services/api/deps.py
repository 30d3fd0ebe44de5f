"""Dependencies shared by the routers: the store catalog, page parameters, safe keys, image URLs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar
from urllib.parse import quote

from fastapi import HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError

from jobs.store import check_key
from services.api.bodies import Page
from services.api.catalog import Catalog
from services.http.settings import Settings

T = TypeVar("T")
# Path parameters naming runs and layers: letters, digits, '.', '-', '_' (what run ids may hold);
# anything else is refused before it reaches the store.
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
IMAGES_PREFIX = "/api/images/"
# Query parameters that are points in time, compared in UTC by the readers.
TIME_PARAMS = ("since",)


def catalog(request: Request) -> Catalog:
    return request.app.state.catalog


@dataclass(frozen=True)
class PageParams:
    offset: int
    limit: int

    def page(self, items: Sequence[T], total: int | None = None) -> Page[T]:
        """A page of ``items`` (which already start at ``offset`` when ``total`` is given)."""
        if total is None:
            total = len(items)
            items = items[self.offset : self.offset + self.limit]
        end = self.offset + len(items)
        return Page[T](items=list(items), total=total, offset=self.offset, limit=self.limit,
                       next_offset=end if end < total else None)


def page_params(settings: Settings) -> Callable[..., PageParams]:
    """The ``offset``/``limit`` query parameters, bounded by the settings (422 above the bound)."""

    def dependency(
        offset: int = Query(0, ge=0, le=1_000_000_000, description="Index of the first item."),
        limit: int = Query(
            settings.default_page_size,
            ge=1,
            le=settings.max_page_size,
            description=f"Items per page (at most {settings.max_page_size}).",
        ),
    ) -> PageParams:
        return PageParams(offset, limit)

    return dependency


def representable_times(request: Request) -> None:
    """422 for a time query parameter that has no UTC equivalent: ``0001-01-01T00:00:00+14:00`` is
    a valid ISO 8601 time, but in UTC it falls before year 1, which Python cannot represent (the
    readers would fail with OverflowError, a 500). App-wide, so every route taking one is covered."""
    for name in TIME_PARAMS:
        text = request.query_params.get(name)
        if not text:
            continue
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            continue  # not ISO 8601: the route's own validation answers it
        if moment.tzinfo is None:
            continue  # taken as UTC: nothing to convert
        try:
            moment.astimezone(timezone.utc)
        except OverflowError:
            raise RequestValidationError([{
                "type": "datetime_range", "loc": ("query", name), "input": text,
                "msg": f"{text!r} is outside the range of times that can be compared in UTC "
                       "(years 1 to 9999)",
            }]) from None


def safe_key(key: str) -> str:
    """``key`` if it stays inside the store, else 400 (``..``, absolute, backslash, empty segment)."""
    try:
        return check_key(key)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"bad key: {exc}") from None


def image_url(key: str | None) -> str | None:
    """The API URL that streams the store object ``key`` (None for a missing key)."""
    return f"{IMAGES_PREFIX}{quote(key, safe='/')}" if key else None
