"""``/docs`` (Swagger UI) with its script and styles served by this server.

FastAPI's own page loads Swagger UI from a CDN, so on a machine without internet (a cluster's head
node, a laptop on a train) ``/docs`` is a blank page. The ``fastapi-offline`` package ships those
files; we serve them from its package folder and point FastAPI's page builder at them. Nothing on
the page asks for another host. ReDoc (``/redoc``) is off: even served locally it fetches its logo
from its vendor's CDN, and Swagger UI already documents every endpoint.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: The package's data folder: swagger-ui-bundle.js, swagger-ui.css, favicon.png (and ReDoc's script).
ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs-assets"
DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# validatorUrl null: Swagger UI would otherwise send the spec to validator.swagger.io for a badge.
SWAGGER_PARAMETERS = {"validatorUrl": None}


def docs_disabled() -> dict[str, None]:
    """The FastAPI arguments that turn off its CDN-backed pages (:func:`install` adds /docs back)."""
    return {"docs_url": None, "redoc_url": None}


def install(app: FastAPI) -> None:
    """Mount the assets and ``/docs`` on ``app`` (made with :func:`docs_disabled`)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{ASSETS_URL}/favicon.png"

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} · API docs",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=favicon, oauth2_redirect_url=OAUTH2_REDIRECT_URL,
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), **SWAGGER_PARAMETERS},
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
