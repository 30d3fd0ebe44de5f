"""The FastAPI application: JSON endpoints over the artifact store, streamed images, the web atlas
viewer at ``/``, and the scheduler's submit/schedule endpoints when that package is installed.

Build it with :func:`create_app`; ``zfatlas serve`` runs it under uvicorn. The OpenAPI document is
at ``/openapi.json`` (interactive docs at ``/docs``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from jobs.store import Store
from services.api import errors
from services.api.catalog import Catalog
from services.api.limits import BodySizeLimit
from services.api.routes import atlas, diffs, images, runs
from services.api.settings import Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# The scheduler service (its own package) exposes its HTTP endpoints as an APIRouter here.
SCHEDULER_MODULE = "services.scheduler.http"

DESCRIPTION = """\
Query the zfatlas artifact store: committed runs, feature atlases (every channel's top-k images,
projections and receptive boxes), diffs between two atlases, and the PNGs themselves.

Reads are open to clients on this machine (loopback); from elsewhere, and for every mutating
endpoint, send `Authorization: Bearer <token>` with the token from the server's settings
(`ZFATLAS_API_TOKEN`). Lists are paged with `offset` and `limit` (bounded).
"""

TAGS = [
    {"name": "runs", "description": "Committed runs of every kind."},
    {"name": "atlases", "description": "Feature atlases: layers, channel tiles, one channel's top-k."},
    {"name": "diffs", "description": "How an atlas changed between two runs of the same architecture."},
    {"name": "images", "description": "PNG images streamed from the store, and annotated source images."},
]


def scheduler_router(module_name: str = SCHEDULER_MODULE) -> APIRouter | None:
    """The ``router`` of ``module_name`` if that module exists, else None. A module that exists
    but fails to import, or has no ``router``, is an error (never silently skipped)."""
    parent = module_name.rpartition(".")[0]
    if parent and importlib.util.find_spec(parent) is None:
        return None
    if importlib.util.find_spec(module_name) is None:
        return None
    module = importlib.import_module(module_name)
    router = getattr(module, "router", None)
    if not isinstance(router, APIRouter):
        raise RuntimeError(f"{module_name} must define `router`, a fastapi.APIRouter")
    return router


def create_app(
    settings: Settings | None = None, *, store: Store | None = None, scheduler_module: str = SCHEDULER_MODULE
) -> FastAPI:
    """The app for ``settings`` (default: from ``ZFATLAS_API_*`` environment variables).
    ``store`` overrides the store the settings name; ``scheduler_module`` names the module whose
    ``router`` (submit/schedule endpoints) is mounted when it exists."""
    settings = settings or Settings()
    store = store or Store.from_uri(settings.store, settings.endpoint_url)
    app = FastAPI(
        title="zfatlas",
        version="1",
        description=DESCRIPTION,
        openapi_tags=TAGS,
    )
    app.state.settings = settings
    app.state.catalog = Catalog(store, settings.cache_runs)
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    app.include_router(runs.router(settings))
    app.include_router(atlas.router(settings))
    app.include_router(diffs.router(settings))
    app.include_router(images.router())
    scheduler = scheduler_router(scheduler_module)
    if scheduler is not None:
        app.include_router(scheduler)
        log.info("scheduler endpoints mounted from %s", scheduler_module)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def viewer() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    log.info("serving %s", store.uri_of(""))
    return app
