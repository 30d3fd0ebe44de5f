"""``zfatlas serve``'s server: the query API with the scheduler's submit/schedule endpoints mounted,
so one port answers both. The API and the scheduler know nothing of each other; this composes them."""

from __future__ import annotations

from fastapi import FastAPI

from jobs.store import Store
from services.api.app import create_app
from services.http.settings import Settings
from services.scheduler.http import router as scheduler_router


def create_server(settings: Settings | None = None, *, store: Store | None = None) -> FastAPI:
    """The API app for ``settings`` with ``/api/jobs`` and ``/api/schedules`` mounted."""
    return create_app(settings, store=store, routers=[scheduler_router])
