"""Who may do what: reads are open to clients on loopback, everything else needs the bearer token.

Routers import these dependencies, e.g. a mutating route::

    from fastapi import APIRouter, Depends
    from services.http.security import require_token

    router = APIRouter(dependencies=[Depends(require_token)])

The token is the ``token`` of the app's :class:`~services.http.settings.Settings`, found at
``request.app.state.settings`` (``create_app`` puts it there; a test app that mounts a router on
its own sets ``app.state.settings = Settings(token=...)``). With no token configured, mutating
endpoints are disabled (403) rather than open.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.http.settings import Settings, is_loopback

# auto_error=False: a missing header is answered by require_token with a clear message and a
# WWW-Authenticate challenge, and the scheme still appears in the OpenAPI document.
bearer_scheme = HTTPBearer(auto_error=False, description="The API token from the server's settings.")


def app_settings(request: Request) -> Settings:
    settings = getattr(request.app.state, "settings", None)
    if not isinstance(settings, Settings):
        raise RuntimeError(
            "app.state.settings is not set; build the app with services.api.app.create_app "
            "or services.scheduler.app.create_scheduler_app"
        )
    return settings


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def _token_matches(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> bool:
    if settings.token is None or credentials is None:
        return False
    expected = settings.token.get_secret_value().encode()
    # Constant-time comparison: the answer time says nothing about how much of a guess was right.
    return hmac.compare_digest(credentials.credentials.encode(), expected)


def require_token(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> None:
    """Dependency of mutating endpoints: 403 when the server has no token, 401 when the request's
    ``Authorization: Bearer ...`` header is missing or wrong."""
    settings = app_settings(request)
    if settings.token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "mutating endpoints are disabled: the server has no token configured"
        )
    if credentials is None:
        raise _unauthorized("this endpoint needs an 'Authorization: Bearer <token>' header")
    if not _token_matches(settings, credentials):
        raise _unauthorized("invalid bearer token")


def require_read_access(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> None:
    """Dependency of read endpoints: open to clients connecting from loopback; others need the
    token. (Behind a reverse proxy on the same host every client looks local: put the proxy's own
    authentication in front.)"""
    client = request.client.host if request.client else ""
    if is_loopback(client):
        return
    settings = app_settings(request)
    if _token_matches(settings, credentials):
        return
    raise _unauthorized("reads from outside this machine need an 'Authorization: Bearer <token>' header")
