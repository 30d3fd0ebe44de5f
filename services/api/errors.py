"""Map the library's errors to HTTP answers: one ``{"detail": "..."}`` line, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from jobs.results.query import QueryError, UnknownChannelError, UnknownLayerError, UnknownRunError
from jobs.store import MissingKeyError, StoreError

log = logging.getLogger(__name__)

_NOT_FOUND = (UnknownRunError, UnknownLayerError, UnknownChannelError, MissingKeyError)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


async def _query_error(request: Request, exc: Exception) -> JSONResponse:
    code = status.HTTP_404_NOT_FOUND if isinstance(exc, _NOT_FOUND) else status.HTTP_400_BAD_REQUEST
    return JSONResponse({"detail": _first_line(exc)}, status_code=code)


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, MissingKeyError):
        return JSONResponse({"detail": _first_line(exc)}, status_code=status.HTTP_404_NOT_FOUND)
    log.error("store failure on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": f"artifact store error: {_first_line(exc)}"},
                        status_code=status.HTTP_502_BAD_GATEWAY)


def install(app: FastAPI) -> None:
    app.add_exception_handler(QueryError, _query_error)
    app.add_exception_handler(StoreError, _store_error)
