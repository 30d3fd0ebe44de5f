"""The scheduler's own small HTTP app (``zfatlas scheduler serve``): the scheduling loop runs for
the app's lifetime, and :data:`services.scheduler.http.router` serves its endpoints with the same
token rules as the main API (``ZFATLAS_API_TOKEN``) and the same guards (Host check, body limit
before authentication, security headers: :class:`services.http.guards.ServiceApp`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.http.guards import ServiceApp
from services.http.settings import Settings
from services.scheduler.http import router
from services.scheduler.service import SchedulerService


def create_scheduler_app(service: SchedulerService, settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = ServiceApp(settings or Settings(), title="zfatlas scheduler", version="1", lifespan=lifespan)
    app.state.scheduler = service

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "db": str(service.db.path), "ray": service.address}

    app.include_router(router)
    return app
