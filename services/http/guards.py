"""What every zfatlas HTTP server does before its routes see a request, and to every answer:

- the ``Host`` header must name this server (:meth:`Settings.host_allowed`), else 400: the reads
  that are open on loopback are then out of reach of a page on another name that resolves to
  127.0.0.1 (DNS rebinding);
- request bodies are bounded (:class:`~services.http.limits.BodySizeLimit`, 413) before any route,
  and so before authentication, reads them;
- every response, errors and 500s included, says ``X-Content-Type-Options: nosniff`` and may not be
  framed (``Content-Security-Policy: frame-ancestors 'none'``, ``X-Frame-Options: DENY``).

Both servers are built as a :class:`ServiceApp`, so neither can be created without them.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI

from services.http.limits import BodySizeLimit
from services.http.settings import Settings

Scope = dict[str, Any]
Message = dict[str, Any]

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
]


class HostCheck:
    """Pure ASGI middleware: 400 for a request whose ``Host`` header the settings do not allow."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
        if self.settings.host_allowed(host):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        detail = (
            f"Host {host!r} is not served here; add it to ZFATLAS_API_ALLOWED_HOSTS if it is this server"
            if host
            else "a Host header is required"
        )
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Pure ASGI middleware: adds :data:`SECURITY_HEADERS` to every response that lacks them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend((name, value) for name, value in SECURITY_HEADERS if name not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ServiceApp(FastAPI):
    """A FastAPI app with ``settings`` in ``app.state.settings`` and the guards above: the host
    check outermost of the middleware, then the body limit; the security headers wrap the whole
    stack, so even the answer to an unhandled error carries them."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.settings = settings
        self.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
        self.add_middleware(HostCheck, settings=settings)  # added last: runs first

    def build_middleware_stack(self) -> Any:
        return SecurityHeaders(super().build_middleware_stack())
