"""The FastAPI application: JSON endpoints over the artifact store, streamed images and the web
atlas viewer at ``/``; other services' routers (the scheduler's submit/schedule endpoints) are
mounted by whoever composes the server (:mod:`services.server`).

Build it with :func:`create_app`; ``zfatlas serve`` runs it under uvicorn. The OpenAPI document is
at ``/openapi.json`` (interactive docs at ``/docs``, with Swagger UI's assets served from this
server: no CDN).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from jobs.store import Store, open_store
from services.api import deps, docs, errors
from services.api.catalog import Catalog
from services.api.routes import atlas, diffs, images, runs
from services.http.guards import ServiceApp
from services.http.settings import Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
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


def create_app(
    settings: Settings | None = None, *, store: Store | None = None, routers: Sequence[APIRouter] = ()
) -> FastAPI:
    """The app for ``settings`` (default: from ``ZFATLAS_API_*`` environment variables).
    ``store`` overrides the store the settings name; ``routers`` are mounted too (their endpoints
    see the same settings, so the same token rules)."""
    settings = settings or Settings()
    if settings.endpoint_url:
        from jobs.store.s3 import trust_endpoint

        trust_endpoint(settings.endpoint_url)  # the operator named it: it gets this process's credentials
    store = store or open_store(settings.store, settings.endpoint_url)
    app = ServiceApp(
        settings,
        title="zfatlas",
        version="1",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        **docs.docs_disabled(),  # FastAPI's pages load from a CDN; docs.install serves them locally
        # Query times that cannot be compared in UTC are the client's mistake (422), not a crash.
        dependencies=[Depends(deps.representable_times)],
    )
    app.state.catalog = Catalog(store, settings.cache_runs)
    errors.install(app)

    app.include_router(runs.router(settings))
    app.include_router(atlas.router(settings))
    app.include_router(diffs.router(settings))
    app.include_router(images.router())
    for router in routers:
        app.include_router(router)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    docs.install(app)

    @app.get("/", include_in_schema=False)
    def viewer() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    log.info("serving %s", store.uri_of(""))
    return app
